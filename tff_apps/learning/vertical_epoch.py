"""Many mini-batches of split-model training in one TFF call (`EpochComputations`).

The protocol of `tff_apps.learning.vertical`, run as chunks of at most `CHUNK_BATCHES`
consecutive mini-batches, each chunk inside one `tff.federated_computation`. A federated
computation is traced once, so its Python loop over the chunk's batches unrolls into a fixed
sequence of intrinsics; each batch k of the chunk is (with the zips and selections between)

    q_k   = federated_map(party step, CLIENTS)      each party: update with g~_{k-1}, encode batch k
    S_k   = federated_secure_sum_bitwidth(q_k)      the fixed-point sum, as in the per-batch protocol
    g~_k  = federated_map(coordinator step, SERVER) decode z_k, g~_k = sigmoid(z_k)/n + u_k
    g~_k -> federated_broadcast                     to every party

A per-party cursor (a scalar each party carries from one step to the next) picks batch k's rows
out of the chunk the party holds, so one traced TensorFlow function serves every batch of the
loop. A `tf.while_loop` cannot do this: TensorFlow runs at one placement, and every batch needs
the other parties' scores (through the secure sum) before any party can take its next step.

Why the lender's step moved out of the loop: TFF has no intrinsic that sends a SERVER value to
one client only (`federated_select` returns a dataset and costs ~15 ms a batch here), and a
broadcast would give z to the partners. But the label enters the gradient additively,
g~ = (sigmoid(z) - y)/n + N(0, (sigma/n)^2) = sigmoid(z)/n + u, with u = -y/n + noise. So
before the epoch, the lender computes u for every batch of the epoch at its own place
(`lender_release`, its labels and its DP noise) and sends it to the coordinator, which adds
sigmoid(z)/n once z is decoded. The coordinator's view is (z, u) instead of (z, g~): each is a
function of the other given z, so it learns exactly what it learned before; the partners get
g~ as before; the lender gets every batch's z after the epoch's chunks (`lender_loss`: its training
loss, from z and its own labels) and g~ by the broadcast. u is the Gaussian mechanism of the
per-batch protocol (sensitivity 1/n per label, each label in one batch per epoch), released
before z instead of after it: the label-DP accounting is unchanged.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_apps.learning.vertical import SCORE_FRACTION_BITS, VerticalComputations

# Batches per TFF call. TFF compiles an unrolled chunk in ~0.5 s a batch (once per chunk shape
# and run) and longer chunks did not run faster (docs/vertical-fl.md, "Many mini-batches per TFF call").
CHUNK_BATCHES = 32


def chunk_shape(chunk: list[np.ndarray]) -> tuple[int, int, int]:
    """(batches, rows of each but the last, rows of the last): the key of the chunk's computation."""
    return len(chunk), len(chunk[0]), len(chunk[-1])


