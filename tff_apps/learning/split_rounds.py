"""Learning rounds split in three, so that the aggregation step can run in Python.

TFF's C++ worker cannot call back into Python, so a process whose aggregation is not a TFF
aggregator splits each round (`SplitRoundProcess`):

1. client phase, a TFF computation: broadcast + client work, exactly the parts
   `compose_learning_process` composes. It returns the clients' model updates and weights as
   CLIENTS-placed values, which the execution context hands to Python as one value per
   participating client, in the order of the round's datasets.
2. aggregation, in Python (the subclass's `aggregate`): `secure_rounds.MaskedLearningProcess`
   runs a pairwise-masked secure sum; `RobustLearningProcess` (here) a coordinate-wise median
   or trimmed mean, or the job's own TFF aggregator on per-client values it may have altered
   (the bad-client mode "scaled_update").
3. server phase, a TFF computation: the finalizer (server optimizer) applied to the aggregate.

State and metrics are shaped like `compose_learning_process`'s: a `LearningAlgorithmState`
and metrics with `distributor`, `client_work`, `aggregator`, `finalizer` (plus the
subclass's extra entries), so `round_loop.train_metrics` and checkpoints work unchanged.

[robustness] (`federation.RobustnessSection`):
- median / trimmed_mean are coordinate-wise over the round's participating clients and
  UNWEIGHTED (every client counts once, whatever its number of examples): a weight would let
  one client that claims many examples move the statistic. trimmed_mean drops
  floor(trim_fraction * n) values per side and coordinate, then averages the rest.
- bad_client_mode "scaled_update": the update of each bad client (the first `bad_clients`
  of the federation's clients, `federation.bad_client_names`) is multiplied by
  `bad_update_scale` before aggregation; with aggregation "mean" or "clip_zero" the job's TFF
  aggregator then runs as its own federated computation on the per-client values, its state
  kept in the state's aggregator slot, so TFF's clipping and zeroing see the scaled update.
"""

from __future__ import annotations

import collections
import collections.abc
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow_federated as tff

from tff_apps.learning import optimizers
from tff_apps.learning import client_works
from tff_apps.learning import aggregators
from tff_apps.learning.federation import Federation, bad_client_names, trimmed_count

LearningAlgorithmState = tff.learning.templates.LearningAlgorithmState
LearningProcessOutput = tff.learning.templates.LearningProcessOutput

PYTHON_AGGREGATIONS = ("median", "trimmed_mean")


@dataclass
class ClientPhase:
    """What the client phase of a round hands back to Python."""

    distributor_state: Any
    client_work_state: Any
    updates: list  # one model update per client (TFF's element order), in data order
    weights: list  # one update weight per client
    distributor_metrics: Any
    client_work_metrics: Any


