"""Record-level DP-SGD in the grouped engine: every client's DP-SGD (`dp_sgd`) in one TFF call.

The round inputs are the stock ones (`dp_sgd.poisson_client_dataset`: one element per local
step, the Poisson batch padded to a width with a 0/1 mask, and the expected batch size).
`stack_poisson_datasets` stacks a group of them into x [clients, steps, width, ...], y likewise,
mask [clients, steps, width], expected_batch_size [clients, steps] and active [clients, steps]:
clients take different numbers of steps (`dp_config.record_steps_per_round`), so the steps
after a client's last one are inactive. An active step whose batch is empty is NOT skipped:
it is a step on noise alone, as in the stock client work.

Each step, for every client at once (`_local_dp_sgd`, `_dp_sgd_gradients`), does what
`dp_sgd._dp_sgd_local_training` does at one client:
- per-example gradients, each clipped to L2 norm C over all trainable tensors (non-finite
  gradients and padding contribute 0) and summed per client, without forming them
  (`_clipped_gradient_sums`: a Dense layer's per-example gradient is an outer product, so
  its norm and the clipped sum come from the layer's inputs and output gradients);
- N(0, (zC)^2) noise added to every coordinate of every
  client (TF's unseeded generator, as in `dp_sgd`), divided by the client's expected batch
  size, plus the gradient of the client's weight regularization;
- the client optimizer steps where the step is active (its state restarts every round).

The update is w0 - w (zeroed if non-finite), the client's weight 1 (0 if zeroed). The round
then aggregates as the stock record-level process does (`grouped.py`): the uniform mean (the
stock `as_weighted_aggregator(UnweightedMeanFactory())`: a zeroed client still counts), or that
mean compressed or inside clip_zero ([communication], [robustness]), or the uniform "simulated"
or "masked" secure sum; then TFF's server-optimizer finalizer. No training metrics, as in the
stock process.

Only models whose per-example loss the grouped chain computes exactly as
`dp_sgd.keras_per_example_loss` does run here: a masked mean loss (`masked_parts`) or a GRU
is refused (UserError naming train.engine; with "auto" the stock process is built instead).
"""

from __future__ import annotations

import collections
import collections.abc

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.common_libs import structure

from shared.errors import UserError
from tff_apps.learning import grouped_data
from tff_apps.learning.dense_chain import ENGINE_KEY, DenseChain
from tff_apps.learning.dp_sgd import PoissonRoundSteps
from tff_apps.learning.grouped_process import stacked_group_type, stacked_optimizer_state, where_client

POISSON_FIELDS = ("x", "y", "mask", "expected_batch_size", "active")


# -- the round's groups ----------------------------------------------------------------------


def poisson_round_groups(datasets: list[tf.data.Dataset], workers: int = 1, scale=None) -> list:
    """`grouped_data.round_groups` for DP-SGD's Poisson round inputs (`scale`: unused, DP-SGD
    runs without scaled bad updates)."""
    return grouped_data.round_groups(datasets, workers, None, stack=stack_poisson_datasets)


def stack_poisson_datasets(datasets: list[tf.data.Dataset]) -> collections.OrderedDict:
    """Clients' `dp_sgd.poisson_client_dataset`s -> the group's fields (module docstring),
    padded to the group's most steps and widest batch."""
    clients = [_poisson_steps(ds) for ds in datasets]
    if not clients:
        raise ValueError("grouped engine: a round needs at least one client")
    steps = max(1, max(len(c["mask"]) for c in clients))
    width = max(c["mask"].shape[1] for c in clients)
    n = len(clients)
    x0, y0 = clients[0]["x"], clients[0]["y"]
    group = collections.OrderedDict(
        x=np.zeros((n, steps, width, *x0.shape[2:]), np.float32),
        y=np.zeros((n, steps, width, *y0.shape[2:]), np.float32),
        mask=np.zeros((n, steps, width), np.float32),
        expected_batch_size=np.ones((n, steps), np.float32),  # 1 on inactive steps: no division by 0
        active=np.zeros((n, steps), np.float32),
    )
    for c, client in enumerate(clients):
        s, w = client["mask"].shape
        for key in ("x", "y", "mask"):
            group[key][c, :s, :w] = client[key]
        group["expected_batch_size"][c, :s] = client["expected_batch_size"]
        group["active"][c, :s] = 1.0
    return group


