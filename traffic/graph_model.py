"""Graph forecasters: a district's sensors as one graph, weights shared across districts.

Two kinds (``model.kind``), both a GRU whose matrix products are graph convolutions, so a
sensor's next state mixes its neighbours' states (congestion travels upstream along the
road, and a downstream sensor's history tells what is coming):

``gcn_gru`` (T-GCN, Zhao et al. 2019)
    One graph convolution with the symmetric normalized adjacency
    D^-1/2 (A + A^T + I) D^-1/2: the road's direction is dropped.
``dcrnn`` (DCRNN's diffusion convolution, Li et al. 2018)
    Bidirectional random-walk diffusion of `DIFFUSION_STEPS` steps (1; the paper's K = 2):
    forward along the road's edges (D_out^-1 W, so a sensor reads what is downstream of it) and backward
    (D_in^-1 W^T); the encoder only, with the same head as gcn_gru.

Every weight acts on one sensor's features (shapes [features, units]), so the model does
not depend on a district's sensor count and FedAvg averages districts of any size.

Input x [batch, nodes, history * N_FEATURES + history + horizon + nodes]: each sensor's
flattened window (``traffic.windows``), its typical speed at each step of that hour and of the
hour to forecast (``traffic.typical``), then its row of the district's graph (W[i, :], the
edges from sensor i). TFF needs one input shape for every client, so districts are padded to the
largest district's sensor count: a padded sensor has no features, no edges (its rows and
columns are 0) and NaN targets, so it neither feeds a real sensor nor counts in the loss.
Putting the graph in every example costs nodes^2 floats a window (at most about as much
as the window itself) and keeps the engine's plain (x, y) datasets.

Output [batch, nodes, horizon]: every sensor's next `horizon` normalized speeds. The head
sees the final graph-GRU state, the sensor's own window (a skip connection: the sensor's own
recent history reaches the output without passing through the recurrence) and its typical
speeds (what this sensor usually does at this hour, which shared weights cannot know).

Speed (measured, docs/traffic.md "Graph models"): a graph convolution over all supports is two
products (`convolve`) and the Keras baselines run each step as one XLA program (traffic/app.py,
`fit_forecaster`); what is left is arithmetic, about (supports x units x 3 units) a sensor and
GRU step, so the GRU reads the hour in 2 steps of 30 minutes (`READINGS_PER_STEP`) and dcrnn
diffuses one step each way (`DIFFUSION_STEPS`): dcrnn's training step took 3.0 ms instead of
8.5 with XLA and 6.6 instead of 11.8 without, at the same validation MAE (within its noise).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import tensorflow as tf

# One diffusion step each way a GRU step (3 supports: I, forward, backward): a sensor still hears
# sensors further along the road through the recurrence and the input's mixing. DCRNN's K = 2 (5
# supports) gave the same validation and test MAE within noise on the generator's data at 1.6 x
# the arithmetic (docs/traffic.md); set it back for road graphs with longer reach.
DIFFUSION_STEPS = 1
# The GRU reads the hour in steps of 6 readings (30 min), their features side by side: half the
# sequential steps of 3 readings a step, a sixth of one a reading, with test MAEs within the
# screening's noise of 3 a step (docs/traffic.md).
# The head still sees every reading of the sensor's own hour.
READINGS_PER_STEP = 6


def supports(kind: str, weights: tf.Tensor) -> list[tf.Tensor]:
    """The matrices a graph convolution multiplies node features by ([batch, nodes, nodes] each)."""
    n = tf.shape(weights)[-1]
    eye = tf.eye(n, batch_shape=tf.shape(weights)[:1], dtype=weights.dtype)
    if kind == "gcn_gru":
        a = weights + tf.linalg.matrix_transpose(weights) + eye
        inv_sqrt = tf.math.rsqrt(tf.reduce_sum(a, axis=-1))  # >= 1: every node has its self-loop
        return [inv_sqrt[:, :, None] * a * inv_sqrt[:, None, :]]
    forward = _row_normalized(weights)
    backward = _row_normalized(tf.linalg.matrix_transpose(weights))
    found = [eye]
    for support in (forward, backward):
        power = eye
        for _ in range(DIFFUSION_STEPS):
            power = tf.matmul(support, power)
            found.append(power)
    return found


def support_count(kind: str) -> int:
    """How many matrices `supports` gives for `kind`."""
    return 1 if kind == "gcn_gru" else 1 + 2 * DIFFUSION_STEPS


def _row_normalized(weights: tf.Tensor) -> tf.Tensor:
    degree = tf.reduce_sum(weights, axis=-1, keepdims=True)
    return tf.math.divide_no_nan(weights, degree)  # a node without edges keeps a zero row


class GraphGRU(tf.keras.layers.Layer):
    """A GRU over `history` steps whose gate products are graph convolutions."""

    def __init__(self, kind: str, units: int, history: int, n_features: int, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.kind, self.units, self.history, self.n_features, self.seed = kind, units, history, n_features, seed

    def build(self, input_shape):
        glorot = lambda k: tf.keras.initializers.GlorotUniform(seed=self.seed + k)  # noqa: E731
        units, wide = self.units, support_count(self.kind)
        # [x, h] W = x W_x + h W_h: the input part of every step is one product before the loop.
        # Each kernel holds one block per support side by side ([in, supports * out], see `convolve`).
        self.input_kernel = self.add_weight("input_kernel", (self.n_features, wide * 3 * units), initializer=glorot(10))
        self.gate_h = self.add_weight("gate_h", (units, wide * 2 * units), initializer=glorot(11))
        self.candidate_h = self.add_weight("candidate_h", (units, wide * units), initializer=glorot(13))
        # bias 1 on the gates: start by keeping the state (as DCRNN does)
        self.gate_bias = self.add_weight("gate_bias", (2 * units,), initializer=tf.keras.initializers.Ones())
        self.candidate_bias = self.add_weight("candidate_bias", (units,), initializer="zeros")

    def call(self, inputs):
        """[sequence [batch, nodes, history, features], graph [batch, nodes, nodes]] -> [batch, nodes, units]."""
        sequence, graph = inputs
        weights = (self.input_kernel, self.gate_h, self.candidate_h, self.gate_bias, self.candidate_bias)
        return graph_gru_state(self.kind, self.units, self.history, weights, sequence, graph)


def graph_gru_state(kind: str, units: int, history: int, weights, sequence: tf.Tensor, graph: tf.Tensor) -> tf.Tensor:
    """`GraphGRU` as a function of its weights (input kernel, gate_h, candidate_h, gate bias,
    candidate bias): the final state [batch, nodes, units]."""
    input_kernel, gate_h, candidate_h, gate_bias, candidate_bias = weights
    mixing = concatenated(supports(kind, graph))
    n_supports = support_count(kind)
    batch, nodes = tf.shape(sequence)[0], tf.shape(sequence)[1]
    # every step's input part at once: the steps ride along as extra columns of the product
    per_step = tf.einsum("bntf,fo->bnto", sequence, input_kernel)  # [b, n, T, supports * 3u]
    per_step = tf.reshape(per_step, (batch, nodes, history, n_supports, 3 * units))
    per_step = tf.reshape(tf.transpose(per_step, (0, 1, 3, 2, 4)), (batch, nodes * n_supports, -1))
    per_step = tf.reshape(tf.matmul(mixing, per_step), (batch, nodes, history, 3 * units))
    gate_inputs = per_step[..., : 2 * units] + gate_bias
    candidate_inputs = per_step[..., 2 * units :] + candidate_bias
    state = tf.zeros((batch, nodes, units), sequence.dtype)
    for t in range(history):
        gates = tf.sigmoid(gate_inputs[:, :, t] + convolve(mixing, state, gate_h, n_supports))
        reset, update = tf.split(gates, 2, axis=-1)
        candidate = tf.tanh(candidate_inputs[:, :, t] + convolve(mixing, reset * state, candidate_h, n_supports))
        state = update * state + (1.0 - update) * candidate
    return state


def convolve(mixing: tf.Tensor, state: tf.Tensor, kernel: tf.Tensor, n_supports: int) -> tf.Tensor:
    """sum_k M_k state W_k in two products: state [b, n, u] @ kernel [u, supports * out] gives
    [b, n, supports * out], read as [b, n * supports, out] (row j * supports + k: node j's
    state through W_k), which `mixing` (row i: M_k[i, j] at column j * supports + k) sums."""
    batch, nodes = tf.shape(state)[0], tf.shape(state)[1]
    blocks = tf.reshape(tf.matmul(state, kernel), (batch, nodes * n_supports, -1))
    return tf.matmul(mixing, blocks)


def concatenated(mats: list[tf.Tensor]) -> tf.Tensor:
    """[batch, nodes, nodes * supports] with M_k[i, j] at [i, j * supports + k] (see `convolve`)."""
    stacked = tf.stack(mats, axis=-1)  # [batch, nodes, nodes, supports]
    shape = tf.shape(stacked)
    return tf.reshape(stacked, (shape[0], shape[1], shape[2] * len(mats)))


@dataclass(frozen=True)
class GraphShape:
    """What `build` makes a model of: its kind, width and the windows it reads."""

    kind: str
    units: int
    history: int
    n_features: int
    n_nodes: int
    horizon: int

    @property
    def per_step(self) -> int:
        return READINGS_PER_STEP if self.history % READINGS_PER_STEP == 0 else 1

    def parts(self, x):
        """x [batch, nodes, ...] (module docstring) -> (windows, typical speeds, graph rows,
        the GRU's input sequence [batch, nodes, steps, per_step * features])."""
        width, typical_width = self.history * self.n_features, self.history + self.horizon
        windows = x[:, :, :width]
        sequence = tf.reshape(windows, (-1, self.n_nodes, self.history // self.per_step, self.per_step * self.n_features))
        return windows, x[:, :, width : width + typical_width], x[:, :, width + typical_width :], sequence


def build(kind: str, units: int, history: int, n_features: int, n_nodes: int, horizon: int, seed: int):
    """The Keras graph forecaster (uncompiled), for districts padded to `n_nodes` sensors. It carries
    `stacked_forward` (the grouped engine's form of it: learning/dense_chain.py)."""
    glorot = lambda k: tf.keras.initializers.GlorotUniform(seed=seed + k)  # noqa: E731
    shape = GraphShape(kind, units, history, n_features, n_nodes, horizon)
    typical_width = history + horizon  # the sensor's typical speed at each step (traffic/typical.py)
    inputs = tf.keras.Input(shape=(n_nodes, history * n_features + typical_width + n_nodes), name="x")
    windows, typical, graph, sequence = shape.parts(inputs)
    gru = GraphGRU(kind, units, history // shape.per_step, shape.per_step * n_features, seed, name="graph_gru")
    hidden = tf.keras.layers.Dense(units, activation="relu", kernel_initializer=glorot(2))(
        tf.concat([gru([sequence, graph]), windows, typical], axis=-1)
    )
    outputs = tf.keras.layers.Dense(horizon, kernel_initializer=glorot(3))(hidden)
    model = tf.keras.Model(inputs, outputs)
    model.stacked_forward = functools.partial(stacked_forward, shape)
    return model


def stacked_forward(shape: GraphShape, weights: list[tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    """The model of `build` with every client's weights stacked (Keras order, a leading client
    axis) on x [clients, batch, nodes, ...]: predictions [clients, batch, nodes, horizon]."""
    return tf.vectorized_map(lambda args: _forward(shape, *args), (list(weights), x))


def _forward(shape: GraphShape, weights: list[tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    """One client's model as a function of its weights (`build`'s layers, in their order)."""
    windows, typical, graph, sequence = shape.parts(x)
    state = graph_gru_state(shape.kind, shape.units, shape.history // shape.per_step, weights[:5], sequence, graph)
    hidden = tf.nn.relu(tf.tensordot(tf.concat([state, windows, typical], axis=-1), weights[5], 1) + weights[6])
    return tf.tensordot(hidden, weights[7], 1) + weights[8]
