"""Masked secure aggregation across sites: the coordinator is the protocol's server, each
site's gateway its client (`site_masking`), so a site's model update leaves the site masked.

A round (`MaskedSiteProcess.next`), with the round's live sites as parties 0..n-1:
  0-1. `Advertise`, `ShareKeys` at every site; the coordinator relays the keys and the
       encrypted shares (`shared.secagg.SecAggServer`).
  2.   The coordinator puts the round's computation (`site_round`: open the site's round
       input, broadcast + client work, encode the update as in the simulator's masked mode)
       and its argument on the site's worker with TFF's remote executor (`CreateValue`), and
       asks the gateway for `MaskedInput`: the gateway makes the call, keeps the update, and
       returns it masked, with the round's public part (training metrics, client state).
  3.   `Unmask` at the sites whose masked input arrived; the server removes the masks and
       decodes the mean (`secure_rounds.decode`); the server optimizer runs on the
       coordinator's own worker (`SplitRoundProcess.finish_round`).
A site that does not answer is a dropout of the protocol (after its masked input: its
update is still in the sum, recovered through the others' shares) and is left out of later
rounds and evaluations (`lost`). With fewer than t = ceil(secure_threshold * n) answers the
round fails: `WorkerLost`, one line, no update applied; the run id resumes from its last
checkpoint. Training metrics are the sites' own, combined here (counts summed, the rest
averaged weighted by examples): they leave the site as in plain site mode.

Distributed DP (`privacy.level = "client"`, the process a `ddp_rounds.MaskedDdpProcess`): the
site's computation also runs the client half of TFF's distributed DP aggregator on the site's
update (clip, rotation, scaling, stochastic rounding, the site's share of the discrete Gaussian
noise drawn on the site's worker, modular clipping into Z_{2^20}), so what the gateway masks is
already noised; the coordinator unmasks the sum in that ring and runs the server half
(`DdpSplit.decode`: unscale, inverse rotation, mean). The noise is split over the round's m
sites: a site missing before its masked input fails the round (its share would be missing),
and later rounds do not run without it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from shared import secagg_wire as wire
from shared.errors import UserError
from shared.secagg import SecAggServer
from shared.secagg_ring import SecAggError
from tff_apps.learning.secure_rounds import decode
from tff_apps.learning.split_rounds import ClientPhase
from tff_apps.runtime.context import WorkerLost
from tff_apps.sites.site_masking import SERVICE

STEP_TIMEOUT_S = {"Advertise": 60.0, "ShareKeys": 60.0, "MaskedInput": 900.0, "Unmask": 60.0}
# A site that cannot be reached is a dropout; any other error (a refusal) fails the run.
_DROPOUT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
_log = logging.getLogger(__name__)


def _leaves(value) -> list:
    """A structure's tensors in TFF's element order (mappings in insertion order)."""
    if isinstance(value, collections.abc.Mapping):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def encode_computation(update_type, weight_type, secure):
    """`secure_rounds.encode` at the site, in TF ops with the same float64 arithmetic."""
    bound_w = int(np.floor(secure.bound * 2.0**secure.scale_bits)) / 2.0**secure.scale_bits

    @tff.tensorflow.computation(update_type, weight_type)
    def encode(update, weight):
        flat = tf.concat([tf.reshape(tf.cast(t, tf.float64), [-1]) for t in _leaves(update)], axis=0)
        w = tf.cast(weight, tf.float64) if secure.weighted else tf.constant(1.0, tf.float64)
        values = flat * w / secure.max_weight
        clipped = tf.reduce_any(tf.abs(values) > secure.bound)
        zero, bound = tf.constant(0.0, tf.float64), tf.constant(bound_w, tf.float64)
        tail = tf.stack([w / secure.max_weight * bound, tf.where(clipped, bound, zero)])
        return tf.concat([values, tail], axis=0)

    return encode


def site_round_computation(process, open_round, secure):
    """(state, site reference) -> (encoded update @CLIENTS, public part): what a site's worker
    runs in a masked round. Element 0 is read only by the site's gateway."""
    client_phase = process._client_phase  # the same broadcast + client work as the simulator's
    state_type, result = client_phase.type_signature.parameter[0], client_phase.type_signature.result
    encode = encode_computation(result[2].member, result[3].member, secure)
    split = getattr(process, "split", None)  # distributed DP: TFF's client half, noise included

    @tff.federated_computation(state_type, tff.FederatedType(open_round.type_signature.parameter, tff.CLIENTS))
    def site_round(state, refs):
        phase = client_phase(state, tff.federated_map(open_round, refs))
        if split is not None:
            encoded = split.encode(phase[2], state.aggregator)
        else:
            encoded = tff.federated_map(encode, tff.federated_zip((phase[2], phase[3])))
        return encoded, (phase[0], phase[1], phase[4], phase[5])

    return site_round


