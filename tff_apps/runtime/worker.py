"""TFF's C++ worker binary as a process we own: started on a free port, tied to our lifetime
(PR_SET_PDEATHSIG, signals, atexit) and stopped on exit; `serve_worker` runs one in the
foreground for `tff-apps worker`. Does not import TensorFlow.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO

import grpc

from shared.errors import UserError

_log = logging.getLogger(__name__)


def worker_binary() -> Path:
    """TFF's C++ worker executable, found without importing TensorFlow."""
    spec = importlib.util.find_spec("tensorflow_federated")
    if spec is None or spec.origin is None:
        raise RuntimeError("tensorflow_federated is not installed")
    return Path(spec.origin).parent / "data" / "worker_binary"


WORKER_BINARY = worker_binary()


# Same limits as TFF's `executor_factory.GRPC_CHANNEL_OPTIONS`: model weights
# and client data travel in single messages.
_GRPC_MAX_MESSAGE_LENGTH_BYTES = 2 * 1000 * 1000 * 1000


GRPC_CHANNEL_OPTIONS = [
    ("grpc.max_message_length", _GRPC_MAX_MESSAGE_LENGTH_BYTES),
    ("grpc.max_receive_message_length", _GRPC_MAX_MESSAGE_LENGTH_BYTES),
    ("grpc.max_send_message_length", _GRPC_MAX_MESSAGE_LENGTH_BYTES),
]


STARTUP_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.02
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


# Sets PR_SET_PDEATHSIG in a fresh single-threaded process, then becomes the worker binary
# (the setting survives execve). Doing it in a preexec_fn instead runs Python code between
# fork and exec in a copy of our many-threaded TensorFlow process, which Python documents as
# unsafe, and it did crash there (a SIGSEGV in the forked child under load).
_PDEATHSIG_EXEC = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    f"if libc.prctl({_PR_SET_PDEATHSIG}, {int(signal.SIGKILL)}, 0, 0, 0) != 0:\n"
    "    sys.exit('prctl(PR_SET_PDEATHSIG) failed: errno %d' % ctypes.get_errno())\n"
    "if os.getppid() != int(sys.argv[1]):  # the owner died before prctl took effect\n"
    "    os._exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _tied_to_us(args: list[str]) -> list[str]:
    """`args` run so that the kernel SIGKILLs the process when the calling thread's process
    dies: the one path no Python code of ours sees (we are SIGKILLed). Linux only."""
    if not sys.platform.startswith("linux"):
        return args
    return [sys.executable, "-S", "-c", _PDEATHSIG_EXEC, str(os.getpid()), *args]


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, wait, then SIGKILL; always reaps so no zombie is left."""
    try:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        # Also reached if a second Ctrl-C/SIGTERM interrupts the wait above.
        if process.poll() is None:
            process.kill()
            process.wait()


def start_worker(
    port: int, *, max_concurrent_computation_calls: int = -1, log: IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    """Starts TFF's ``worker_binary`` on ``port``; the caller owns (and must stop) it.

    The binary listens on every interface (``[::]:port``), plain gRPC without
    TLS. It never gets our stdout/stderr (a worker holding them is exactly
    what makes ``cmd | tail`` hang): its output goes to ``log`` or nowhere.
    The kernel SIGKILLs it if the calling thread's process dies.
    """
    args = [
        str(WORKER_BINARY),
        f"--port={port}",
        f"--max_concurrent_computation_calls={max_concurrent_computation_calls}",
    ]
    return subprocess.Popen(
        _tied_to_us(args),
        stdin=subprocess.DEVNULL,
        stdout=log if log is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        # Own process group: a terminal Ctrl-C is ours to handle (the code may
        # catch it and go on); the worker is stopped by its owner, or by
        # PDEATHSIG if the owner dies.
        process_group=0,
    )


def _port_is_free(port: int) -> bool:
    """True if nothing listens on ``port`` (the worker binds ``[::]:port``)."""
    for family, address in ((socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                # as gRPC binds: connections of a stopped worker in TIME_WAIT do not hold the port,
                # a live listener does
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
            return True
        except OSError as err:
            if family == socket.AF_INET6 and err.errno != errno.EADDRINUSE:
                continue  # no IPv6 on this machine: ask IPv4
            return False
    return False


def grpc_ready(channel: grpc.Channel, timeout: float) -> bool:
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return True
    except grpc.FutureTimeoutError:
        return False


def serve_worker(port: int, host: str = "127.0.0.1", log_path: Path | None = None) -> int:
    """``tff-apps worker``: runs one worker in the foreground until SIGTERM/SIGINT.

    Prints ``worker listening on host:port`` once it accepts gRPC; a signal stops
    the worker and returns 0. A port already in use is a UserError. Returns 1 if
    the worker exits by itself.
    """
    if not 0 < port < 65536:
        raise UserError(f"worker --port {port}: expected a port number in 1..65535")
    if not _port_is_free(port):
        raise UserError(f"worker --port {port}: the port is already in use")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    log: IO[bytes] | None = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")  # noqa: SIM115 -- closed right after Popen
    process: subprocess.Popen[bytes] | None = None
    try:
        try:
            process = start_worker(port, log=log)
        finally:
            if log is not None:
                log.close()
        see_log = f"; see {log_path}" if log_path else "; run with --log FILE to see its output"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        announced = False
        while not stop.is_set():
            code = process.poll()
            if code is not None:
                print(f"error: worker_binary (pid {process.pid}) on port {port} exited with code {code}{see_log}",
                      file=sys.stderr, flush=True)
                return 1
            if not announced:
                if port_accepts(port, host="localhost"):
                    with grpc.insecure_channel(f"localhost:{port}", GRPC_CHANNEL_OPTIONS) as channel:
                        announced = grpc_ready(channel, timeout=1.0)
                if announced:
                    print(f"worker listening on {host}:{port} (pid {process.pid})", flush=True)
                elif time.monotonic() > deadline:
                    print(f"error: worker_binary (pid {process.pid}) did not accept gRPC on port {port} within "
                          f"{STARTUP_TIMEOUT_S:.0f} s{see_log}", file=sys.stderr, flush=True)
                    return 1
            stop.wait(POLL_INTERVAL_S if not announced else 0.2)
        return 0
    finally:
        try:
            if process is not None:
                stop_process(process)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def raise_system_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def port_accepts(port: int, host: str = "localhost") -> bool:
    # Probing TCP first avoids gRPC's ~1 s reconnect backoff when the channel
    # is created before the worker listens.
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
