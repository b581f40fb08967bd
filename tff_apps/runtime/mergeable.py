"""Spreading one computation's clients over several TFF workers: TFF's mergeable form (work up
to the aggregation on each worker, merge, work after it), clients cut into one contiguous
slice per worker, partial aggregates merged in worker order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any


@contextlib.contextmanager
def placed_on(workers: Sequence[int]):
    """Across sites: the CLIENTS of the computations invoked inside are, in order, on these
    workers (one client each), e.g. the sites sampled for a round. Without it every worker
    gets a contiguous slice of the clients."""
    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

    context = context_stack_impl.context_stack.current
    if not hasattr(context, "placement"):
        raise RuntimeError("placed_on needs the Runtime's context over several workers")
    previous, context.placement = context.placement, list(workers)
    try:
        yield
    finally:
        context.placement = previous


def spreading_context(
    compile_mergeable: Callable[[Any], Any], async_contexts: Sequence[Any], first: Any, pinned: bool = False,
    server: Any = None,
) -> Any:
    """TFF sync context: mergeable computations over all workers, the rest on the first.

    Each computation is compiled once to TFF's ``MergeableCompForm`` (``up_to_merge``
    on a slice of the clients, ``merge`` of two partial aggregates, ``after_merge``).
    TFF's ``MergeableCompExecutionContext`` splits the CLIENTS-placed arguments
    into one slice per worker; we run the three parts ourselves because TFF 0.87
    joins the slices' CLIENTS-placed *results* in completion order (a fast second
    worker swaps the clients) and merges in completion order (sums vary run to
    run). Here slice i always goes to worker i, partials merge in worker order and
    results keep the clients' order: the same run gives the same numbers.

    `pinned` (across sites, where each worker reads only its own site's data): a computation
    without a mergeable form is an error instead of running whole on the first worker, and
    `placed_on` puts each client on its own worker. `server` (across sites: the
    coordinator's own worker) merges the partial aggregates and runs the server-side rest,
    so no site ever receives another site's partial aggregate; without it the first worker does.
    """
    from tensorflow_federated.python.common_libs import async_utils, structure
    from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
    from tensorflow_federated.python.core.impl.context_stack import context_base
    from tensorflow_federated.python.core.impl.execution_contexts import mergeable_comp_execution_context as mcec
    from tensorflow_federated.python.core.impl.types import computation_types, placements, type_analysis, type_conversions

    def at_clients(type_spec: Any) -> bool:
        return isinstance(type_spec, computation_types.FederatedType) and type_spec.placement is placements.CLIENTS

    def only_server_or_all_equal(type_spec: Any) -> bool:
        return not isinstance(type_spec, computation_types.FederatedType) or type_spec.all_equal

    async def run_form(form: Any, arg_list: list[Any], contexts: list[Any]) -> Any:
        partials = await asyncio.gather(
            *(context.invoke(form.up_to_merge, a) for a, context in zip(arg_list, contexts))
        )
        merger = server if server is not None else contexts[0]
        merged = partials[0]
        for partial in partials[1:]:
            merged = await merger.invoke(form.merge, structure.Struct.unnamed(merged, partial))

        def after_merge(a: Any, context: Any) -> Any:
            return context.invoke(
                form.after_merge, structure.Struct.unnamed(a, merged) if a is not None else merged
            )

        result_type = form.after_merge.type_signature.result
        if type_analysis.contains_only(result_type, only_server_or_all_equal):
            return await after_merge(arg_list[0], merger)
        results = await asyncio.gather(*(after_merge(a, c) for a, c in zip(arg_list, contexts)))
        return mcec._repackage_partitioned_values(list(results), result_type)

    class SpreadingContext(context_base.SyncContext):
        def __init__(self) -> None:
            self._forms: dict[Any, Any] = {}
            self._runner = async_utils.AsyncThreadRunner()
            self.placement: list[int] | None = None  # `placed_on`
            self.width = len(async_contexts)  # the grouped engine cuts a round into this many groups

        def invoke(self, comp: Any, arg: Any = None) -> Any:
            if server is not None and not type_analysis.contains(comp.type_signature, at_clients):
                # nothing of the sites in it (e.g. reading the model from the state): the
                # coordinator's own worker runs it, and no site is asked
                result = self._runner.run_coro_and_return_result(server.invoke(comp, arg))
                return tensorflow_computation.transform_result(result)
            if comp not in self._forms:
                self._forms[comp] = compile_mergeable(comp)
            form = self._forms[comp]
            if form is None and pinned:
                raise RuntimeError("across sites every computation must split by site; this one has no mergeable form")
            if form is None:
                return first.invoke(comp, arg)
            contexts = list(async_contexts) if self.placement is None else [async_contexts[i] for i in self.placement]
            if arg is None:
                arg_list = [None] * len(contexts)
            else:
                arg_list = split_clients(arg, form.up_to_merge.type_signature.parameter, len(contexts))
            result = self._runner.run_coro_and_return_result(run_form(form, arg_list, contexts))
            result = type_conversions.type_to_py_container(result, form.after_merge.type_signature.result)
            return tensorflow_computation.transform_result(result)

    return SpreadingContext()


def split_clients(value: Any, type_spec: Any, parts: int) -> list[Any]:
    """`value` (a computation's argument) as `parts` arguments, each with one contiguous slice
    of every CLIENTS-placed value (sizes as TFF's: ceil of the remaining clients over the
    remaining parts), everything else replicated; fewer than `parts` if there are fewer clients.

    Not TFF 0.87's `MergeableCompExecutionContextValue`: its partitioning of a struct carries on
    from the struct's LAST element, so an argument <CLIENTS value, SERVER value> gave every
    worker the first slice of the clients (each site the first site's inputs).
    """
    from tensorflow_federated.python.core.impl.types import placements
    from tensorflow_federated.python.core.impl.executors.cardinalities_utils import infer_cardinalities

    clients = infer_cardinalities(value, type_spec).get(placements.CLIENTS)
    if clients is None:
        return [value] * parts
    bounds, start = [], 0
    for remaining_parts in range(parts, 0, -1):
        if start >= clients and bounds:
            break
        size = -(-(clients - start) // remaining_parts)
        bounds.append((start, start + size))
        start += size
    return [_clients_slice(value, type_spec, lo, hi) for lo, hi in bounds]


def _clients_slice(value: Any, type_spec: Any, lo: int, hi: int) -> Any:
    from tensorflow_federated.python.common_libs import structure
    from tensorflow_federated.python.core.impl.types import computation_types, placements

    if isinstance(type_spec, computation_types.StructType):
        elements = zip(structure.iter_elements(structure.from_container(value)), structure.iter_elements(type_spec))
        return structure.Struct([(name, _clients_slice(v, t, lo, hi)) for (_, v), (name, t) in elements])
    if (isinstance(type_spec, computation_types.FederatedType) and type_spec.placement is placements.CLIENTS
            and not type_spec.all_equal):
        return value[lo:hi]
    return value
