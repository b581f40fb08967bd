"""The site's part in masked secure aggregation: the gateway plays the client role of the
protocol in `shared/secagg.py` (Bonawitz et al.) for its site, so the site's model update
leaves the site only masked.

The coordinator is the protocol's server. It calls four methods of the gRPC service
`tff_apps.v1.SiteMasking` on the site's gateway (the same mutual-TLS port, policy, audit
log and job descriptor as the TFF executor calls), each request and answer one JSON message
(`shared.secagg_wire`):

  Advertise    {session, config, client_id}      -> the site's two public keys (round 0)
  ShareKeys    {session, keys}                   -> its encrypted Shamir shares (round 1)
  MaskedInput  {session, inbox, executor, function, argument}
                                                 -> its masked input and the round's public part (round 2)
  Unmask       {session, survivors}              -> its shares for the server (round 3)

How the update reaches the masking code without leaving the site (MaskedInput): the
coordinator has put the round's computation and its argument on the site's worker with
ordinary `CreateValue` calls, and names the two value refs. The gateway itself makes the call
(`CreateCall`), selects the result's two parts (`CreateSelection`): element 0, the site's
encoded update (one float64 vector, CLIENTS-placed), and element 1, the public rest (training
metrics, the distributor's and client work's state), computes both on the worker over its
private channel, and disposes of the three values. The result's refs are never sent to the
coordinator, and any executor call that names one of them is refused (`Gateway`), so the
update is read only here, masked with `SecAggClient.masked_input`, and only the masked
vector leaves. The public part passes the same release checks as any `Compute` result.

Secrets (the X25519 keys, b_u, the shares held for other sites) live in this process's
memory only, per session, and are dropped once the site has answered the unmask request.
Does not import TensorFlow.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared import secagg_wire as wire
from shared.errors import UserError
from shared.secagg_client import SecAggClient
from shared.secagg_ring import SecAggError
from tff_apps.sites.messages import pb, release_refusal, update_vector
from tff_apps.sites.policy import Job, Refused

SERVICE = "tff_apps.v1.SiteMasking"
METHODS = ("Advertise", "ShareKeys", "MaskedInput", "Unmask")
MAX_SESSIONS = 64  # rounds in flight per gateway; the oldest is forgotten first


class ProtocolError(RuntimeError):
    """A request out of order or inconsistent with the session: FAILED_PRECONDITION."""


@dataclass
class _Session:
    run_id: str
    client: SecAggClient
    lock: threading.Lock = field(default_factory=threading.Lock)


class MaskingService:
    """The protocol's client role for one site. `upstream[method](request_bytes, timeout)`
    calls the site's worker (the gateway's private channel); `private_refs` is the gateway's
    set of value refs no caller may name."""

    def __init__(self, site: str, upstream: dict[str, Callable[..., bytes]], private_refs: set[str]) -> None:
        self._site = site
        self._upstream = upstream
        self._private = private_refs
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._lock = threading.Lock()

    def handle(self, method: str, request: bytes, job: Job, timeout: float | None) -> bytes:
        """One call; raises wire.WireError / UserError (bad request), ProtocolError, SecAggError."""
        body = wire.loads(request, "session")
        if method == "Advertise":
            return self._advertise(body, job)
        session = self._session(body["session"], job)
        with session.lock:
            if method == "ShareKeys":
                upload = session.client.share_keys(wire.key_list_from_json(body.get("keys")))
                return wire.dumps(wire.upload_to_json(upload))
            if method == "MaskedInput":
                return self._masked_input(session, body, job, timeout)
            response = session.client.unmask(wire.request_from_json(body.get("survivors")))
            self._forget(body["session"])  # answered once: the shares held for others are gone
            return wire.dumps(wire.response_to_json(response))

    def _advertise(self, body: dict[str, Any], job: Job) -> bytes:
        cfg = wire.config_from_json(body.get("config"))
        client = SecAggClient(int(body.get("client_id", -1)), cfg)  # keys from os.urandom, never a seed
        with self._lock:
            if body["session"] in self._sessions:
                raise ProtocolError(f"site {self._site}: session {body['session']!r} already exists")
            while len(self._sessions) >= MAX_SESSIONS:
                self._sessions.popitem(last=False)
            self._sessions[body["session"]] = _Session(job.run_id, client)
        return wire.dumps(wire.advert_to_json(client.advertise_keys()))

    def _session(self, name: str, job: Job) -> _Session:
        with self._lock:
            session = self._sessions.get(name)
        if session is None or session.run_id != job.run_id:
            raise ProtocolError(f"site {self._site}: no secure-aggregation session {name!r} for run {job.run_id}")
        return session

    def _forget(self, name: str) -> None:
        with self._lock:
            self._sessions.pop(name, None)

    def _masked_input(self, session: _Session, body: dict[str, Any], job: Job, timeout: float | None) -> bytes:
        if not isinstance(body.get("inbox"), dict):
            raise wire.WireError("masked input: the message has no share inbox")
        inbox = wire.inbox_from_json(body["inbox"])
        update, public = self._run_round(body, job, timeout)
        masked = session.client.masked_input(update, inbox)
        return wire.dumps({"masked": wire.masked_to_json(masked), "public": wire.b64(public)})

    def _run_round(self, body: dict[str, Any], job: Job, timeout: float | None) -> tuple[np.ndarray, bytes]:
        """Calls the round's computation on the worker and reads its two parts; the update
        never leaves this function but as the vector returned to the masking code."""
        executor = pb.ExecutorId(id=str(body.get("executor", "")))
        call = pb.CreateCallRequest(executor=executor, function_ref=pb.ValueRef(id=str(body.get("function", ""))),
                                    argument_ref=pb.ValueRef(id=str(body.get("argument", ""))))
        result = self._call("CreateCall", call, pb.CreateCallResponse, timeout).value_ref
        refs = [result]
        try:
            self._private.add(result.id)
            parts = []
            for index in (0, 1):
                selection = pb.CreateSelectionRequest(executor=executor, source_ref=result, index=index)
                ref = self._call("CreateSelection", selection, pb.CreateSelectionResponse, timeout).value_ref
                self._private.add(ref.id)
                refs.append(ref)
                compute = pb.ComputeRequest(executor=executor, value_ref=ref)
                parts.append(self._upstream["Compute"](compute.SerializeToString(), timeout=timeout))
        finally:
            dispose = pb.DisposeRequest(executor=executor, value_ref=refs)
            self._upstream["Dispose"](dispose.SerializeToString(), timeout=timeout)
        update = update_vector(parts[0])
        if update is None:
            raise Refused(f"site {self._site}: the round's first part is not one float vector at the site; "
                          "nothing to mask")
        reason = release_refusal(parts[1], job.max_value_bytes)
        if reason:
            raise Refused(f"site {self._site}: {reason}")
        return update, parts[1]

    def _call(self, method: str, message: Any, response_type: Any, timeout: float | None) -> Any:
        return response_type.FromString(self._upstream[method](message.SerializeToString(), timeout=timeout))


def refusal_code(err: Exception) -> str | None:
    """The gRPC status name for an error of `handle`, or None if it is not one of its own."""
    if isinstance(err, (wire.WireError, UserError)):
        return "INVALID_ARGUMENT"
    if isinstance(err, (ProtocolError, SecAggError)):
        return "FAILED_PRECONDITION"
    return None
