"""`tff-apps site serve`: one site in the foreground, its TFF worker behind its gateway,
until SIGTERM/SIGINT; then both stop and no process is left. Does not import TensorFlow.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import IO

import grpc

from shared.errors import UserError
from tff_apps.runtime.worker import GRPC_CHANNEL_OPTIONS, STARTUP_TIMEOUT_S, grpc_ready
from tff_apps.sites.certs import load_credentials
from tff_apps.sites.gateway import Gateway
from tff_apps.sites.isolation import SiteWorker, StartInterrupted, start_site_worker
from tff_apps.sites.policy import SitePolicy

_WHERE = {"netns": "in a private network namespace, reachable only through the gateway",
          "none": "in the host's network namespace, listening on every interface without TLS"}


def site_budget(policy: SitePolicy, audit_path: Path | str):
    """With `[policy] lifetime_epsilon`: the site's own ledger, beside its audit log."""
    if not policy.lifetime_epsilon:
        return None
    from tff_apps.sites.site_budget import SiteBudget

    return SiteBudget(Path(audit_path).with_name(f"{policy.site}-privacy-ledger.sqlite"), policy.site, policy.lifetime_epsilon)


def serve_site(
    data_dir: Path | str,
    port: int,
    certs: tuple[Path | str, Path | str, Path | str],
    policy: SitePolicy,
    audit_path: Path | str,
    host: str = "[::]",
    *,
    isolation: str = "netns",
    log_path: Path | str | None = None,
) -> int:
    """Runs the site: the worker in ``data_dir``, the gateway on ``host:port`` with mTLS.

    ``certs`` are the paths of the CA, the site's certificate and its key. Prints
    ``site NAME listening on HOST:PORT (worker pid N, ...)`` once both accept calls;
    returns 0 after SIGTERM/SIGINT, 1 if the worker exits by itself. Mistakes in the
    inputs are one-line UserErrors.
    """
    data = _checked_inputs(data_dir, port)
    credentials = load_credentials(*certs, what=f"site {policy.site} --certs")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    worker: SiteWorker | None = None
    gateway: Gateway | None = None
    try:
        try:
            worker = _start_worker(data, isolation, log_path, stop)
        except StartInterrupted:
            return 0
        gateway = Gateway(policy=policy, credentials=credentials, upstream=worker.target,
                          audit_path=audit_path, port=port, host=host, budget=site_budget(policy, audit_path),
                          party=party_service(data, policy.site))
        bound = gateway.start()
        _check_upstream(worker)
        print(f"site {policy.site} listening on {host}:{bound} (worker pid {worker.pid}, "
              f"{_WHERE[worker.isolation]})", flush=True)
        return _watch(worker, stop)
    finally:
        try:
            if gateway is not None:
                gateway.stop()
        finally:
            try:
                if worker is not None:
                    worker.stop()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def party_service(data: Path, site: str):
    """At a vertical-FL party's site (an app with `site_party`): its PSI and alignment steps."""
    import json

    from tff_apps.registry import load_app
    from tff_apps.sites.vertical_party import VerticalPartyService

    path = data / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if "role" not in manifest:  # a horizontal site: no party steps (and no app import here)
        return None
    open_party = getattr(load_app(manifest.get("app", "")), "site_party", None)
    return VerticalPartyService(site, open_party(data)) if open_party is not None else None


def _checked_inputs(data_dir: Path | str, port: int) -> Path:
    if not 0 < port < 65536:
        raise UserError(f"site serve --port {port}: expected a port number in 1..65535")
    data = Path(data_dir).resolve()
    if not data.is_dir():
        raise UserError(f"site serve --data {data_dir}: not a folder; give the folder holding the site's prepared data")
    return data


def _start_worker(data: Path, isolation: str, log_path: Path | str | None, stop: threading.Event) -> SiteWorker:
    log: IO[bytes] | None = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")  # noqa: SIM115 -- the worker keeps its own descriptor
    try:
        return start_site_worker(data, isolation, log=log, stop=stop)
    finally:
        if log is not None:
            log.close()


def _check_upstream(worker: SiteWorker) -> None:
    """The worker answers gRPC where the gateway will call it (through the relay, if any)."""
    with grpc.insecure_channel(worker.target, GRPC_CHANNEL_OPTIONS) as channel:
        if not grpc_ready(channel, timeout=STARTUP_TIMEOUT_S):
            raise RuntimeError(f"TFF worker_binary (pid {worker.pid}) does not answer gRPC at {worker.target}")


def _watch(worker: SiteWorker, stop: threading.Event) -> int:
    while not stop.wait(0.2):
        code = worker.process.poll()
        if code is not None:
            print(f"error: worker_binary (pid {worker.pid}) exited with code {code}; run with --log FILE "
                  "to see its output", file=sys.stderr, flush=True)
            return 1
    return 0