def site_round_state_type(site_round):
    return site_round.type_signature.parameter[0].member


def combine_metrics(per_site: list) -> Any:
    """The sites' training metrics as one round's: `num_*` counts summed, the rest averaged
    weighted by each site's examples (`num_examples`, else equally)."""
    def examples(m) -> float:
        found = [v for k, v in _items(m) if k == "num_examples"]
        return float(found[0]) if found else 1.0

    weights = np.array([examples(m) for m in per_site])
    weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(per_site), 1.0 / len(per_site))

    def merge(values: list, key: str):
        first = values[0]
        if isinstance(first, collections.abc.Mapping):
            return collections.OrderedDict((k, merge([v[k] for v in values], k)) for k in first)
        if key.startswith("num_"):
            return type(first)(np.sum(values, axis=0)) if np.ndim(first) == 0 else np.sum(values, axis=0)
        return np.float32(sum(w * np.asarray(v, np.float64) for w, v in zip(weights, values)))

    return merge(per_site, "")


def _items(metrics):
    for key, value in metrics.items():
        if isinstance(value, collections.abc.Mapping):
            yield from _items(value)
        else:
            yield key, value


class MaskedSiteProcess:
    """The learning process of a masked run across sites (module docstring). `process` is the
    `secure_rounds.MaskedLearningProcess` a simulation would run; `channel(i)` opens the
    mutual-TLS channel to site i's gateway (with the job descriptor)."""

    def __init__(self, process, open_round, clients, channel: Callable[[int], grpc.Channel], run_id: str, quorum: int = 1):
        self._process = process
        self._secure = process.secure
        self._clients = list(clients)
        self._index_of = {c.folder: i for i, c in enumerate(self._clients)}
        self._open_channel = channel
        self._channels: dict[int, grpc.Channel] = {}
        self._run_id = run_id
        self._quorum = max(2, quorum)
        self._open_round = open_round
        self._site_round = site_round_computation(process, open_round, self._secure)
        self._ddp = getattr(process, "split", None) is not None
        self.lost: set[int] = set()
        self.last_dropped: list[str] = []
        # for `SiteEvaluation`: the global model's type (get_model_weights here is Python)
        self.weights_type = site_round_state_type(self._site_round).global_model_weights

    def initialize(self):
        return self._process.initialize()

    def get_model_weights(self, state):
        return self._process.get_model_weights(state)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def next(self, state, references):
        """One masked round with the sites of `references`; see the module docstring."""
        started = time.perf_counter()
        sites = [self._index_of[r["folder"]] for r in references]
        self.last_dropped = [self._clients[i].name for i in sites if i in self.lost]
        live = [(i, r) for i, r in zip(sites, references) if i not in self.lost]
        if len(live) < self._quorum:
            raise WorkerLost(self._failure(f"{len(live)} sites answer, fewer than {self._quorum}"))
        if self._ddp and len(live) < len(sites):
            raise WorkerLost(self._failure(f"distributed DP needs the noise share of each of the round's {len(sites)} "
                                           f"sites, {len(live)} answer"))
        cfg = self._secure.secagg_config(len(live))
        server, session = SecAggServer(cfg), f"{self._run_id}/{secrets.token_hex(8)}"
        traffic = collections.Counter()
        try:
            parties = dict(enumerate(i for i, _ in live))  # protocol id -> site index
            keys = self._ask(parties, "Advertise", traffic, lambda p: {
                "session": session, "config": wire.config_to_json(cfg), "client_id": p})
            key_list = server.collect_keys([wire.advert_from_json(a) for a in keys.values()])
            uploads = self._ask(_only(parties, keys), "ShareKeys", traffic, lambda p: {
                "session": session, "keys": wire.key_list_to_json(key_list)})
            inboxes = server.route_shares([wire.upload_from_json(u) for u in uploads.values()])
            answers = self._masked_inputs(_only(parties, inboxes), state, dict(live), session, inboxes, traffic)
            if self._ddp and len(answers) < len(live):
                raise SecAggError(f"distributed DP needs the noise share of each of the round's {len(live)} sites, "
                                  f"{len(answers)} sent their masked input")
            request = server.collect_masked_inputs([wire.masked_from_json(a["masked"], cfg) for a in answers.values()])
            responses = self._unmask(_only(parties, set(request.survivors)), session, request, traffic)
            total = server.unmask([wire.response_from_json(r) for r in responses.values()])
        except SecAggError as err:
            raise WorkerLost(self._failure(str(err))) from None  # the CLI prints it in one line
        counted = [parties[p] for p in server.survivors]
        self.last_dropped += [self._clients[i].name for i, _ in live if i not in counted]
        return self._finish(state, [answers[p]["public"] for p in sorted(answers)], total, server, traffic, started)

    def _masked_inputs(self, parties, state, references, session, inboxes, traffic) -> dict:
        """Round 2: at each site, the round's computation placed on its worker, then called,
        encoded and masked by its gateway."""
        def request(p: int) -> dict:
            executor, refs = self._place(parties[p], state, references[parties[p]])
            self._executors[p] = (executor, refs)  # kept alive until the masked input arrives
            return {"session": session, "inbox": wire.inbox_to_json(inboxes[p]),
                    "executor": executor._executor_id.id, "function": refs[0].reference.id,
                    "argument": refs[1].reference.id}

        self._executors: dict[int, Any] = {}
        try:
            answers = self._ask(parties, "MaskedInput", traffic, request)
        finally:
            for executor, _ in self._executors.values():
                executor.close()
            self._executors = {}
        return {p: {"masked": a["masked"], "public": wire.unb64(a["public"], "public part")} for p, a in answers.items()}

    def _unmask(self, parties, session, request, traffic) -> dict:
        """Round 3 (a seam for tests that stop sites between rounds 2 and 3)."""
        return self._ask(parties, "Unmask", traffic, lambda p: {"session": session, "survivors": wire.request_to_json(request)})

    def _place(self, index: int, state, reference):
        """The round's computation and argument as values on site `index`'s worker."""
        from tensorflow_federated.python.core.backends.native import compiler
        from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
        from tensorflow_federated.python.core.impl.execution_contexts import async_execution_context
        from tensorflow_federated.python.core.impl.executors import remote_executor, remote_executor_grpc_stub
        from tensorflow_federated.python.core.impl.types import placements

        if not hasattr(self, "_compiled"):
            self._compiled = compiler.desugar_and_transform_to_native(self._site_round)
        executor = remote_executor.RemoteExecutor(remote_executor_grpc_stub.RemoteExecutorGrpcStub(self._channel(index)))
        executor.set_cardinalities({placements.CLIENTS: 1})
        arg = tff.structure.Struct.unnamed(tensorflow_computation.transform_args(state), [reference])

        async def place():
            function = await executor.create_value(self._compiled, self._compiled.type_signature)
            argument = await async_execution_context._ingest(executor, arg, self._compiled.type_signature.parameter)
            return function, argument

        return executor, asyncio.run(place())

    def _channel(self, index: int) -> grpc.Channel:
        if index not in self._channels:
            self._channels[index] = self._open_channel(index)
        return self._channels[index]

    def _ask(self, parties: dict[int, int], method: str, traffic, make_request) -> dict[int, Any]:
        """One protocol round at these parties, in parallel: protocol id -> parsed answer.
        Sites that cannot be reached are dropouts (added to `lost`)."""
        call = lambda p: self._call(parties[p], method, wire.dumps(make_request(p)), traffic)  # noqa: E731
        with ThreadPoolExecutor(max_workers=max(1, len(parties))) as pool:
            outcomes = dict(zip(parties, pool.map(_outcome(call), parties)))
        answers = {}
        for p, (answer, error) in outcomes.items():
            if error is None:
                answers[p] = wire.loads(answer)
            elif _is_dropout(error):
                self._lose(parties[p], method, error)
            else:
                raise _refusal(self._clients[parties[p]].name, method, error)
        return answers

    def _call(self, index: int, method: str, request: bytes, traffic) -> bytes:
        stub = self._channel(index).unary_unary(f"/{SERVICE}/{method}")
        answer = stub(request, timeout=STEP_TIMEOUT_S[method])
        traffic[method] += len(request) + len(answer)
        return answer

    def _lose(self, index: int, method: str, error: BaseException) -> None:
        self.lost.add(index)
        _log.warning("site %s stopped answering at %s (%s); secure aggregation goes on without it and later rounds "
                     "leave it out", self._clients[index].name, method, _first_line(error))

    def _failure(self, reason: str) -> str:
        names = ", ".join(self._clients[i].name for i in sorted(self.lost)) or "none"
        return (f"secure aggregation at the sites failed ({reason}; sites lost: {names}); no model update was "
                "applied: restart the sites and re-run the same run id to resume from the last checkpoint")

    def _finish(self, state, publics: list[bytes], total, server, traffic, started):
        from tensorflow_federated.python.core.impl.executors import value_serialization
        from tensorflow_federated.python.core.impl.types import type_conversions
        from tff_apps.sites.messages import pb

        public_type = self._site_round.type_signature.result[1]
        parts = []
        for raw in publics:
            value, _ = value_serialization.deserialize_value(pb.ComputeResponse.FromString(raw).value, public_type)
            parts.append(type_conversions.type_to_py_container(value, public_type))
        phase = ClientPhase(parts[0][0], parts[0][1], [], [], parts[0][2], combine_metrics([p[3] for p in parts]))
        protocol = collections.OrderedDict(
            secagg_seconds=time.perf_counter() - started, secagg_bytes=int(sum(traffic.values())),
            secagg_survivors=len(server.survivors), secagg_dropped=len(server.dropped), secagg_where="sites",
        )
        if self._ddp:  # TFF's server half of distributed DP on the unmasked sum in Z_{2^bits}
            return self._process.finish_masked(state, phase, total, secure_aggregation=protocol)
        mean, _, clipped = decode(total, self._secure)
        return self._process.finish_round(
            state, phase, self._process.rebuild(mean), state.aggregator,
            collections.OrderedDict(secure_clipped_count=clipped),
            secure_aggregation=collections.OrderedDict(**protocol, secagg_clipped_clients=clipped),
        )


