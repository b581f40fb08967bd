"""A site's gateway: the only way in to the site's TFF worker.

A gRPC server with mutual TLS that forwards every method of TFF's executor service
(`messages.METHODS`) to the worker's plaintext port, as raw bytes. On every call it
  - requires the job descriptor in the ``tff-apps-job`` metadata and checks it, and the
    caller's certificate name, against the site's policy (PERMISSION_DENIED, one line);
  - checks what ``Compute`` would release: no sequence (dataset) anywhere in it, and no
    more bytes than the job declared (PERMISSION_DENIED, one line);
  - appends one JSON line to the site's audit log, refusals included;
  - plays the site's part in masked secure aggregation (`site_masking`, the service
    `tff_apps.v1.SiteMasking` on the same port): the round's update is computed on the
    worker under value refs only the gateway knows, and any call naming one is refused.
Refusals use PERMISSION_DENIED (malformed descriptors INVALID_ARGUMENT) because TFF's
remote executor retries UNAVAILABLE and FAILED_PRECONDITION forever
(`executors_errors.get_grpc_retryable_error_codes`). Does not import TensorFlow.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from shared.errors import UserError
from tff_apps.runtime.worker import GRPC_CHANNEL_OPTIONS
from tff_apps.sites.certs import Credentials
from tff_apps.sites import site_masking, vertical_party
from tff_apps.sites.messages import METHODS, SERVICE, computation_hashes, named_refs, release_refusal
from tff_apps.sites.policy import BadJob, Job, Refused, SitePolicy, parse_job

JOB_METADATA = "tff-apps-job"
_CACHE_SIZE = 1024
_log = logging.getLogger(__name__)
# The job (if its descriptor parsed) and the refusal (its type and message), or None.
_Decision = tuple[Job | None, tuple[type[UserError], str] | None]


class AuditLog:
    """Append-only JSON lines, one per call; each line is flushed before the call returns."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # 0600: the log names the runs and callers this site served.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _can_listen(address: str) -> bool:
    """Whether ``host:port`` can be bound, asked before gRPC, which logs its failure to stderr."""
    host, _, port = address.rpartition(":")
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            probe.bind(sockaddr)
        return True
    except (OSError, ValueError):
        return False


def _timeout(context: grpc.ServicerContext) -> float | None:
    """The caller's deadline, passed on to the worker (none if the caller set none)."""
    remaining = context.time_remaining()
    return remaining if remaining and remaining < 1e9 else None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _first(auth: dict[str, list[bytes]], key: str) -> str:
    values = auth.get(key) or [b""]
    return values[0].decode("utf-8", "replace")


class _Call:
    """What one call carried; becomes its audit record."""

    def __init__(self, method: str, request: bytes, context: grpc.ServicerContext) -> None:
        auth = context.auth_context()
        self.common_name = _first(auth, "x509_common_name")
        self.record: dict[str, Any] = {
            "time": _now(), "method": method, "caller": _first(auth, "x509_subject") or self.common_name,
            "peer": context.peer(), "run_id": None, "app": None, "bytes_in": len(request), "bytes_out": 0,
        }
        self.metadata = dict(context.invocation_metadata()).get(JOB_METADATA)