def _poisson_steps(dataset: tf.data.Dataset) -> dict[str, np.ndarray]:
    """One client's steps: x [steps, width, ...], y likewise, mask [steps, width], expected
    batch size [steps].

    `dp_sgd.PoissonRoundSteps` holds those arrays; `dp_sgd.padded_dataset` builds
    `from_tensor_slices(steps)`: its tensors are read straight from the dataset (iterating costs
    about 20 ms per client, as `grouped_data._client_rows` measured). Any other dataset of the
    same elements is iterated."""
    if isinstance(dataset, PoissonRoundSteps):
        element = dataset.element
    elif type(dataset).__name__ == "_TensorSliceDataset":
        element = tf.nest.pack_sequence_as(dataset.element_spec, [np.asarray(t) for t in dataset._tensors])
    else:
        elements = list(dataset.as_numpy_iterator())
        if not elements:
            raise ValueError("grouped engine: a client's DP-SGD round input has no steps")
        element = tf.nest.map_structure(lambda *steps: np.stack(steps), *elements)
    batch = element.get("batch") if isinstance(element, collections.abc.Mapping) else None
    if not isinstance(batch, collections.abc.Mapping):
        raise ValueError("grouped engine: a DP-SGD round input is not dp_sgd.poisson_client_dataset's")
    return {
        "x": batch["x"], "y": batch["y"], "mask": element["mask"],
        "expected_batch_size": element["expected_batch_size"],
    }


# -- the round's local training ---------------------------------------------------------------


def dp_sgd_training(chain: DenseChain, optimizer, plan, input_spec):
    """What `grouped.build_grouped_process` runs at the clients for record-level DP: (local
    training (start, group) -> (updates, weights, no metric sums: the stock DP-SGD process
    reports none, they would not be private), the Poisson group type). Clip
    `plan.section.clip_norm`, noise multiplier `plan.noise_multiplier`."""
    _refuse_unmatched_loss(chain)
    clip_norm, noise_multiplier = float(plan.section.clip_norm), float(plan.noise_multiplier)

    def local_training(start, group):
        updates, weights = _local_dp_sgd(chain, optimizer, clip_norm, noise_multiplier, start, group)
        return updates, weights, collections.OrderedDict()

    return local_training, _poisson_group_type(stacked_group_type(input_spec, chain.flatten))


def _refuse_unmatched_loss(chain: DenseChain) -> None:
    """Refuses models whose per-example loss here would differ from `dp_sgd.keras_per_example_loss`'s."""
    what = ("a masked mean loss" if hasattr(chain.loss, "masked_parts") else "a GRU layer" if chain.gru
            else "a model carrying its own stacked form" if chain.stacked_forward else "")
    if what:
        raise UserError(
            f"{ENGINE_KEY} = 'grouped' runs record-level DP-SGD for Dense chains with a per-example Keras loss only, "
            f"not {what}; use {ENGINE_KEY} = 'tff'"
        )


def _poisson_group_type(base: tff.StructType) -> tff.StructType:
    """The group type of `grouped.group_type` (x, y, mask) and the per-step fields."""
    fields = [(name, value) for name, value in structure.to_elements(base) if name in ("x", "y", "mask")]
    fields += [(name, tff.TensorType(np.float32, [None, None])) for name in ("expected_batch_size", "active")]
    assert [name for name, _ in fields] == list(POISSON_FIELDS)
    return tff.types.StructWithPythonType(fields, collections.OrderedDict)


# -- the local training ----------------------------------------------------------------------


def _local_dp_sgd(chain, optimizer, clip_norm, noise_multiplier, start, group):
    """Every client's DP-SGD from `start`: (updates [clients, ...] zeroed where non-finite,
    weights [clients]: 1, or 0 for a zeroed client)."""
    mask = group["mask"]
    clients, steps = tf.shape(mask)[0], tf.shape(mask)[1]
    anchor = [tf.tile(tf.expand_dims(w, 0), [clients] + [1] * w.shape.rank) for w in start]

    def step(s, weights, state):
        gradients = _dp_sgd_gradients(chain, weights, group, s, clip_norm, noise_multiplier)
        new_state, new_weights = optimizer.next(state, tuple(weights), tuple(gradients))
        active = group["active"][:, s] > 0  # a client's inactive steps come after its last one
        new_weights = [where_client(active, n, w) for n, w in zip(new_weights, weights)]
        new_state = tf.nest.map_structure(lambda n, o: where_client(active, n, o), new_state, state)
        return s + 1, new_weights, new_state

    initial = (tf.constant(0), anchor, stacked_optimizer_state(optimizer, start, clients))
    _, final, _ = tf.while_loop(lambda s, *_: s < steps, step, initial)
    updates = [a - w for a, w in zip(anchor, final)]
    finite = tf.reduce_all(
        tf.stack([tf.reduce_all(tf.math.is_finite(u), axis=list(range(1, u.shape.rank))) for u in updates]), 0
    )
    updates = [where_client(finite, u, tf.zeros_like(u)) for u in updates]
    return updates, tf.where(finite, 1.0, 0.0)


