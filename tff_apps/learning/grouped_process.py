"""The grouped engine's learning process and the pieces every grouped round shares: the
process object `round_loop.run_rounds` drives (`GroupedProcess`), the group's TFF type, the
server's apply-optimizer step, and the per-client selections of the local training loops
(grouped.py's plain local training, grouped_dp_sgd's DP-SGD)."""

from __future__ import annotations

import collections
import collections.abc

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.learning.templates import apply_optimizer_finalizer

from tff_apps.learning.dense_chain import refuse_model
from tff_apps.learning.grouped_data import round_groups


class GroupedProcess:
    """The learning process of the grouped engine, with the interface `round_loop.run_rounds`
    uses: `initialize()`, `next(state, datasets)` (a round input per client: a tf.data.Dataset, as for
    the stock process, or its rows as arrays, `client_data.RoundRows`), `get_model_weights(state)`,
    `set_model_weights(state, weights)`.
    The state has the stock composed process's shape (LearningAlgorithmState; the
    finalizer's part is the server optimizer's state), and `output.metrics` has its
    `client_work.train` metrics."""

    def __init__(self, initialize_fn, next_fn, robust=None, bad_clients=(), bad_update_scale: float = 1.0,
                 group_round=round_groups):
        self.initialize_fn = initialize_fn
        self.next_fn = next_fn  # federated: (state@SERVER, groups@CLIENTS) -> (state, metrics)@SERVER
        self.robust = robust  # grouped_robust.RobustSpec, or None (the plain mean, DP, secure sum)
        self.bad_clients = frozenset(bad_clients)  # scaled_update: these clients' updates are scaled
        self.bad_update_scale = float(bad_update_scale)
        self.wants_client_names = bool(robust is not None and robust.scaled)  # round_loop.next_round
        self.group_round = group_round  # (datasets, workers, scale) -> groups; DP-SGD's stacks Poisson inputs

    def initialize(self):
        return self.initialize_fn()

    def next(self, state, datasets, client_names=None, **round_options):
        """One round; the clients travel in groups (`grouped_data.round_groups`: at least one per
        worker with `--workers`, each at most GROUP_BYTES).
        `client_names` (scaled_update): which of the round's clients are bad. `round_options`
        (tests, masked rounds): `grouped_masked`'s simulated dropouts."""
        from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

        datasets = list(datasets)
        bad = [name in self.bad_clients for name in (client_names or [None] * len(datasets))]
        if len(bad) != len(datasets):
            raise ValueError(f"{len(bad)} client names for {len(datasets)} datasets")
        # the runtime's context over several workers says how many (runtime/mergeable.py's `width`)
        workers = getattr(context_stack_impl.context_stack.current, "width", 1)
        scale = np.where(bad, self.bad_update_scale, 1.0).astype(np.float32) if self.wants_client_names else None
        groups = self.group_round(datasets, workers, scale)
        output = self.next_groups(state, groups, **round_options)
        if self.robust is not None and self.robust.split_rounds_metrics:  # the stock split_rounds' entry
            output.metrics["robustness"] = collections.OrderedDict(bad_clients_in_round=int(sum(bad)))
        return output

    def next_group(self, state, group: collections.OrderedDict):
        """One round on data already stacked by `grouped_data.stack_datasets`."""
        return self.next_groups(state, [group])

    def next_groups(self, state, groups: list[collections.OrderedDict], **round_options):
        """One round on groups of clients, each stacked by `grouped_data.stack_datasets` (each group's
        training runs where TFF places that client slot: with `--workers`, each worker a
        contiguous slice of them);
        the robust aggregations' fields (`_robust_fields`) are added where missing."""
        if self.robust is not None:
            groups = _robust_fields(self.robust, groups)
        new_state, metrics = self.next_fn(state, groups, **round_options)
        return tff.learning.templates.LearningProcessOutput(new_state, collections.OrderedDict(metrics))

    @staticmethod
    def get_model_weights(state) -> tff.learning.models.ModelWeights:
        return state.global_model_weights

    @staticmethod
    def set_model_weights(state, weights):
        return state._replace(global_model_weights=weights)