class Gateway:
    """The site's gRPC front: mTLS in, policy checks, audit, plaintext out to the worker.

    ``upstream`` is the worker's gRPC target (``unix:/path`` through the isolation relay,
    or ``localhost:PORT``). ``start()`` returns the bound port (``port=0`` picks one).
    """

    def __init__(
        self,
        *,
        policy: SitePolicy,
        credentials: Credentials,
        upstream: str,
        audit_path: Path | str,
        port: int,
        host: str = "[::]",
        max_workers: int = 16,
        budget=None,
        party=None,
    ) -> None:
        self.policy = policy
        self._budget = budget  # site_budget.SiteBudget with `[policy] lifetime_epsilon`
        self._credentials = credentials
        self._upstream_target = upstream
        self._audit_path = Path(audit_path)
        self._address = f"{host}:{port}"
        self._max_workers = max_workers
        self._decisions: dict[tuple[str, str], _Decision] = {}
        self._decisions_lock = threading.Lock()
        self._server: grpc.Server | None = None
        self._channel: grpc.Channel | None = None
        self._audit: AuditLog | None = None
        self._upstream: dict[str, Any] = {}
        self._private_refs: set[str] = set()  # the masked rounds' values: no caller may name them
        self._masking: site_masking.MaskingService | None = None
        self._party = party  # vertical_party.VerticalPartyService at a vertical-FL party's site

    def start(self) -> int:
        if not _can_listen(self._address):
            raise UserError(
                f"site serve --port: cannot listen on {self._address} "
                "(the port is in use or the host is not this machine's)"
            )
        self._audit = AuditLog(self._audit_path)
        self._channel = grpc.insecure_channel(self._upstream_target, GRPC_CHANNEL_OPTIONS)
        # No serializers: requests and responses pass through as the bytes the peers sent.
        self._upstream = {m: self._channel.unary_unary(f"/{SERVICE}/{m}") for m in METHODS}
        self._masking = site_masking.MaskingService(self.policy.site, self._upstream, self._private_refs)
        services = {SERVICE: (METHODS, None), site_masking.SERVICE: (site_masking.METHODS, "SiteMasking")}
        if self._party is not None:
            services[vertical_party.SERVICE] = (vertical_party.METHODS, "VerticalParty")
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="site-gateway"),
            handlers=[
                grpc.method_handlers_generic_handler(
                    name, {m: grpc.unary_unary_rpc_method_handler(self._handler(m, service)) for m in methods})
                for name, (methods, service) in services.items()
            ],
            # gRPC sets SO_REUSEPORT by default: a second process could then share (and
            # answer on) the gateway's port. Off, a port in use is an error instead.
            options=[*GRPC_CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)],
        )
        try:
            port = self._server.add_secure_port(self._address, self._credentials.server())
        except RuntimeError:
            port = 0
        if not port:  # taken since the probe above
            self.stop()
            raise UserError(f"site serve --port: cannot listen on {self._address} (the port was taken meanwhile)")
        self._server.start()
        return port

    def stop(self, grace: float = 2.0) -> None:
        """Lets calls in flight finish for ``grace`` seconds, then closes everything; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait()
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        audit, self._audit = self._audit, None
        if audit is not None:
            audit.close()

    def __enter__(self) -> Gateway:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one call ----------------------------------------------------------

    def _handler(self, method: str, service: str | None):
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            return self._serve(method, request, context, service)

        return handle

    def _serve(self, method: str, request: bytes, context: grpc.ServicerContext, service: str | None) -> bytes:
        """`service`: None for TFF's executor methods, else the site's own protocol service."""
        call = _Call(f"{service}.{method}" if service else method, request, context)
        try:
            forward = {None: self._forward, "SiteMasking": self._mask, "VerticalParty": self._vertical}[service]
            response = forward(method, request, call, context)
        except Refused as err:
            self._abort(context, call, grpc.StatusCode.PERMISSION_DENIED, str(err))
        except BadJob as err:
            self._abort(context, call, grpc.StatusCode.INVALID_ARGUMENT, f"site {self.policy.site}: {err}")
        except grpc.RpcError as err:  # the worker's own error, passed on as it came
            self._abort(context, call, err.code(), err.details() or "", status="worker_error")
        except DecodeError:
            self._abort(context, call, grpc.StatusCode.INVALID_ARGUMENT,
                        f"site {self.policy.site}: the {method} message is not a valid TFF executor message")
        except Exception as err:  # the site protocols' own refusals; anything else is a bug
            code = site_masking.refusal_code(err) or vertical_party.refusal_code(err)
            if code is None:
                raise
            self._abort(context, call, getattr(grpc.StatusCode, code), f"site {self.policy.site}: {err}")
        self._write(call.record, status="ok")
        return response

    def _forward(self, method: str, request: bytes, call: _Call, context: grpc.ServicerContext) -> bytes:
        job = self._admit(call)
        if self._budget is not None:
            self._spend_budget(method, job, context)
        if method == "CreateValue":
            hashes = computation_hashes(request)
            if hashes:
                call.record["computation_sha256"] = hashes
        elif self._private_refs and set(named_refs(method, request)) & self._private_refs:
            raise Refused(f"site {self.policy.site}: the {method} call names a value of a masked round; "
                          "only its masked form leaves the site")
        response = self._upstream[method](request, timeout=_timeout(context))
        call.record["bytes_out"] = len(response)
        if method == "Compute":
            reason = release_refusal(response, job.max_value_bytes)
            if reason:
                call.record["bytes_out"] = 0  # refused: nothing left the site
                raise Refused(f"site {self.policy.site}: {reason}")
        return response

    def _mask(self, method: str, request: bytes, call: _Call, context: grpc.ServicerContext) -> bytes:
        """A step of masked secure aggregation, played by the site (`site_masking`)."""
        job = self._admit(call)
        if self._budget is not None:
            self._spend_budget("Compute" if method == "MaskedInput" else method, job, context)
        response = self._masking.handle(method, request, job, _timeout(context))
        call.record["bytes_out"] = len(response)
        return response

    def _vertical(self, method: str, request: bytes, call: _Call, context: grpc.ServicerContext) -> bytes:
        """A vertical-FL party's PSI or alignment step, played by the site (`vertical_party`)."""
        job = self._admit(call)
        response = self._party.handle(method, request, job, _timeout(context))
        call.record["bytes_out"] = len(response)
        return response

    def _spend_budget(self, method: str, job: Job, context: grpc.ServicerContext) -> None:
        """Admission checks the site's own budget and tells the coordinator what remains; the
        first computation books the job's spend."""
        from tff_apps.sites.site_budget import BUDGET_METADATA, budget_json

        if method == "GetExecutor":
            context.set_trailing_metadata(((BUDGET_METADATA, budget_json(self._budget.check(job))),))
        elif method in ("CreateValue", "CreateCall", "Compute"):
            self._budget.reserve(job)

    def _admit(self, call: _Call) -> Job:
        """The call's job if the policy admits it; decisions are cached per descriptor and caller."""
        if call.metadata is None:
            raise Refused(
                f"site {self.policy.site}: the call carries no {JOB_METADATA} metadata "
                "(connect with tff_apps.sites.channel.site_channel)"
            )
        key = (call.metadata, call.common_name)
        with self._decisions_lock:
            decision = self._decisions.get(key)
        if decision is None:
            decision = self._decide(call.metadata, call.common_name)
            with self._decisions_lock:
                if len(self._decisions) >= _CACHE_SIZE:
                    self._decisions.clear()
                self._decisions[key] = decision
        job, refusal = decision
        if job is not None:  # refused calls are logged under their run too
            call.record.update(run_id=job.run_id, app=job.app)
        if refusal is not None:
            kind, message = refusal
            raise kind(message)  # a new exception each time: a cached one would grow its traceback
        return job

    def _decide(self, metadata: str, common_name: str) -> _Decision:
        try:
            job = parse_job(metadata)
        except BadJob as err:
            return None, (BadJob, str(err))
        try:
            self.policy.check_caller(common_name)
            self.policy.check(job)
        except Refused as err:
            return job, (Refused, str(err))
        return job, None

    def _abort(self, context, call: _Call, code: grpc.StatusCode, details: str, status: str = "refused") -> None:
        call.record["reason"] = details
        self._write(call.record, status=status)
        context.abort(code, details)  # raises

    def _write(self, record: dict[str, Any], status: str) -> None:
        record["status"] = status
        audit = self._audit
        if audit is None:  # stopping: the call is still answered, the log is closed
            _log.warning("audit log closed; not recorded: %s", record)
            return
        try:
            audit.write(record)
        except ValueError:  # closed between the check and the write
            _log.warning("audit log closed; not recorded: %s", record)