class SplitRoundProcess:
    """A learning process (`initialize` / `next` / `get_model_weights`, as `round_loop.run_rounds`
    uses it) whose round is client phase (TFF), aggregation (Python), server phase (TFF).

    `aggregator`: a TFF aggregation process whose state lives in the state's aggregator slot
    (None: the slot is empty, the Python aggregation keeps no state between rounds)."""

    def __init__(self, initial_model_weights_fn, distributor, client_work, finalizer, aggregator=None):
        self._finalizer = finalizer
        self._aggregator = aggregator
        weights_type = initial_model_weights_fn.type_signature.result
        self._trainable_type = weights_type.trainable
        data_type = client_work.next.type_signature.parameter[2]

        @tff.federated_computation()
        def init_fn():
            return tff.federated_zip(
                LearningAlgorithmState(
                    tff.federated_eval(initial_model_weights_fn, tff.SERVER),
                    distributor.initialize(),
                    client_work.initialize(),
                    aggregator.initialize() if aggregator is not None else tff.federated_value((), tff.SERVER),
                    finalizer.initialize(),
                )
            )

        @tff.federated_computation(init_fn.type_signature.result, data_type)
        def client_phase(state, client_data):
            distributed = distributor.next(state.distributor, state.global_model_weights)
            work = client_work.next(state.client_work, distributed.result, client_data)
            return (
                distributed.state,
                work.state,
                work.result.update,  # CLIENTS-placed: one value per client, in data order
                work.result.update_weight,
                distributed.measurements,
                work.measurements,
            )

        self._init_fn = init_fn
        self._client_phase = client_phase

    def initialize(self):
        return self._init_fn()

    def get_model_weights(self, state) -> tff.learning.models.ModelWeights:
        return state.global_model_weights

    def run_client_phase(self, state, client_data: Sequence[Any]) -> ClientPhase:
        n = len(client_data)
        dist_state, work_state, updates, weights, dist_metrics, work_metrics = self._client_phase(
            state, list(client_data)
        )
        return ClientPhase(
            dist_state, work_state, _per_client(updates, n), _per_client(weights, n), dist_metrics, work_metrics
        )

    def finish_round(
        self, state, phase: ClientPhase, update, aggregator_state, aggregator_metrics, **extra_metrics
    ) -> LearningProcessOutput:
        """The server phase: the finalizer applies `update` (the model's trainable structure)."""
        finalized = self._finalizer.next(state.finalizer, state.global_model_weights, update)
        new_state = LearningAlgorithmState(
            finalized.result, phase.distributor_state, phase.client_work_state, aggregator_state, finalized.state
        )
        metrics = collections.OrderedDict(
            distributor=phase.distributor_metrics,
            client_work=phase.client_work_metrics,
            aggregator=aggregator_metrics,
            finalizer=finalized.measurements,
            **extra_metrics,
        )
        return LearningProcessOutput(new_state, metrics)

    def rebuild(self, flat: np.ndarray):
        """A flat vector as the float32 structure of the model's trainable weights."""
        return _rebuild(self._trainable_type, flat)


# -- robust aggregation and bad clients -----------------------------------------------------------


def coordinate_median(vectors: np.ndarray) -> np.ndarray:
    """Per coordinate, the median of the clients' values (rows = clients)."""
    return np.median(vectors, axis=0)


