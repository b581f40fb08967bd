"""The per-batch protocol that vertical training used before `vertical_epoch` (two TFF calls per
mini-batch), kept as the reference the chunked protocol is held against.

Its computations and loop are the engine's as of commit 69d36c6: the lender receives z,
computes loss and g~ = (sigmoid(z) - y)/n + noise in its own computation (`lender_step`), the
coordinator broadcasts g~, and every party's update of batch k and forward of batch k+1 are
one computation (`backward_forward`). `train_per_batch` runs `train_vertical` with it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_apps.learning.vertical import VerticalComputations
from tff_apps.program import vertical_rounds
from tff_apps.program.vertical_rounds import MESSAGE_KINDS, _count, _partial_noise, batch_indices, draw_noise


class PerBatchComputations(VerticalComputations):
    def _build_forward(self, n):
        vec = tff.TensorType(np.float32, [n])

        @tff.tensorflow.computation(self.weight_type, self._x(n), vec)
        def encode(w, x, noise):
            return self._encode(w, x, noise)

        decode = self._decoder(n)

        @tff.federated_computation(self._clients(self.weight_type), self._clients(self._x(n)), self._clients(vec))
        def forward(w, x, noise):
            encoded = tff.federated_map(encode, (w, x, noise))
            return tff.federated_map(decode, tff.federated_secure_sum_bitwidth(encoded, self.bitwidth))

        return forward

    def _build_backward(self, n):
        vec = tff.TensorType(np.float32, [n])

        @tff.tensorflow.computation(self.weight_type, self.opt_type, self._x(n), vec)
        def update(w, opt, x, g):
            return self._update(w, opt, x, g)

        @tff.federated_computation(
            tff.FederatedType(vec, tff.SERVER), self._clients(self.weight_type),
            self._clients(self.opt_type), self._clients(self._x(n)),
        )
        def backward(g, w, opt, x):
            out = tff.federated_map(update, (w, opt, x, tff.federated_broadcast(g)))
            return out[0], out[1]

        return backward

    def _build_backward_forward(self, n, n_next):
        vec, vec_next = tff.TensorType(np.float32, [n]), tff.TensorType(np.float32, [n_next])

        @tff.tensorflow.computation(self.weight_type, self.opt_type, self._x(n), vec, self._x(n_next), vec_next)
        def update_and_encode(w, opt, x, g, x_next, noise_next):
            new_w, new_opt = self._update(w, opt, x, g)
            return new_w, new_opt, self._encode(new_w, x_next, noise_next)

        decode = self._decoder(n_next)

        @tff.federated_computation(
            tff.FederatedType(vec, tff.SERVER), self._clients(self.weight_type),
            self._clients(self.opt_type), self._clients(self._x(n)),
            self._clients(self._x(n_next)), self._clients(vec_next),
        )
        def backward_forward(g, w, opt, x, x_next, noise_next):
            out = tff.federated_map(update_and_encode, (w, opt, x, tff.federated_broadcast(g), x_next, noise_next))
            total = tff.federated_secure_sum_bitwidth(out[2], self.bitwidth)
            return out[0], out[1], tff.federated_map(decode, total)

        return backward_forward

    def _build_lender_step(self, n):
        vec = tff.TensorType(np.float32, [n])

        @tff.tensorflow.computation(vec, vec, vec)
        def lender_step(z, y, noise):
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=z))
            return loss, (tf.sigmoid(z) - y) / float(n) + noise

        return lender_step

    def forward(self, w, x, noise):
        self.calls += 1
        return self._get("forward", len(noise[0]))(w, x, noise)

    def lender_step(self, z, y, noise):
        self.calls += 1
        loss, g = self._get("lender_step", len(y))(z, y, noise)
        return float(loss), np.asarray(g, np.float32)

    def backward(self, g, w, opt, x):
        self.calls += 1
        return self._get("backward", len(g))(g, w, opt, x)

    def backward_forward(self, g, w, opt, x, x_next, noise_next):
        self.calls += 1
        return self._get("backward_forward", len(g), len(noise_next[0]))(g, w, opt, x, x_next, noise_next)


class PerBatchTraining(vertical_rounds._Training):
    """`_Training` with the per-batch loop (one schedule across epochs, as it was)."""

    def __init__(self, parties, labels, held_out, names, settings):
        super().__init__(parties, labels, held_out, names, settings)
        self.comps = PerBatchComputations(settings, self.n_parties, self.comps.width)

    def epochs(self, first_epoch: int, evaluate):
        schedule = [
            (epoch, rows)
            for epoch in range(first_epoch, self.s.epochs + 1)
            for rows in batch_indices(self.rows, self.s.batch_size, epoch, self.s.seed)
        ]
        if not schedule:
            return
        z = self.comps.forward(
            [s.weights for s in self.states], [s.features[schedule[0][1]] for s in self.states],
            [_partial_noise(s, self.s, len(schedule[0][1])) for s in self.states],
        )
        epoch_bytes, epoch_loss, epoch_started = dict.fromkeys(MESSAGE_KINDS, 0), 0.0, 0.0
        for k, (epoch, rows) in enumerate(schedule):
            next_rows = schedule[k + 1][1] if k + 1 < len(schedule) else None
            ends_epoch = next_rows is None or schedule[k + 1][0] != epoch
            loss, z = self._batch(z, rows, next_rows, ends_epoch)
            epoch_loss += loss * len(rows)
            _count(epoch_bytes, len(rows), self.n_parties)
            if ends_epoch:
                yield self._end_epoch(epoch, epoch_bytes, epoch_loss, epoch_started, evaluate)
                epoch_bytes, epoch_loss = dict.fromkeys(MESSAGE_KINDS, 0), 0.0

    def _batch(self, z, rows, next_rows, ends_epoch: bool):
        lender, n = self.states[0], len(rows)
        label_noise = (
            draw_noise(lender.noise_rng, self.s.label_noise_multiplier / n, n)
            if self.s.label_noise_multiplier > 0 else np.zeros(n, np.float32)
        )
        loss, g = self.comps.lender_step(z, lender.labels[rows], label_noise)
        if ends_epoch:
            self.noise_at_epoch_end = self._noise_states()
        weights, opts = [s.weights for s in self.states], [s.optimizer_state for s in self.states]
        x = [s.features[rows] for s in self.states]
        if next_rows is not None:
            weights, opts, z = self.comps.backward_forward(
                g, weights, opts, x, [s.features[next_rows] for s in self.states],
                [_partial_noise(s, self.s, len(next_rows)) for s in self.states],
            )
        else:
            weights, opts = self.comps.backward(g, weights, opts, x)
        for s, w, o in zip(self.states, weights, opts):
            s.weights = [np.asarray(a, np.float32) for a in w]
            s.optimizer_state = [np.asarray(a, np.float32) for a in o]
        self.coordinator.step += 1
        return loss, z


def train_per_batch(monkeypatch, *args, **kwargs):
    """`vertical_rounds.train_vertical` with the per-batch protocol."""
    with monkeypatch.context() as patch:
        patch.setattr(vertical_rounds, "_Training", PerBatchTraining)
        return vertical_rounds.train_vertical(*args, **kwargs)