def _only(parties: dict[int, int], keep) -> dict[int, int]:
    return {p: i for p, i in parties.items() if p in keep}


def _outcome(call):
    def run(p):
        try:
            return call(p), None
        except Exception as err:  # sorted by the caller: a dropout or a refusal
            return None, err

    return run


def _is_dropout(error: BaseException) -> bool:
    from tensorflow_federated.python.core.impl.executors import executors_errors

    if isinstance(error, executors_errors.RetryableError):
        return True
    return isinstance(error, grpc.RpcError) and error.code() in _DROPOUT_CODES


def _first_line(error: BaseException) -> str:
    text = error.details() if isinstance(error, grpc.RpcError) else str(error)
    return (text or type(error).__name__).splitlines()[0]


def _refusal(site: str, method: str, error: BaseException) -> Exception:
    """A site's refusal is the user's to fix (one line); anything else is an internal error."""
    if isinstance(error, grpc.RpcError) and error.code() in (
        grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
    ):
        line = _first_line(error)
        return UserError(line if line.startswith(f"site {site}") else f"site {site}: {method}: {line}")
    return error


def site_channels(cfg, sites, plan) -> Callable[[int], grpc.Channel]:
    """Site i's gateway channel for the masking service, carrying the same job descriptor as
    the job's executor calls (`connect.site_runtime`)."""
    from tff_apps.sites.certs import load_credentials
    from tff_apps.sites.channel import site_channel
    from tff_apps.sites.connect import job_descriptor, site_spends

    spends = site_spends(plan, sites)

    def channel(index: int) -> grpc.Channel:
        site = sites[index]
        credentials = load_credentials(site.ca, site.cert, site.key, what=f"job.sites site {site.name}")
        job = job_descriptor(cfg, plan.epsilon() if plan else None, spends.get(site.name))
        return site_channel(site.address, credentials, job, server_name=site.name)

    return channel


