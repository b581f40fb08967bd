"""The site's TFF worker, reachable only through the gateway.

TFF's ``worker_binary`` listens on every interface (``[::]:port``), in plaintext. With
isolation ``netns`` it starts in a network namespace of its own that holds nothing but a
loopback interface: no other machine, and no process of this machine outside that
namespace, can connect to it. The gateway reaches it through a Unix socket in a private
0700 folder; a thread of this process that has joined the worker's namespace relays each
connection to the worker's loopback port.

How: the calling (main) thread unshares its network namespace, starts the worker (the
child inherits the thread's namespace), then returns to the host's namespace. Namespaces
are per thread on Linux, so no other thread ever leaves the host's. Needs Linux and
CAP_SYS_ADMIN (root, or a container granted it); without it, isolation ``none`` runs the
worker in the host's namespace and docs/sites.md gives the deployment recipes that keep
it unreachable there (one pod with only the gateway's port exposed, a firewall).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import portpicker

from shared.errors import UserError
from tff_apps.runtime.worker import POLL_INTERVAL_S, STARTUP_TIMEOUT_S, port_accepts, start_worker, stop_process

ISOLATIONS = ("netns", "none")
_CLONE_NEWNET = 0x40000000  # <linux/sched.h>
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1  # <linux/sockios.h>, <net/if.h>
_IFREQ = "16sh22x"  # struct ifreq: name, flags, padding to 40 bytes
_WORKER_PORT = 8000  # the namespace is empty: any port is free there
_CHUNK = 1 << 20
_THIS_THREAD_NETNS = "/proc/thread-self/ns/net"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc().setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def _loopback_up() -> None:
    """A new namespace's loopback is down; the worker and the relay meet on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        flags = struct.unpack(_IFREQ, fcntl.ioctl(probe, _SIOCGIFFLAGS, struct.pack(_IFREQ, b"lo", 0)))[1]
        fcntl.ioctl(probe, _SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | _IFF_UP))


@contextlib.contextmanager
def _private_netns() -> Iterator[int]:
    """Runs the block with this thread in a new network namespace; yields an fd naming it."""
    host = os.open(_THIS_THREAD_NETNS, os.O_RDONLY)
    try:
        if _libc().unshare(_CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise UserError(
                f"site serve --isolation netns: cannot create a network namespace for the worker "
                f"({os.strerror(err)}); run as root (CAP_SYS_ADMIN), or deploy as docs/sites.md shows "
                "and pass --isolation none"
            )
        try:
            private = os.open(_THIS_THREAD_NETNS, os.O_RDONLY)
            try:
                _loopback_up()
                yield private
            except BaseException:
                os.close(private)  # on success the caller owns it
                raise
        finally:
            _setns(host)  # back to the host's namespace, where the gateway must listen
    finally:
        os.close(host)


@contextlib.contextmanager
def _cwd(folder: Path) -> Iterator[None]:
    # The worker runs in the site's data folder: relative paths in computations resolve there.
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


class StartInterrupted(Exception):
    """SIGTERM/SIGINT arrived while the worker was starting."""


class _Relay:
    """Unix socket (in the host's namespace) -> the worker's loopback port (in its own)."""

    def __init__(self, netns_fd: int, port: int, path: Path) -> None:
        self._netns_fd, self._port = netns_fd, port
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(16)
        self._listener.settimeout(POLL_INTERVAL_S * 10)  # how often the loop notices stop()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._run, name="site-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        _setns(self._netns_fd)  # this thread only: its upstream sockets live in the worker's namespace
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by stop()
            client.setblocking(True)
            try:
                upstream = socket.create_connection(("127.0.0.1", self._port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the worker is gone; the gateway's call fails UNAVAILABLE
                continue
            self._pair(client, upstream)

    def _pair(self, client: socket.socket, upstream: socket.socket) -> None:
        with self._lock:
            self._sockets.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pump, args=(src, dst), name="site-relay-pump", daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(_CHUNK):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # HTTP/2 does not half-close: either side ending ends the connection.
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                for sock in (src, dst):
                    if sock in self._sockets:
                        self._sockets.discard(sock)
                        sock.close()

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            threads = [*self._threads, self._thread]
        for thread in threads:
            if thread.is_alive():
                thread.join(timeout=5)


class SiteWorker:
    """The running worker and how the gateway reaches it (``target``, a gRPC address)."""

    def __init__(self, process: subprocess.Popen[bytes], target: str, isolation: str,
                 relay: _Relay | None = None, folder: Path | None = None, netns_fd: int | None = None) -> None:
        self.process, self.target, self.isolation = process, target, isolation
        self._relay, self._folder, self._netns_fd = relay, folder, netns_fd

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """Stops the worker and the relay; every step runs even if an earlier one fails."""
        try:
            stop_process(self.process)
        finally:
            try:
                if self._relay is not None:
                    self._relay.stop()
            finally:
                if self._netns_fd is not None:
                    os.close(self._netns_fd)
                    self._netns_fd = None
                if self._folder is not None:
                    shutil.rmtree(self._folder, ignore_errors=True)


def start_site_worker(
    data_dir: Path, isolation: str = "netns", log: IO[bytes] | None = None, stop: threading.Event | None = None
) -> SiteWorker:
    """Starts the worker in ``data_dir``, isolated as asked, and waits until it accepts.

    Must run in the main thread: the kernel kills the worker when the thread that
    started it exits (PR_SET_PDEATHSIG), and the main thread lives as long as we do.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("start_site_worker must run in the main thread")
    if isolation not in ISOLATIONS:
        raise UserError(f"site serve --isolation {isolation!r}: expected one of {list(ISOLATIONS)}")
    if isolation == "none":
        port = portpicker.pick_unused_port()
        with _cwd(data_dir):
            process = start_worker(port, log=log)
        worker = SiteWorker(process, f"localhost:{port}", isolation)
        _wait_ready(worker, port, stop)
        return worker
    return _start_in_netns(data_dir, log, stop)


def _start_in_netns(data_dir: Path, log: IO[bytes] | None, stop: threading.Event | None) -> SiteWorker:
    folder = Path(tempfile.mkdtemp(prefix="tff-apps-site-"))  # 0700: only this user reaches the socket
    worker: SiteWorker | None = None
    try:
        with _private_netns() as netns_fd:
            with _cwd(data_dir):
                process = start_worker(_WORKER_PORT, log=log)
            worker = SiteWorker(process, f"unix:{folder / 'worker.sock'}", "netns", folder=folder)
            _wait_ready(worker, _WORKER_PORT, stop)  # probed from inside the namespace
        worker._netns_fd = netns_fd
        worker._relay = _Relay(netns_fd, _WORKER_PORT, folder / "worker.sock")
        worker._relay.start()
        return worker
    except BaseException:
        if worker is not None:
            worker.stop()
        else:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _wait_ready(worker: SiteWorker, port: int, stop: threading.Event | None) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not port_accepts(port):
        code = worker.process.poll()
        if code is not None:
            raise RuntimeError(f"TFF worker_binary (pid {worker.pid}) exited with code {code} while starting")
        if stop is not None and stop.is_set():
            raise StartInterrupted(f"stopped by a signal while worker_binary (pid {worker.pid}) started")
        if time.monotonic() > deadline:
            raise RuntimeError(f"TFF worker_binary (pid {worker.pid}) did not listen within {STARTUP_TIMEOUT_S:.0f} s")
        time.sleep(POLL_INTERVAL_S)