def split_chunk(values: np.ndarray, chunk: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """`values[rows]` of the chunk's batches as (stacked [batches-1, n, ...], last [n_last, ...])."""
    return stack_batches(values[np.concatenate(chunk)], chunk_shape(chunk))


def stack_batches(values: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A chunk's batches laid end to end -> (the first batches-1 stacked, the last)."""
    batches, n, _ = shape
    head = (batches - 1) * n
    return values[:head].reshape(batches - 1, n, *values.shape[1:]), values[head:]


class EpochComputations(VerticalComputations):
    """The chunked protocol's computations (module docstring); `calls` counts training calls."""

    def _build_chunk(self, batches: int, n: int, n_last: int):
        """One call: `batches` mini-batches, the first batches-1 of n rows, the last of n_last.
        Each party's values travel as one CLIENTS struct and the coordinator's as one SERVER
        struct: every extra federated value in a loop step is another zip or selection
        intrinsic, i.e. time in TFF's runtime and in its compiler."""
        m = batches - 1
        party = _PartySteps(self, m, n, n_last)
        coordinator = _CoordinatorSteps(self, m, n, n_last)

        @tff.federated_computation(
            self._clients(self.weight_type), self._clients(self.opt_type), self._clients(party.xs),
            self._clients(party.x_last), self._clients(party.vs), self._clients(party.v_last),
            tff.FederatedType(party.vs, tff.SERVER), tff.FederatedType(party.v_last, tff.SERVER),
        )
        def chunk(w, opt, x, x_last, noise, noise_last, u, u_last):
            state = tff.federated_map(party.first, (w, opt, x, x_last, noise, noise_last))
            served = tff.federated_map(coordinator.start, (u, u_last))
            return self._batches(party, coordinator, state, served, batches)

        return chunk

    def _batches(self, party: "_PartySteps", coordinator: "_CoordinatorSteps", state, served, batches: int):
        """The chunk's traced loop (module docstring): every party's (weights, optimizer state)
        at the end, and the coordinator's (the chunk's z stacked, the last batch's z, its g~)."""
        m = batches - 1
        for k in range(batches):
            total = tff.federated_secure_sum_bitwidth(tff.federated_map(party.scores(k < m), state), self.bitwidth)
            served = tff.federated_map(coordinator.full if k < m else coordinator.last, (total, served))
            g = tff.federated_broadcast(tff.federated_map(coordinator.gradient(k < m), served))
            state = tff.federated_map(party.step(k, m), (state, g))
        return state, served

    def _build_lender_release(self, rows: int):
        vec = tff.TensorType(np.float32, [rows])

        @tff.tensorflow.computation(vec, vec, vec)
        def lender_release(y, noise, batch_rows):
            # u = -y/n + noise, n the row's batch size: the label's part of g~ (module docstring)
            return -y / batch_rows + noise

        return lender_release

    def _build_lender_loss(self, rows: int, batches: int):
        vec = tff.TensorType(np.float32, [rows])

        @tff.tensorflow.computation(vec, vec, tff.TensorType(np.int32, [rows]))
        def lender_loss(z, y, batch):
            """Each batch's mean cross-entropy at the z the coordinator decoded."""
            loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=z)
            return tf.math.unsorted_segment_mean(loss, batch, batches)

        return lender_loss

    # -- calls (each one TFF call) --

    def chunk(self, shape, w, opt, x, x_last, noise, noise_last, u, u_last):
        """Every party's (weights, optimizer state), and (the chunk's z stacked, the last batch's z, its g~)."""
        self.calls += 1
        return self._get("chunk", *shape)(w, opt, x, x_last, noise, noise_last, u, u_last)

    def lender_release(self, y: np.ndarray, noise: np.ndarray, batch_rows: np.ndarray) -> np.ndarray:
        """The lender's u of an epoch's rows in batch order (one TFF call, the lender's own)."""
        self.calls += 1
        return np.asarray(self._get("lender_release", len(y))(y, noise, batch_rows), np.float32)

    def lender_loss(self, z: np.ndarray, y: np.ndarray, batch: np.ndarray, batches: int) -> np.ndarray:
        """The lender's loss of each batch of an epoch (one TFF call, the lender's own)."""
        self.calls += 1
        return np.asarray(self._get("lender_loss", len(y), batches)(z, y, batch), np.float32)


def _tuple(*types):
    return tff.StructWithPythonType(list(types), tuple)


class _PartySteps:
    """A party's TensorFlow for one chunk shape. The state it carries from step to step is
    (weights, optimizer state, cursor, its chunk's rows, their noise, q): `cursor` is the
    stacked batch whose q (fixed-point scores) the state holds; the last batch is apart."""

    def __init__(self, comps: EpochComputations, m: int, n: int, n_last: int):
        self.c, self.m = comps, m
        self.xs, self.x_last = tff.TensorType(np.float32, [m, n, comps.width]), comps._x(n_last)
        self.vs, self.v_last = tff.TensorType(np.float32, [m, n]), tff.TensorType(np.float32, [n_last])
        data = (self.xs, self.x_last, self.vs, self.v_last)
        weights = (comps.weight_type, comps.opt_type)
        self.state = {
            last: _tuple(*weights, np.int32, *data, tff.TensorType(np.int64, [n_last if last else n]))
            for last in (False, True)
        }
        self.g = {last: tff.TensorType(np.float32, [n_last if last else n]) for last in (False, True)}
        self.first = self._first()
        self._scores = {last: self._take_scores(last) for last in (False, True)}
        self._steps = {}

    def scores(self, stacked: bool):
        return self._scores[not stacked]

    def _take_scores(self, last: bool):
        @tff.tensorflow.computation(self.state[last])
        def scores(state):
            return state[-1]

        return scores

    def _first(self):
        comps, stacked = self.c, self.m > 0

        @tff.tensorflow.computation(comps.weight_type, comps.opt_type, self.xs, self.x_last, self.vs, self.v_last)
        def first(w, opt, xs, x_last, noise, noise_last):
            q = comps._encode(w, xs[0], noise[0]) if stacked else comps._encode(w, x_last, noise_last)
            return w, opt, tf.constant(0, tf.int32), xs, x_last, noise, noise_last, q

        return first

    def step(self, k: int, m: int):
        """Batch k's update with g~, then the encoding of batch k+1 (stacked, or the last);
        after the last batch, the update alone (the state is then (weights, optimizer state))."""
        kind = "last" if k == m else ("to_last" if k + 1 == m else "stacked")
        if kind not in self._steps:
            self._steps[kind] = self._step(kind)
        return self._steps[kind]

    def _step(self, kind: str):
        comps, last = self.c, kind == "last"

        @tff.tensorflow.computation(self.state[last], self.g[last])
        def step(state, g):
            w, opt, cursor, xs, x_last, noise, noise_last, _ = state
            if last:
                return comps._update(w, opt, x_last, g)
            new_w, new_opt = comps._update(w, opt, xs[cursor], g)
            if kind == "stacked":
                q = comps._encode(new_w, xs[cursor + 1], noise[cursor + 1])
            else:
                q = comps._encode(new_w, x_last, noise_last)
            return new_w, new_opt, cursor + 1, xs, x_last, noise, noise_last, q

        return step


class _CoordinatorSteps:
    """The coordinator's TensorFlow: decode the secure sum into z, keep it, and make
    g~ = sigmoid(z)/n + u with the lender's u. Its state: (u, u_last, cursor, the z so far, g~)."""

    def __init__(self, comps: EpochComputations, m: int, n: int, n_last: int):
        total_offset = comps.n_parties * comps.offset
        vs, v_last = tff.TensorType(np.float32, [m, n]), tff.TensorType(np.float32, [n_last])
        v = tff.TensorType(np.float32, [n])
        state = _tuple(vs, v_last, np.int32, vs, v)

        def decode(total):
            return tf.cast(total - total_offset, tf.float32) * (2.0**-SCORE_FRACTION_BITS)

        @tff.tensorflow.computation(vs, v_last)
        def start(u, u_last):
            return u, u_last, tf.constant(0, tf.int32), tf.zeros_like(u), tf.zeros([n], tf.float32)

        @tff.tensorflow.computation(tff.TensorType(np.int64, [n_last]), state)
        def last(total, served):
            _, u_last, _, zs, _ = served
            z = decode(total)
            return zs, z, tf.sigmoid(z) / float(n_last) + u_last

        @tff.tensorflow.computation(state)
        def gradient_full(served):
            return served[-1]

        @tff.tensorflow.computation(_tuple(vs, v_last, v_last))
        def gradient_last(served):
            return served[-1]

        if m > 0:  # a chunk of one batch has no stacked batch (and TF refuses a scatter into [0, n])

            @tff.tensorflow.computation(tff.TensorType(np.int64, [n]), state)
            def full(total, served):
                u, u_last, cursor, zs, _ = served
                z = decode(total)
                zs = tf.tensor_scatter_nd_update(zs, [[cursor]], z[tf.newaxis])
                return u, u_last, cursor + 1, zs, tf.sigmoid(z) / float(n) + u[cursor]

            self.full = full
        self.start, self.last = start, last
        self._gradient = {True: gradient_full, False: gradient_last}

    def gradient(self, stacked: bool):
        return self._gradient[stacked]