def _robust_fields(spec, groups: list[collections.OrderedDict]) -> list[collections.OrderedDict]:
    """The groups with the `scale` [clients] that `grouped_robust` reads for scaled bad
    updates (1 = a good client) where it is missing."""
    if not spec.scaled:
        return groups
    return [
        g if "scale" in g else collections.OrderedDict(g, scale=np.ones(len(g["mask"]), np.float32)) for g in groups
    ]


def server_start(train, model_fn, weights_type, aggregator_state=tuple):
    """(initialize_fn, server_next): the process's initial state at SERVER (the model's weights,
    `aggregator_state()`'s value, called in the TF computation, and the server optimizer's state)
    and TFF's apply-optimizer step for `train`'s server optimizer (`apply_update` runs it)."""
    from tff_apps.learning import optimizers

    server_init, server_next = apply_optimizer_finalizer._build_tff_optimizer_initialize_and_next(
        weights_type, optimizers.server_optimizer(train), apply_optimizer_finalizer.reject_non_finite_update
    )

    @tff.tensorflow.computation
    def initialize_tf():
        return tff.learning.templates.LearningAlgorithmState(
            global_model_weights=tff.learning.models.ModelWeights.from_model(model_fn()),
            distributor=(), client_work=(), finalizer=server_init(), aggregator=aggregator_state(),
        )

    @tff.federated_computation
    def initialize_fn():
        return tff.federated_eval(initialize_tf, tff.SERVER)

    return initialize_fn, server_next


def apply_update(server_next, state, update, aggregator):
    """(new state, finalizer measurements), at SERVER: TFF's apply-optimizer finalizer on the
    aggregate `update`; the new state keeps `aggregator` in its aggregator slot."""
    weights = state.global_model_weights
    optimizer_state, trainable, finalizer_measurements = tff.federated_map(
        server_next, (state.finalizer, weights.trainable, update)
    )
    new_weights = tff.federated_zip(tff.learning.models.ModelWeights(trainable, weights.non_trainable))
    new_state = tff.federated_zip(
        tff.learning.templates.LearningAlgorithmState(new_weights, state.distributor, state.client_work, aggregator,
                                                      optimizer_state)
    )
    return new_state, finalizer_measurements


def stacked_group_type(input_spec, flatten: bool = False, spec=None) -> tff.StructType:
    if not isinstance(input_spec, collections.abc.Mapping) or set(input_spec) != {"x", "y"}:
        refuse_model("the model's input_spec is not a mapping of x and y")
    if any(input_spec[key].dtype != tf.float32 for key in ("x", "y")):
        refuse_model("the model's input_spec is not float32")
    dims = {key: input_spec[key].shape.as_list()[1:] for key in ("x", "y")}
    if (len(dims["x"]) != 1 and not flatten) or None in dims["x"] + dims["y"]:
        refuse_model("the model's input is not a vector per example (nor flattened by its first layer)")
    fields = [
        ("x", tff.TensorType(np.float32, [None, None, None, *dims["x"]])),
        ("y", tff.TensorType(np.float32, [None, None, None, *dims["y"]])),
        ("mask", tff.TensorType(np.float32, [None, None, None])),
    ]
    if spec is not None and spec.scaled:
        fields.append(("scale", tff.TensorType(np.float32, [None])))
    return tff.types.StructWithPythonType(fields, collections.OrderedDict)


def where_client(condition: tf.Tensor, new: tf.Tensor, old: tf.Tensor) -> tf.Tensor:
    """Per client (leading axis) `new` where condition else `old`; a shared scalar (the
    optimizer's learning rate or step) takes `new`."""
    if new.shape.rank == 0:
        return new
    return tf.where(tf.reshape(condition, [-1] + [1] * (new.shape.rank - 1)), new, old)


def stacked_optimizer_state(optimizer, start: list[tf.Tensor], clients: tf.Tensor):
    """The client optimizer's initial state for per-client weights: its per-weight slots
    (momentum, Adam's moments) get a leading clients axis; scalars stay shared."""
    specs = tuple(tf.TensorSpec(w.shape, w.dtype) for w in start)
    state = optimizer.initialize(specs)

    def stack(value):
        if isinstance(value, (tuple, list)) and len(value) == len(start):
            return tuple(tf.tile(tf.expand_dims(v, 0), [clients] + [1] * v.shape.rank) for v in value)
        return value

    return type(state)((key, stack(value)) for key, value in state.items())
