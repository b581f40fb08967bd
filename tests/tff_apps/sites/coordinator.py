"""The coordinator's side in tests: a TFF execution context whose remote executor talks to a
site's gateway through `site_channel`, built as tff_apps/runtime/context.py builds its
remote contexts, and an interceptor that records the CreateValue requests sent."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import grpc


class Recorder(grpc.UnaryUnaryClientInterceptor):
    """Keeps every call the coordinator makes: (method name, request, response)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, Any]] = []

    def intercept_unary_unary(self, continuation, details, request):
        outcome = continuation(details, request)
        self.calls.append((details.method.rsplit("/", 1)[1], request, outcome.result()))
        return outcome

    def computation_hashes(self) -> list[str]:
        return [
            hashlib.sha256(request.value.computation.SerializeToString(deterministic=True)).hexdigest()
            for method, request, _ in self.calls
            if method == "CreateValue" and request.value.WhichOneof("value") == "computation"
        ]


def remote_context(channel: grpc.Channel) -> Any:
    from tensorflow_federated.python.core.backends.native import compiler
    from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
    from tensorflow_federated.python.core.impl.execution_contexts import sync_execution_context
    from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks
    from tensorflow_federated.python.core.impl.executors import remote_executor, remote_executor_grpc_stub
    from tensorflow_federated.python.core.impl.types import placements

    stub = remote_executor_grpc_stub.RemoteExecutorGrpcStub(channel)

    def stack_fn(cardinalities: dict[Any, int]) -> Any:
        cardinalities.setdefault(placements.CLIENTS, 0)  # as the suite's Runtime does
        executor = remote_executor.RemoteExecutor(stub)
        executor.set_cardinalities(cardinalities)
        return executor

    return sync_execution_context.SyncExecutionContext(
        executor_fn=python_executor_stacks.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn),
        compiler_fn=compiler.desugar_and_transform_to_native,
        transform_args=tensorflow_computation.transform_args,
        transform_result=tensorflow_computation.transform_result,
    )


@contextlib.contextmanager
def running_on(channel: grpc.Channel) -> Iterator[None]:
    """TFF computations invoked in the block run on the site behind ``channel``."""
    import tensorflow_federated as tff

    with tff.framework.get_context_stack().install(remote_context(channel)):
        yield
