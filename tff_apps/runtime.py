"""A TFF runtime that owns the C++ worker process it starts.

TFF's default execution context lazily spawns ``worker_binary`` with *our*
stdout/stderr and never stops it, so every run leaves an orphan that keeps the
parent's pipes open (``cmd | tail`` and CI hang until it is killed by hand).
``Runtime`` starts the worker itself, ties its lifetime to ours (exit paths,
signals, atexit, PR_SET_PDEATHSIG) and also runs secure-sum intrinsics by
simulating them as plain sums, like TFF's test context.

``Runtime(workers=["host:port", ...])`` starts no worker: it connects to running
ones (``tff-apps worker``, i.e. :func:`serve_worker`) and spreads each
computation's clients over them with TFF's mergeable-computation context (one
async remote context per worker). A computation that has no mergeable form (two
dependent aggregations) runs whole on the first worker.

TensorFlow Federated is imported only when a Runtime is entered, so that
``tff-apps worker`` starts the binary without paying for the import.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
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
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import grpc
import portpicker

from shared.errors import UserError

__all__ = ["Runtime", "WorkerLost", "serve_worker", "start_worker", "worker_binary"]

_log = logging.getLogger(__name__)


def worker_binary() -> Path:
    """TFF's C++ worker executable, found without importing TensorFlow."""
    spec = importlib.util.find_spec("tensorflow_federated")
    if spec is None or spec.origin is None:
        raise RuntimeError("tensorflow_federated is not installed")
    return Path(spec.origin).parent / "data" / "worker_binary"


WORKER_BINARY = worker_binary()

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



def _contains_secure_intrinsics(comp: Any) -> bool:
    from tensorflow_federated.python.core.backends.mapreduce import intrinsics as mapreduce_intrinsics
    from tensorflow_federated.python.core.impl.compiler import building_blocks
    from tensorflow_federated.python.core.impl.compiler import intrinsic_defs
    from tensorflow_federated.python.core.impl.compiler import tree_analysis

    # Everything `test_compiler.replace_secure_intrinsics_with_bodies` rewrites;
    # the native C++ runtime implements none of them.
    secure_uris = {
        intrinsic_defs.FEDERATED_SECURE_SUM.uri,
        intrinsic_defs.FEDERATED_SECURE_SUM_BITWIDTH.uri,
        intrinsic_defs.FEDERATED_SECURE_SELECT.uri,
        mapreduce_intrinsics.FEDERATED_SECURE_MODULAR_SUM.uri,
    }

    def is_secure(node: Any) -> bool:
        return isinstance(node, building_blocks.Intrinsic) and node.uri in secure_uris

    return tree_analysis.contains(comp.to_building_block(), is_secure)


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
        args,
        stdin=subprocess.DEVNULL,
        stdout=log if log is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        # Own process group: a terminal Ctrl-C is ours to handle (the code may
        # catch it and go on); the worker is stopped by its owner, or by
        # PDEATHSIG if the owner dies.
        process_group=0,
        preexec_fn=_pdeathsig_preexec(),
    )


