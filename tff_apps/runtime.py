"""A TFF runtime that owns the C++ worker process it starts.

TFF's default execution context lazily spawns ``worker_binary`` with *our*
stdout/stderr and never stops it, so every run leaves an orphan that keeps the
parent's pipes open (``cmd | tail`` and CI hang until it is killed by hand).
``Runtime`` starts the worker itself, ties its lifetime to ours (exit paths,
signals, atexit, PR_SET_PDEATHSIG) and also runs secure-sum intrinsics by
simulating them as plain sums, like TFF's test context.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import grpc
import portpicker
import tensorflow_federated
from tensorflow_federated.python.core.backends.mapreduce import intrinsics as mapreduce_intrinsics
from tensorflow_federated.python.core.backends.native import compiler as native_compiler
from tensorflow_federated.python.core.backends.test import compiler as test_compiler
from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
from tensorflow_federated.python.core.impl.compiler import building_blocks
from tensorflow_federated.python.core.impl.compiler import intrinsic_defs
from tensorflow_federated.python.core.impl.compiler import tree_analysis
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl
from tensorflow_federated.python.core.impl.context_stack import runtime_error_context
from tensorflow_federated.python.core.impl.execution_contexts import sync_execution_context
from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks
from tensorflow_federated.python.core.impl.executors import remote_executor
from tensorflow_federated.python.core.impl.executors import remote_executor_grpc_stub
from tensorflow_federated.python.core.impl.types import placements

__all__ = ["Runtime"]

_log = logging.getLogger(__name__)

WORKER_BINARY = Path(tensorflow_federated.__file__).parent / "data" / "worker_binary"

# Same limits as TFF's `executor_factory._GRPC_CHANNEL_OPTIONS`: model weights
# and client data travel in single messages.
_GRPC_MAX_MESSAGE_LENGTH_BYTES = 2 * 1000 * 1000 * 1000
_GRPC_CHANNEL_OPTIONS = [
    ("grpc.max_message_length", _GRPC_MAX_MESSAGE_LENGTH_BYTES),
    ("grpc.max_receive_message_length", _GRPC_MAX_MESSAGE_LENGTH_BYTES),
    ("grpc.max_send_message_length", _GRPC_MAX_MESSAGE_LENGTH_BYTES),
]

_STARTUP_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 5.0
_POLL_INTERVAL_S = 0.02
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# Everything `test_compiler.replace_secure_intrinsics_with_bodies` rewrites;
# the native C++ runtime implements none of them.
_SECURE_INTRINSIC_URIS = frozenset({
    intrinsic_defs.FEDERATED_SECURE_SUM.uri,
    intrinsic_defs.FEDERATED_SECURE_SUM_BITWIDTH.uri,
    intrinsic_defs.FEDERATED_SECURE_SELECT.uri,
    mapreduce_intrinsics.FEDERATED_SECURE_MODULAR_SUM.uri,
})


def _is_secure_intrinsic(node: building_blocks.ComputationBuildingBlock) -> bool:
    return isinstance(node, building_blocks.Intrinsic) and node.uri in _SECURE_INTRINSIC_URIS


def _contains_secure_intrinsics(comp: Any) -> bool:
    return tree_analysis.contains(comp.to_building_block(), _is_secure_intrinsic)


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """Returns a preexec_fn making the kernel SIGKILL the worker when we die.

    This covers the one path no Python code sees: our process being SIGKILLed.
    The signal fires when the *forking thread* exits, hence the main thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # resolved before fork, not in the child
    parent_pid = os.getpid()

    def preexec() -> None:
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:  # parent died before prctl took effect
            os._exit(1)

    return preexec


def _stop_process(process: subprocess.Popen[bytes]) -> None:
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