def _dp_sgd_gradients(chain, weights, group, s, clip_norm, noise_multiplier) -> list[tf.Tensor]:
    """Step `s`'s gradient per client: (clipped sum + noise) / expected batch size + the
    regularization's gradient."""
    sums = _clipped_gradient_sums(chain, weights, group["x"][:, s], group["y"][:, s], group["mask"][:, s], clip_norm)
    if noise_multiplier > 0:
        sums = [g + tf.random.normal(tf.shape(g), stddev=noise_multiplier * clip_norm, dtype=g.dtype) for g in sums]
    expected = group["expected_batch_size"][:, s]
    gradients = [g / tf.reshape(expected, [-1] + [1] * (g.shape.rank - 1)) for g in sums]
    with tf.GradientTape() as tape:
        tape.watch(weights)
        penalty = tf.reduce_sum(chain.regularization(weights))  # per client: its own kernels only
    regularization = tape.gradient(penalty, weights, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return [g + r for g, r in zip(gradients, regularization)]


def _clipped_gradient_sums(chain: DenseChain, weights, x, y, mask, clip_norm: float) -> list[tf.Tensor]:
    """Per client, sum_i mask_i * g_i * min(1, C / ||g_i||) over its examples i, g_i example i's
    gradient of its data loss (the norm over all tensors; a non-finite g_i contributes 0), as
    `dp_sgd._clipped_sum` at one client, without forming any g_i (Goodfellow 2015): a Dense
    layer's per-example kernel gradient is the outer product of its input a_i and the gradient
    d_i of its output before the activation, its bias gradient d_i. So ||g_i||^2 is the sum over
    layers of ||a_i||^2 ||d_i||^2 (+ ||d_i||^2 with a bias), and the clipped sum of kernel
    gradients is sum_i s_i a_i d_i^T, one batched matmul per layer."""
    if chain.flatten:
        x = tf.reshape(x, tf.concat([tf.shape(x)[:2], [-1]], 0))
    inputs, outputs = [], []
    with tf.GradientTape() as tape:
        hidden, position = x, 0
        for activation, bias in zip(chain.activations, chain.use_bias):
            inputs.append(hidden)
            output = tf.matmul(hidden, weights[position])
            position += 1
            if bias:
                output = output + tf.expand_dims(weights[position], 1)
                position += 1
            tape.watch(output)  # a plain tensor, not a variable: the tape follows it from here
            outputs.append(output)
            hidden = activation(output)
        total = tf.reduce_sum(_per_example_losses(chain.loss, y, hidden))
    # an example's loss depends on its own row only: the gradient of the sum is d_i per row
    deltas = tape.gradient(total, outputs, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    squared = tf.add_n([
        tf.reduce_sum(tf.square(d), -1) * (tf.reduce_sum(tf.square(a), -1) + (1.0 if bias else 0.0))
        for a, d, bias in zip(inputs, deltas, chain.use_bias)
    ])  # [clients, width]
    finite = tf.math.is_finite(squared)
    scale = tf.where(finite, tf.minimum(1.0, clip_norm / tf.maximum(tf.sqrt(tf.where(finite, squared, 0.0)), 1e-12)), 0.0)
    scale = scale * mask
    sums = []
    for a, d, bias in zip(inputs, deltas, chain.use_bias):
        scaled = tf.where(finite[..., tf.newaxis], d * scale[..., tf.newaxis], 0.0)  # a non-finite example: 0, not 0 * NaN
        sums.append(tf.matmul(tf.where(finite[..., tf.newaxis], a, 0.0), scaled, transpose_a=True))  # [clients, in, out]
        if bias:
            sums.append(tf.reduce_sum(scaled, axis=1))
    return sums


def _per_example_losses(loss, y: tf.Tensor, predictions: tf.Tensor) -> tf.Tensor:
    """`dp_sgd.keras_per_example_loss`'s data loss of each example of [clients, width, ...]:
    the Keras loss unreduced (its `call`), averaged over any axes after the example's ->
    [clients, width]."""
    values = loss.call(y, predictions)  # [clients, width, ...]
    if values.shape.rank > 2:
        values = tf.reduce_mean(values, axis=list(range(2, values.shape.rank)))
    return values