def site_process(cfg, process, open_round, clients, sites, run):
    """The job's learning process across sites: masked in each site's gateway
    (`privacy.secure_aggregation = "masked"`) or plain (`site_training.SiteProcess`)."""
    if cfg.privacy.secure_aggregation != "masked":
        from tff_apps.sites.site_training import SiteProcess

        return SiteProcess(process, open_round, clients, [site.address for site in sites], cfg.clients.quorum)
    channels = site_channels(cfg, sites, getattr(run.privacy, "plan", None))
    masked = MaskedSiteProcess(process, open_round, clients, channels, run.run_id, cfg.clients.quorum)
    if masked._ddp and hasattr(run.privacy, "mechanism_details"):  # the privacy statement says where
        run.privacy.mechanism_details["noise_added_by"] = SITE_NOISE
    return masked


SITE_NOISE = ("each site, on its own TFF worker, to its own clipped, rotated and rounded update (discrete Gaussian "
              "share from TF's unseeded sampler at the site), before its gateway masked it; the coordinator sees "
              "only the noised sum")


def masking_entry(process) -> dict[str, Any]:
    """summary.json's `masking` of a masked run across sites (nothing for a plain one)."""
    return {"masking": describe_masking(process)} if isinstance(process, MaskedSiteProcess) else {}


def describe_masking(process: MaskedSiteProcess) -> dict[str, Any]:
    """summary.json's `masking`: where the updates were masked (and noised, distributed DP)."""
    from tff_apps.privacy.secure_settings import DDP_BITS

    described = {
        "where": "at the sites: each site's gateway masked its own update before it left the site",
        "protocol": "pairwise-masked secure aggregation (Bonawitz et al., CCS 2017; shared/secagg.py) over the "
                    "gateways' mutual-TLS gRPC (tff_apps.v1.SiteMasking)",
        "coordinator_sees": "each site's masked vector (uniform in the ring) and the sum of the updates",
        "threshold_fraction": process._secure.threshold_fraction,
        "sites_lost": sorted(process._clients[i].name for i in process.lost),
    }
    if process._ddp:
        described["coordinator_sees"] = (f"each site's masked vector (uniform in Z_2^{DDP_BITS}) and the sum mod "
                                         f"2^{DDP_BITS} of the sites' noised integer vectors")
        described["noise"] = SITE_NOISE
    return described