class Runtime:
    """Context manager running TFF computations on a worker it owns.

    ``with Runtime(): ...`` starts one ``worker_binary``, makes it TFF's default
    execution context, and stops it on every exit path. Enter it from the main
    thread: PDEATHSIG is tied to the entering thread, SIGTERM handling needs the
    main thread, and TFF's context stack is per thread.
    """

    def __init__(
        self, *, max_concurrent_computation_calls: int = -1, log_path: Path | None = None
    ) -> None:
        self._max_calls = max_concurrent_computation_calls
        self._log_path = Path(log_path) if log_path is not None else None
        self._process: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None
        self._context: sync_execution_context.SyncExecutionContext | None = None
        self._previous_context: Any = None
        self._previous_sigterm: Any = None
        self._sigterm_installed = False
        self._simulated_secure_sum = False

    @property
    def worker_pid(self) -> int | None:
        """Pid of the running worker, None outside the ``with`` block."""
        return self._process.pid if self._process is not None else None

    @property
    def simulated_secure_sum(self) -> bool:
        """True once a computation with secure intrinsics was compiled.

        TFF's open runtime has no secure aggregation: such intrinsics
        (secure sum / bitwidth / modular sum / select) run as plain ones.
        """
        return self._simulated_secure_sum

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Runtime:
        if self._process is not None:
            raise RuntimeError("Runtime is already active; it is not re-entrant")
        try:
            port = self._start_worker()
            self._install_sigterm_handler()
            self._wait_for(lambda: _port_accepts(port), f"to listen on port {port}")
            self._channel = grpc.insecure_channel(f"localhost:{port}", _GRPC_CHANNEL_OPTIONS)
            stub = remote_executor_grpc_stub.RemoteExecutorGrpcStub(self._channel)
            self._wait_for(lambda: stub.is_ready, "to accept gRPC")
            self._install_context(stub)
        except BaseException:
            self._shutdown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._shutdown()

    def _start_worker(self) -> int:
        port = portpicker.pick_unused_port()
        args = [
            str(WORKER_BINARY),
            f"--port={port}",
            f"--max_concurrent_computation_calls={self._max_calls}",
        ]
        log = self._open_log()
        try:
            # Never hand the worker our stdout/stderr: a worker holding them is
            # exactly what makes `cmd | tail` hang.
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log if log is not None else subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                # Own process group: a terminal Ctrl-C is ours to handle (the
                # code may catch it and go on); the worker is stopped by
                # __exit__, or by PDEATHSIG if we die.
                process_group=0,
                preexec_fn=_pdeathsig_preexec(),
            )
        finally:
            if log is not None:
                log.close()  # the child keeps its own descriptor
        # Registered right away so even a failing __enter__ cannot leak it.
        atexit.register(self._shutdown)
        _log.debug("Started TFF worker pid %d on port %d", self._process.pid, port)
        return port

    def _open_log(self) -> IO[bytes] | None:
        if self._log_path is None:
            return None
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        return open(self._log_path, "ab")  # noqa: SIM115 -- closed after Popen

    def _wait_for(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not ready():
            self._raise_if_worker_exited()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"TFF worker_binary (pid {self.worker_pid}) did not start {what} "
                    f"within {_STARTUP_TIMEOUT_S:.0f} s"
                    + (f"; see {self._log_path}" if self._log_path else "")
                )
            time.sleep(_POLL_INTERVAL_S)

    def _raise_if_worker_exited(self) -> None:
        process = self._process
        if process is None:
            raise RuntimeError("tff_apps Runtime is not active (used outside its `with` block)")
        code = process.poll()
        if code is not None:
            raise RuntimeError(
                f"TFF worker_binary (pid {process.pid}) exited with code {code}"
                + (f"; see {self._log_path}" if self._log_path else "")
            )

    def _shutdown(self) -> None:
        """Idempotent teardown shared by __exit__, failed __enter__ and atexit."""
        atexit.unregister(self._shutdown)
        # Worker first; every later step runs even if a second Ctrl-C/SIGTERM
        # interrupts an earlier one (our SIGTERM handler stays on until last).
        try:
            process, self._process = self._process, None
            if process is not None:
                _stop_process(process)
                _log.debug("Stopped TFF worker pid %d (code %s)", process.pid, process.returncode)
        finally:
            try:
                self._restore_context()
                channel, self._channel = self._channel, None
                if channel is not None:
                    channel.close()
            finally:
                self._restore_sigterm_handler()

    # -- signals -----------------------------------------------------------

    def _install_sigterm_handler(self) -> None:
        # Python's default SIGTERM action kills us without unwinding; turning
        # it into SystemExit lets `__exit__` stop the worker.
        # signal.signal only works from the main thread.
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_system_exit)
        self._sigterm_installed = True

    def _restore_sigterm_handler(self) -> None:
        if not self._sigterm_installed or threading.current_thread() is not threading.main_thread():
            return
        previous = self._previous_sigterm
        # None means a handler installed from C that Python cannot reinstall.
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        self._sigterm_installed = False

    # -- TFF context -------------------------------------------------------

    def _install_context(
        self, stub: remote_executor_grpc_stub.RemoteExecutorGrpcStub
    ) -> None:
        def stack_fn(cardinalities: dict[Any, int]) -> remote_executor.RemoteExecutor:
            # TFF retries gRPC UNAVAILABLE forever; failing here, where a new
            # executor is built after each error, turns a dead worker into a
            # clear error instead of a hang.
            self._raise_if_worker_exited()
            if cardinalities.get(placements.CLIENTS) is None:
                cardinalities[placements.CLIENTS] = 0  # TFF's default_num_clients
            executor = remote_executor.RemoteExecutor(stub)
            executor.set_cardinalities(cardinalities)
            return executor

        factory = python_executor_stacks.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn)
        self._context = sync_execution_context.SyncExecutionContext(
            executor_fn=factory,
            compiler_fn=self._compile,
            transform_args=tensorflow_computation.transform_args,
            transform_result=tensorflow_computation.transform_result,
        )
        self._previous_context = _default_context()
        context_stack_impl.context_stack.set_default_context(self._context)

    def _restore_context(self) -> None:
        context, self._context = self._context, None
        # Leave it alone if someone replaced our context meanwhile.
        if context is None or _default_context() is not context:
            return
        previous = self._previous_context or runtime_error_context.RuntimeErrorContext()
        context_stack_impl.context_stack.set_default_context(previous)

    def _compile(self, comp: Any) -> Any:
        # Same pipeline as TFF's native context, plus the test context's
        # rewrite of secure intrinsics when (and only when) they occur.
        if _contains_secure_intrinsics(comp):
            comp = test_compiler.replace_secure_intrinsics_with_bodies(comp)
            if not self._simulated_secure_sum:
                _log.warning(
                    "Secure aggregation is SIMULATED by TFF's open runtime: "
                    "secure-sum intrinsics run as plain sums, nothing is protected."
                )
            self._simulated_secure_sum = True
        return native_compiler.desugar_and_transform_to_native(comp)


def _raise_system_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _port_accepts(port: int) -> bool:
    # Probing TCP first avoids gRPC's ~1 s reconnect backoff when the channel
    # is created before the worker listens.
    try:
        with socket.create_connection(("localhost", port), timeout=0.5):
            return True
    except OSError:
        return False


def _default_context() -> Any:
    # The stack keeps its default at the bottom; TFF exposes a setter only.
    stack = getattr(context_stack_impl.context_stack, "_stack", None)
    return stack[0] if stack else None