def _port_is_free(port: int) -> bool:
    """True if nothing listens on ``port`` (the worker binds ``[::]:port``)."""
    for family, address in ((socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind(address)
            return True
        except OSError as err:
            if family == socket.AF_INET6 and err.errno != errno.EADDRINUSE:
                continue  # no IPv6 on this machine: ask IPv4
            return False
    return False


def _grpc_ready(channel: grpc.Channel, timeout: float) -> bool:
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
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        announced = False
        while not stop.is_set():
            code = process.poll()
            if code is not None:
                print(f"error: worker_binary (pid {process.pid}) on port {port} exited with code {code}{see_log}",
                      file=sys.stderr, flush=True)
                return 1
            if not announced:
                if _port_accepts(port, host="localhost"):
                    with grpc.insecure_channel(f"localhost:{port}", _GRPC_CHANNEL_OPTIONS) as channel:
                        announced = _grpc_ready(channel, timeout=1.0)
                if announced:
                    print(f"worker listening on {host}:{port} (pid {process.pid})", flush=True)
                elif time.monotonic() > deadline:
                    print(f"error: worker_binary (pid {process.pid}) did not accept gRPC on port {port} within "
                          f"{_STARTUP_TIMEOUT_S:.0f} s{see_log}", file=sys.stderr, flush=True)
                    return 1
            stop.wait(_POLL_INTERVAL_S if not announced else 0.2)
        return 0
    finally:
        try:
            if process is not None:
                _stop_process(process)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class WorkerLost(RuntimeError):
    """A remote worker stopped answering; the message names it."""


class Runtime:
    """Context manager running TFF computations on a worker it owns, or on remote workers.

    ``with Runtime(): ...`` starts one ``worker_binary``, makes it TFF's default
    execution context, and stops it on every exit path. Enter it from the main
    thread: PDEATHSIG is tied to the entering thread, SIGTERM handling needs the
    main thread, and TFF's context stack is per thread.

    ``with Runtime(workers=["h1:p1", "h2:p2"]): ...`` starts nothing and spreads
    each computation's CLIENTS over the given workers (see the module docstring).
    """

    def __init__(
        self,
        *,
        max_concurrent_computation_calls: int = -1,
        log_path: Path | None = None,
        workers: Sequence[str] = (),
    ) -> None:
        self._max_calls = max_concurrent_computation_calls
        self._log_path = Path(log_path) if log_path is not None else None
        self._workers = tuple(workers)
        self._process: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None
        self._channels: list[grpc.Channel] = []
        self._context: Any = None
        self._previous_context: Any = None
        self._previous_sigterm: Any = None
        self._sigterm_installed = False
        self._simulated_secure_sum = False
        self._active = False
        self._single_worker_computations: list[str] = []

    @property
    def worker_pid(self) -> int | None:
        """Pid of the running worker, None outside the ``with`` block (and with remote workers)."""
        return self._process.pid if self._process is not None else None

    @property
    def workers(self) -> tuple[str, ...]:
        """The remote workers' addresses; empty when the Runtime runs its own worker."""
        return self._workers

    @property
    def single_worker_computations(self) -> list[str]:
        """Computations that had no mergeable form and ran whole on the first worker."""
        return list(self._single_worker_computations)

    @property
    def simulated_secure_sum(self) -> bool:
        """True once a computation with secure intrinsics was compiled.

        TFF's open runtime has no secure aggregation: such intrinsics
        (secure sum / bitwidth / modular sum / select) run as plain ones.
        """
        return self._simulated_secure_sum

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Runtime:
        if self._active:
            raise RuntimeError("Runtime is already active; it is not re-entrant")
        self._active = True
        try:
            from tensorflow_federated.python.core.impl.executors import remote_executor_grpc_stub

            if self._workers:
                self._install_sigterm_handler()
                stubs = [self._connect(address) for address in self._workers]
                self._install_distributed_context(stubs)
            else:
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
        log = self._open_log()
        try:
            self._process = start_worker(port, max_concurrent_computation_calls=self._max_calls, log=log)
        finally:
            if log is not None:
                log.close()  # the child keeps its own descriptor
        # Registered right away so even a failing __enter__ cannot leak it.
        atexit.register(self._shutdown)
        _log.debug("Started TFF worker pid %d on port %d", self._process.pid, port)
        return port

    def _connect(self, address: str) -> Any:
        """A gRPC stub for a remote worker; a worker that does not answer is a UserError."""
        from tensorflow_federated.python.core.impl.executors import remote_executor_grpc_stub

        host, _, port = address.rpartition(":")
        if not _port_accepts(int(port), host=host.strip("[]")):
            raise UserError(
                f"--workers {address}: no TFF worker accepts connections there "
                f"(start one with `tff-apps worker --port {port}`)"
            )
        channel = grpc.insecure_channel(address, _GRPC_CHANNEL_OPTIONS)
        self._channels.append(channel)
        if not _grpc_ready(channel, timeout=_STARTUP_TIMEOUT_S):
            raise UserError(f"--workers {address}: the port is open but no TFF worker answers gRPC there")
        return remote_executor_grpc_stub.RemoteExecutorGrpcStub(channel)

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

    def _raise_if_remote_worker_lost(self, address: str) -> None:
        if not self._active:
            raise RuntimeError("tff_apps Runtime is not active (used outside its `with` block)")
        host, _, port = address.rpartition(":")
        if not _port_accepts(int(port), host=host.strip("[]")):
            raise WorkerLost(
                f"TFF worker {address} stopped answering (connection refused) during the run; "
                "restart it and re-run the same command with the same run id to resume from the last checkpoint"
            )

    def _shutdown(self) -> None:
        """Idempotent teardown shared by __exit__, failed __enter__ and atexit."""
        atexit.unregister(self._shutdown)
        self._active = False
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
                channels, self._channels = self._channels, []
                channel, self._channel = self._channel, None
                for open_channel in [*channels, *([channel] if channel is not None else [])]:
                    open_channel.close()
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

    def _executor_factory(self, stub: Any, check_alive: Callable[[], None]) -> Any:
        from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks
        from tensorflow_federated.python.core.impl.executors import remote_executor
        from tensorflow_federated.python.core.impl.types import placements

        def stack_fn(cardinalities: dict[Any, int]) -> Any:
            # TFF retries gRPC UNAVAILABLE forever; failing here, where a new
            # executor is built after each error, turns a dead worker into a
            # clear error instead of a hang.
            check_alive()
            if cardinalities.get(placements.CLIENTS) is None:
                cardinalities[placements.CLIENTS] = 0  # TFF's default_num_clients
            executor = remote_executor.RemoteExecutor(stub)
            executor.set_cardinalities(cardinalities)
            return executor

        return python_executor_stacks.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn)

    def _sync_context(self, stub: Any, check_alive: Callable[[], None]) -> Any:
        from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
        from tensorflow_federated.python.core.impl.execution_contexts import sync_execution_context

        return sync_execution_context.SyncExecutionContext(
            executor_fn=self._executor_factory(stub, check_alive),
            compiler_fn=self._compile,
            transform_args=tensorflow_computation.transform_args,
            transform_result=tensorflow_computation.transform_result,
        )

    def _install_context(self, stub: Any) -> None:
        self._set_context(self._sync_context(stub, self._raise_if_worker_exited))

    def _install_distributed_context(self, stubs: list[Any]) -> None:
        from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
        from tensorflow_federated.python.core.impl.execution_contexts import async_execution_context

        def alive_check(address: str) -> Callable[[], None]:
            return lambda: self._raise_if_remote_worker_lost(address)

        # Each piece of a mergeable form is an ordinary computation, compiled
        # for the native runtime on the worker that runs it.
        async_contexts = [
            async_execution_context.AsyncExecutionContext(
                executor_fn=self._executor_factory(stub, alive_check(address)),
                compiler_fn=self._compile,
                transform_args=tensorflow_computation.transform_args,
                transform_result=tensorflow_computation.transform_result,
            )
            for stub, address in zip(stubs, self._workers)
        ]
        first = self._sync_context(stubs[0], alive_check(self._workers[0]))
        self._set_context(_spreading_context(self, async_contexts, first))

    def _set_context(self, context: Any) -> None:
        from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

        self._context = context
        self._previous_context = _default_context()
        context_stack_impl.context_stack.set_default_context(self._context)

    def _restore_context(self) -> None:
        from tensorflow_federated.python.core.impl.context_stack import context_stack_impl
        from tensorflow_federated.python.core.impl.context_stack import runtime_error_context

        context, self._context = self._context, None
        # Leave it alone if someone replaced our context meanwhile.
        if context is None or _default_context() is not context:
            return
        previous = self._previous_context or runtime_error_context.RuntimeErrorContext()
        context_stack_impl.context_stack.set_default_context(previous)

    def _without_secure_intrinsics(self, comp: Any) -> Any:
        # The test context's rewrite of secure intrinsics, when (and only when) they occur.
        from tensorflow_federated.python.core.backends.test import compiler as test_compiler

        if not _contains_secure_intrinsics(comp):
            return comp
        comp = test_compiler.replace_secure_intrinsics_with_bodies(comp)
        if not self._simulated_secure_sum:
            _log.warning(
                "Secure aggregation is SIMULATED by TFF's open runtime: "
                "secure-sum intrinsics run as plain sums, nothing is protected."
            )
        self._simulated_secure_sum = True
        return comp

    def _compile(self, comp: Any) -> Any:
        # Same pipeline as TFF's native context, plus the secure-intrinsic rewrite.
        from tensorflow_federated.python.core.backends.native import compiler as native_compiler

        return native_compiler.desugar_and_transform_to_native(self._without_secure_intrinsics(comp))

    def _compile_mergeable(self, comp: Any) -> Any:
        """The computation's mergeable form, or None if it has none (dependent aggregations)."""
        from tensorflow_federated.python.core.backends.native import mergeable_comp_compiler

        try:
            return mergeable_comp_compiler.compile_to_mergeable_comp_form(self._without_secure_intrinsics(comp))
        except (ValueError, TypeError) as err:
            name = _computation_name(comp)
            self._single_worker_computations.append(name)
            _log.warning(
                "computation %s has no mergeable form (%s: %s); it runs whole on worker %s",
                name, type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "", self._workers[0],
            )
            return None


def _spreading_context(runtime: Runtime, async_contexts: Sequence[Any], first: Any) -> Any:
    """TFF sync context: mergeable computations over all workers, the rest on the first.

    Each computation is compiled once to TFF's ``MergeableCompForm`` (``up_to_merge``
    on a slice of the clients, ``merge`` of two partial aggregates, ``after_merge``).
    TFF's ``MergeableCompExecutionContext`` splits the CLIENTS-placed arguments
    into one slice per worker; we run the three parts ourselves because TFF 0.87
    joins the slices' CLIENTS-placed *results* in completion order (a fast second
    worker swaps the clients) and merges in completion order (sums vary run to
    run). Here slice i always goes to worker i, partials merge in worker order and
    results keep the clients' order: the same run gives the same numbers.
    """
    from tensorflow_federated.python.common_libs import async_utils
    from tensorflow_federated.python.common_libs import structure
    from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
    from tensorflow_federated.python.core.impl.context_stack import context_base
    from tensorflow_federated.python.core.impl.execution_contexts import mergeable_comp_execution_context as mcec
    from tensorflow_federated.python.core.impl.types import computation_types
    from tensorflow_federated.python.core.impl.types import type_analysis
    from tensorflow_federated.python.core.impl.types import type_conversions

    def only_server_or_all_equal(type_spec: Any) -> bool:
        return not isinstance(type_spec, computation_types.FederatedType) or type_spec.all_equal

    async def run_form(form: Any, arg_list: list[Any]) -> Any:
        contexts = list(async_contexts)
        partials = await asyncio.gather(
            *(context.invoke(form.up_to_merge, a) for a, context in zip(arg_list, contexts))
        )
        merged = partials[0]
        for partial in partials[1:]:
            merged = await contexts[0].invoke(form.merge, structure.Struct.unnamed(merged, partial))

        def after_merge(a: Any, context: Any) -> Any:
            return context.invoke(
                form.after_merge, structure.Struct.unnamed(a, merged) if a is not None else merged
            )

        result_type = form.after_merge.type_signature.result
        if type_analysis.contains_only(result_type, only_server_or_all_equal):
            return await after_merge(arg_list[0], contexts[0])
        results = await asyncio.gather(*(after_merge(a, c) for a, c in zip(arg_list, contexts)))
        return mcec._repackage_partitioned_values(list(results), result_type)

    class SpreadingContext(context_base.SyncContext):
        def __init__(self) -> None:
            self._forms: dict[Any, Any] = {}
            self._runner = async_utils.AsyncThreadRunner()

        def invoke(self, comp: Any, arg: Any = None) -> Any:
            if comp not in self._forms:
                self._forms[comp] = runtime._compile_mergeable(comp)
            form = self._forms[comp]
            if form is None:
                return first.invoke(comp, arg)
            if arg is None:
                arg_list = [None] * len(async_contexts)
            else:
                arg_list = mcec.MergeableCompExecutionContextValue(
                    arg, form.up_to_merge.type_signature.parameter, len(async_contexts)
                ).value()
            result = self._runner.run_coro_and_return_result(run_form(form, arg_list))
            result = type_conversions.type_to_py_container(result, form.after_merge.type_signature.result)
            return tensorflow_computation.transform_result(result)

    return SpreadingContext()


def _computation_name(comp: Any) -> str:
    signature = str(getattr(comp, "type_signature", "?"))
    return signature if len(signature) <= 120 else signature[:117] + "..."


def _raise_system_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _port_accepts(port: int, host: str = "localhost") -> bool:
    # Probing TCP first avoids gRPC's ~1 s reconnect backoff when the channel
    # is created before the worker listens.
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _default_context() -> Any:
    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

    # The stack keeps its default at the bottom; TFF exposes a setter only.
    stack = getattr(context_stack_impl.context_stack, "_stack", None)
    return stack[0] if stack else None
