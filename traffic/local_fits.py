"""The local-only baseline's district models trained side by side: one TF program steps every
district's own model at once (the grouped engine's stacked training, `grouped.stacked_steps`),
instead of one Keras fit per district after another.

Each district's fit is the one `baselines.fit_forecaster` makes for it alone: the model built with
the district's seed, the client optimizer of [train] from a zeroed state, the same rows in the
same batches (`batch_order`), the masked MAE over the observed targets. The weights agree
with the one-by-one Keras fits up to float rounding (tests/traffic/test_local_fits.py). Only
models the grouped engine can stack qualify (`stackable_chain`: traffic's MLP, GRU and graph
models all do); another model is fit one district after another.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np

STEPS_PER_CALL = 500  # steps in one TF call: `stop` is checked between calls


def batch_order(n_rows: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """The rows of `steps` batches: shuffled passes over the rows, one after another."""
    rng = np.random.default_rng(seed)
    wanted = steps * batch_size
    return np.concatenate([rng.permutation(n_rows) for _ in range(-(-wanted // n_rows))])[:wanted]


def stackable_chain(model_fn):
    """`model_fn`'s model as the grouped engine stacks it, or None (it does not stack). It builds
    a throwaway model in a tf.Graph: call it before an eager model is built and before other
    threads use Keras (`train_and_evaluate` says why)."""
    from shared.errors import UserError
    from tff_apps.learning.dense_chain import read_dense_chain

    try:
        return read_dense_chain(model_fn)
    except UserError:
        return None


def fit_side_by_side(
    train, chain, build: Callable, districts: list[tuple[np.ndarray, np.ndarray, int, int]],
    batch_size: int, stop: threading.Event | None = None,
) -> list[list[np.ndarray]]:
    """Each district's trained weights (Keras order). `chain`: `stackable_chain`'s; `districts`:
    (x, y, steps, seed) each; `build(seed)` the uncompiled Keras model its fit starts from;
    `train` the [train] section (its client optimizer)."""
    import tensorflow as tf

    from tff_apps.learning.grouped import stacked_steps
    from tff_apps.learning.grouped_process import stacked_optimizer_state
    from tff_apps.learning.optimizers import client_optimizer
    from tff_apps.program.alongside import Cancelled

    optimizer = client_optimizer(train)
    weights = [tf.constant(np.stack(ws)) for ws in zip(*(_initial_weights(build, seed) for *_, seed in districts))]
    state = stacked_optimizer_state(optimizer, [w[0] for w in weights], len(districts))
    x, y, order, mask = _stacked_rows(districts, batch_size)

    @tf.function
    def run(weights, state, first, last):
        def batches(s):
            rows = order[:, first + s]
            return tf.gather(x, rows, batch_dims=1), tf.gather(y, rows, batch_dims=1), mask[:, first + s]

        weights, state, _ = stacked_steps(chain, optimizer, weights, state, batches, last - first)
        return weights, state

    steps = order.shape[1]
    for first in range(0, steps, STEPS_PER_CALL):
        if stop is not None and stop.is_set():
            raise Cancelled()
        weights, state = run(weights, state, tf.constant(first), tf.constant(min(first + STEPS_PER_CALL, steps)))
    return [[w[d].numpy() for w in weights] for d in range(len(districts))]


def _initial_weights(build: Callable, seed: int) -> list[np.ndarray]:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)  # as KerasBaselines.fit
    return build(seed).get_weights()


def _stacked_rows(districts, batch_size: int):
    """Each district's rows padded to the longest ([districts, rows, ...]), its batches' row
    indices [districts, steps, batch] and a mask of the real ones (a district with fewer
    steps than another is padded with empty steps, which leave its model as it is)."""
    import tensorflow as tf

    most_rows = max(len(x) for x, *_ in districts)
    most_steps = max(steps for _, _, steps, _ in districts)
    padded = lambda a: np.concatenate([a, np.zeros((most_rows - len(a), *a.shape[1:]), a.dtype)])  # noqa: E731
    order = np.zeros((len(districts), most_steps, batch_size), np.int32)
    mask = np.zeros((len(districts), most_steps, batch_size), np.float32)
    for d, (x, _, steps, seed) in enumerate(districts):
        order[d, :steps] = batch_order(len(x), steps, batch_size, seed).reshape(steps, batch_size)
        mask[d, :steps] = 1.0
    x = tf.constant(np.stack([padded(x) for x, *_ in districts]))
    y = tf.constant(np.stack([padded(y) for _, y, *_ in districts]))
    return x, y, tf.constant(order), tf.constant(mask)