def coordinate_trimmed_mean(vectors: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Per coordinate, the mean of the clients' values without the `trimmed_count` smallest and
    largest (rows = clients)."""
    k = trimmed_count(trim_fraction, len(vectors))
    ordered = np.sort(vectors, axis=0)
    return ordered[k : len(vectors) - k].mean(axis=0)


def scale_update(update, scale: float):
    """A client's update (nested lists / mappings of arrays) multiplied by `scale`, same structure."""
    if isinstance(update, collections.abc.Mapping):
        return collections.OrderedDict((k, scale_update(v, scale)) for k, v in update.items())
    if isinstance(update, (list, tuple)):
        return [scale_update(v, scale) for v in update]
    array = np.asarray(update)
    return (array * scale).astype(array.dtype)


class RobustLearningProcess(SplitRoundProcess):
    """[robustness] rounds: a coordinate-wise median or trimmed mean of the clients' updates, or
    the job's TFF aggregator (`aggregator`, used for "mean" and "clip_zero") on updates of which
    the bad clients' are scaled (module docstring)."""

    wants_client_names = True  # round_loop.next_round passes the round's client names

    def __init__(
        self,
        initial_model_weights_fn,
        distributor,
        client_work,
        finalizer,
        *,
        aggregation: str,
        trim_fraction: float = 0.0,
        bad_clients: Collection[str] = (),
        bad_update_scale: float = 1.0,
        aggregator=None,
    ):
        python_side = aggregation in PYTHON_AGGREGATIONS
        if python_side == (aggregator is not None):
            raise ValueError(f"aggregation {aggregation!r} needs {'no' if python_side else 'a'} TFF aggregator")
        super().__init__(initial_model_weights_fn, distributor, client_work, finalizer, aggregator)
        self.aggregation = aggregation
        self.trim_fraction = float(trim_fraction)
        self.bad_clients = frozenset(bad_clients)
        self.bad_update_scale = float(bad_update_scale)

    def next(self, state, client_data: Sequence[Any], client_names: Sequence[str] | None = None):
        client_data = list(client_data)
        names = list(client_names) if client_names is not None else [None] * len(client_data)
        if len(names) != len(client_data):
            raise ValueError(f"{len(names)} client names for {len(client_data)} datasets")
        phase = self.run_client_phase(state, client_data)
        bad = [name in self.bad_clients for name in names]
        updates = [scale_update(u, self.bad_update_scale) if b else u for u, b in zip(phase.updates, bad)]
        robustness = collections.OrderedDict(bad_clients_in_round=int(sum(bad)))
        if self._aggregator is not None:
            # the job's own TFF aggregator as a federated computation on per-client values
            output = self._aggregator.next(state.aggregator, updates, phase.weights)
            return self.finish_round(
                state, phase, output.result, output.state, output.measurements, robustness=robustness
            )
        update, metrics = self.python_aggregate(updates)
        return self.finish_round(state, phase, update, state.aggregator, metrics, robustness=robustness)

    def python_aggregate(self, updates: list):
        """(the coordinate-wise median or trimmed mean of `updates`, the aggregator's metrics)."""
        vectors = np.stack([np.concatenate([a.astype(np.float64).ravel() for a in flatten_update(u)]) for u in updates])
        if self.aggregation == "median":
            aggregate, trimmed = coordinate_median(vectors), 0
        else:
            aggregate = coordinate_trimmed_mean(vectors, self.trim_fraction)
            trimmed = trimmed_count(self.trim_fraction, len(vectors))
        return self.rebuild(aggregate), collections.OrderedDict(clients=len(vectors), trimmed_per_side=trimmed)


def build(
    train, model_fn, federation: Federation, client_names: Sequence[str], aggregator_factory=None
) -> RobustLearningProcess:
    """The [robustness] process of a job without DP or secure aggregation (the checks in
    `federation.check_robustness` refuse those). `client_names`: the federation's clients in
    order (the first `bad_clients` are bad); `aggregator_factory`: the TFF aggregator for
    "mean" / "clip_zero" (default: the job's, `aggregators.job_aggregator`)."""
    section = federation.robustness
    scaled = section.bad_clients > 0 and section.bad_client_mode == "scaled_update"
    if scaled and len(client_names) <= section.bad_clients:
        raise ValueError(f"scaled bad updates need the federation's client names, got {list(client_names)}")

    @tff.tensorflow.computation
    def initial_model_weights():
        return tff.learning.models.ModelWeights.from_model(model_fn())

    weights_type = initial_model_weights.type_signature.result
    aggregator = None
    if section.aggregation not in PYTHON_AGGREGATIONS:
        factory = aggregator_factory or aggregators.job_aggregator(train, federation)
        aggregator = factory.create(weights_type.trainable, tff.TensorType(np.float32))
    return RobustLearningProcess(
        initial_model_weights,
        tff.learning.templates.build_broadcast_process(weights_type),
        client_works.client_work(train, model_fn),
        tff.learning.templates.build_apply_optimizer_finalizer(optimizers.server_optimizer(train), weights_type),
        aggregation=section.aggregation,
        trim_fraction=section.trim_fraction,
        bad_clients=bad_client_names(federation, client_names) if scaled else (),
        bad_update_scale=section.bad_update_scale,
        aggregator=aggregator,
    )


# -- per-client values as numpy -------------------------------------------------------------------


def flatten_update(value) -> list[np.ndarray]:
    """A client's update (nested lists / mappings of arrays, in TFF's element order) as arrays."""
    if isinstance(value, collections.abc.Mapping):
        return [a for v in value.values() for a in flatten_update(v)]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in flatten_update(v)]
    return [np.asarray(value)]


def _rebuild(type_spec, flat: np.ndarray):
    """The float32 structure of `type_spec` (the model's trainable weights) from a flat vector."""
    offset = 0

    def build_part(t):
        nonlocal offset
        if isinstance(t, tff.TensorType):
            size = int(np.prod(t.shape, dtype=np.int64))
            array = flat[offset : offset + size].reshape(t.shape).astype(t.dtype)
            offset += size
            return array
        names = [name for name, _ in tff.structure.iter_elements(t)]
        members = [build_part(member) for member in t]
        if names and all(names):
            return collections.OrderedDict(zip(names, members))
        return members

    result = build_part(type_spec)
    if offset != flat.size:
        raise RuntimeError(f"the aggregation returned {flat.size} values, the model has {offset}")
    return result


def _per_client(value, n: int) -> list:
    """The execution context returns a CLIENTS-placed value as a list (one per client)."""
    if not isinstance(value, list) or len(value) != n:
        raise RuntimeError(f"client phase returned {type(value).__name__} for {n} clients, expected a list of {n}")
    return value
