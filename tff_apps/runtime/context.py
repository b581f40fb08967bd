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

import atexit
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import grpc
import portpicker

from shared.errors import UserError
from tff_apps.runtime.mergeable import spreading_context
from tff_apps.runtime.worker import (
    GRPC_CHANNEL_OPTIONS,
    POLL_INTERVAL_S,
    STARTUP_TIMEOUT_S,
    grpc_ready,
    port_accepts,
    raise_system_exit,
    start_worker,
    stop_process,
)


def _contains_secure_intrinsics(comp: Any) -> bool:
    from tensorflow_federated.python.core.backends.mapreduce import intrinsics as mapreduce_intrinsics
    from tensorflow_federated.python.core.impl.compiler import building_blocks, intrinsic_defs, tree_analysis

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


_log = logging.getLogger(__name__)


class WorkerLost(RuntimeError):
    """A remote worker stopped answering; the message names it, `address` is where it was."""

    def __init__(self, message: str, address: str = ""):
        super().__init__(message)
        self.address = address


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
        pinned: bool = False,
        channel_factory: Callable[[str], grpc.Channel] | None = None,
        worker_labels: dict[str, str] | None = None,
    ) -> None:
        self._max_calls = max_concurrent_computation_calls
        self._pinned = pinned  # across sites: `mergeable.spreading_context(pinned=True)`
        # across sites: the gateway's mutual-TLS channel to each site, and how errors name it
        self._channel_factory = channel_factory
        self._worker_labels = dict(worker_labels or {})
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
                # across sites the coordinator merges on a worker of its own (`spreading_context`)
                server = self._local_stub(remote_executor_grpc_stub) if self._pinned else None
                self._install_distributed_context(stubs, server)
            else:
                self._install_sigterm_handler()
                self._install_context(self._local_stub(remote_executor_grpc_stub))
        except BaseException:
            self._shutdown()
            raise
        return self

    def _local_stub(self, stub_module: Any) -> Any:
        """Starts this process's own worker and returns a stub for it."""
        port = self._start_worker()
        self._wait_for(lambda: port_accepts(port), f"to listen on port {port}")
        self._channel = grpc.insecure_channel(f"localhost:{port}", GRPC_CHANNEL_OPTIONS)
        stub = stub_module.RemoteExecutorGrpcStub(self._channel)
        self._wait_for(lambda: stub.is_ready, "to accept gRPC")
        return stub

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
        label = self._worker_labels.get(address, f"--workers {address}")
        if not port_accepts(int(port), host=host.strip("[]")):
            raise UserError(
                f"{label}: nothing accepts connections at {address} "
                f"(start a worker with `tff-apps worker --port {port}`, or a site with `tff-apps site serve`)"
            )
        if self._channel_factory is not None:
            channel = self._channel_factory(address)
        else:
            channel = grpc.insecure_channel(address, GRPC_CHANNEL_OPTIONS)
        self._channels.append(channel)
        if not grpc_ready(channel, timeout=STARTUP_TIMEOUT_S):
            raise UserError(f"{label}: the port {address} is open but no TFF worker answers gRPC there")
        return remote_executor_grpc_stub.RemoteExecutorGrpcStub(channel)

    def _open_log(self) -> IO[bytes] | None:
        if self._log_path is None:
            return None
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        return open(self._log_path, "ab")  # noqa: SIM115 -- closed after Popen

    def _wait_for(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not ready():
            self._raise_if_worker_exited()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"TFF worker_binary (pid {self.worker_pid}) did not start {what} "
                    f"within {STARTUP_TIMEOUT_S:.0f} s"
                    + (f"; see {self._log_path}" if self._log_path else "")
                )
            time.sleep(POLL_INTERVAL_S)

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
        if not port_accepts(int(port), host=host.strip("[]")):
            what = self._worker_labels.get(address, "TFF worker")  # across sites: "site NAME"
            raise WorkerLost(
                f"{what} {address} stopped answering (connection refused) during the run; "
                "restart it and re-run the same command with the same run id to resume from the last checkpoint",
                address,
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
                stop_process(process)
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
        self._previous_sigterm = signal.signal(signal.SIGTERM, raise_system_exit)
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
        from tensorflow_federated.python.core.impl.types import placements

        from tff_apps.runtime.value_transfer import remote_executor_class

        executor_class = remote_executor_class()

        def stack_fn(cardinalities: dict[Any, int]) -> Any:
            # TFF retries gRPC UNAVAILABLE forever; failing here, where a new
            # executor is built after each error, turns a dead worker into a
            # clear error instead of a hang.
            check_alive()
            if cardinalities.get(placements.CLIENTS) is None:
                cardinalities[placements.CLIENTS] = 0  # TFF's default_num_clients
            executor = executor_class(stub)
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

    def _install_distributed_context(self, stubs: list[Any], server_stub: Any = None) -> None:
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
        server = None
        if server_stub is not None:
            server = async_execution_context.AsyncExecutionContext(
                executor_fn=self._executor_factory(server_stub, self._raise_if_worker_exited),
                compiler_fn=self._compile,
                transform_args=tensorflow_computation.transform_args,
                transform_result=tensorflow_computation.transform_result,
            )
        self._set_context(
            spreading_context(self._compile_mergeable, async_contexts, first, pinned=self._pinned, server=server)
        )

    def _set_context(self, context: Any) -> None:
        from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

        self._context = context
        self._previous_context = _default_context()
        context_stack_impl.context_stack.set_default_context(self._context)

    def _restore_context(self) -> None:
        from tensorflow_federated.python.core.impl.context_stack import context_stack_impl, runtime_error_context

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


def _default_context() -> Any:
    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

    # The stack keeps its default at the bottom; TFF exposes a setter only.
    stack = getattr(context_stack_impl.context_stack, "_stack", None)
    return stack[0] if stack else None


def _computation_name(comp: Any) -> str:
    signature = str(getattr(comp, "type_signature", "?"))
    return signature if len(signature) <= 120 else signature[:117] + "..."
