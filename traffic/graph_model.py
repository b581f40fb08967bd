"""Graph forecasters: a district's sensors as one graph, weights shared across districts.

Two kinds (``model.kind``), both a GRU whose matrix products are graph convolutions, so a
sensor's next state mixes its neighbours' states (congestion travels upstream along the
road, and a downstream sensor's history tells what is coming):

``gcn_gru`` (T-GCN, Zhao et al. 2019)
    One graph convolution with the symmetric normalized adjacency
    D^-1/2 (A + A^T + I) D^-1/2: the road's direction is dropped.
``dcrnn`` (DCRNN's diffusion convolution, Li et al. 2018)
    Bidirectional random-walk diffusion of `DIFFUSION_STEPS` steps: forward along the
    road's edges (D_out^-1 W, so a sensor reads what is downstream of it) and backward
    (D_in^-1 W^T); the encoder only, with the same head as gcn_gru.

Every weight acts on one sensor's features (shapes [features, units]), so the model does
not depend on a district's sensor count and FedAvg averages districts of any size.

Input x [batch, nodes, history * N_FEATURES + nodes]: each sensor's flattened window
(``traffic.windows``), then its row of the district's graph (W[i, :], the edges from
sensor i). TFF needs one input shape for every client, so districts are padded to the
largest district's sensor count: a padded sensor has no features, no edges (its rows and
columns are 0) and NaN targets, so it neither feeds a real sensor nor counts in the loss.
Putting the graph in every example costs nodes^2 floats a window (at most about as much
as the window itself) and keeps the engine's plain (x, y) datasets.

Output [batch, nodes, horizon]: every sensor's next `horizon` normalized speeds. The head
sees the final graph-GRU state and the sensor's own window (a skip connection: the sensor's
own recent history reaches the output without passing through the recurrence).
"""

from __future__ import annotations

import tensorflow as tf

DIFFUSION_STEPS = 2


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


def _row_normalized(weights: tf.Tensor) -> tf.Tensor:
    degree = tf.reduce_sum(weights, axis=-1, keepdims=True)
    return tf.math.divide_no_nan(weights, degree)  # a node without edges keeps a zero row


class GraphGRU(tf.keras.layers.Layer):
    """A GRU over `history` steps whose gate products are graph convolutions."""

    def __init__(self, kind: str, units: int, history: int, n_features: int, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.kind, self.units, self.history, self.n_features, self.seed = kind, units, history, n_features, seed

    def build(self, input_shape):
        n_supports = 1 if self.kind == "gcn_gru" else 1 + 2 * DIFFUSION_STEPS
        glorot = lambda k: tf.keras.initializers.GlorotUniform(seed=self.seed + k)  # noqa: E731
        # kernels split into the part acting on the inputs and the part acting on the state
        # ([x, h] W = x W_x + h W_h): the input part of all steps is one product before the loop
        x_in, h_in = self.n_features * n_supports, self.units * n_supports
        self.gate_x = self.add_weight("gate_x", (x_in, 2 * self.units), initializer=glorot(10))
        self.gate_h = self.add_weight("gate_h", (h_in, 2 * self.units), initializer=glorot(11))
        # bias 1 on the gates: start by keeping the state (as DCRNN does)
        self.gate_bias = self.add_weight("gate_bias", (2 * self.units,), initializer=tf.keras.initializers.Ones())
        self.candidate_x = self.add_weight("candidate_x", (x_in, self.units), initializer=glorot(12))
        self.candidate_h = self.add_weight("candidate_h", (h_in, self.units), initializer=glorot(13))
        self.candidate_bias = self.add_weight("candidate_bias", (self.units,), initializer="zeros")

    def call(self, inputs):
        """[sequence [batch, nodes, history, features], graph [batch, nodes, nodes]] -> [batch, nodes, units]."""
        sequence, graph = inputs
        mats = supports(self.kind, graph)
        shape = tf.shape(sequence)
        flat = tf.reshape(sequence, (shape[0], shape[1], self.history * self.n_features))
        mixed = tf.stack([tf.matmul(m, flat) for m in mats], axis=-2)  # [batch, nodes, supports, history * features]
        mixed = tf.reshape(mixed, (shape[0], shape[1], len(mats), self.history, self.n_features))
        mixed = tf.reshape(tf.transpose(mixed, (0, 1, 3, 2, 4)), (shape[0], shape[1], self.history, -1))
        gate_inputs = tf.einsum("bntf,fu->bntu", mixed, self.gate_x) + self.gate_bias
        candidate_inputs = tf.einsum("bntf,fu->bntu", mixed, self.candidate_x) + self.candidate_bias
        state = tf.zeros((shape[0], shape[1], self.units), sequence.dtype)
        for t in range(self.history):
            gates = tf.sigmoid(gate_inputs[:, :, t] + self._convolve(mats, state, self.gate_h))
            reset, update = tf.split(gates, 2, axis=-1)
            candidate = tf.tanh(candidate_inputs[:, :, t] + self._convolve(mats, reset * state, self.candidate_h))
            state = update * state + (1.0 - update) * candidate
        return state

    @staticmethod
    def _convolve(mats, state, kernel):
        mixed = tf.concat([tf.matmul(m, state) for m in mats], axis=-1)  # [batch, nodes, supports * units]
        return tf.einsum("bnf,fu->bnu", mixed, kernel)


def build(kind: str, units: int, history: int, n_features: int, n_nodes: int, horizon: int, seed: int):
    """The Keras graph forecaster (uncompiled), for districts padded to `n_nodes` sensors."""
    glorot = lambda k: tf.keras.initializers.GlorotUniform(seed=seed + k)  # noqa: E731
    width = history * n_features
    inputs = tf.keras.Input(shape=(n_nodes, width + n_nodes), name="x")
    windows = inputs[:, :, :width]
    graph = inputs[:, :, width:]
    sequence = tf.reshape(windows, (-1, n_nodes, history, n_features))
    state = GraphGRU(kind, units, history, n_features, seed, name="graph_gru")([sequence, graph])
    hidden = tf.keras.layers.Dense(units, activation="relu", kernel_initializer=glorot(2))(
        tf.concat([state, windows], axis=-1)
    )
    outputs = tf.keras.layers.Dense(horizon, kernel_initializer=glorot(3))(hidden)
    return tf.keras.Model(inputs, outputs)
