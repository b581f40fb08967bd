"""The chunked split-model protocol (`vertical_epoch`) with every party at its own site.

The same mathematics and the same traced loop per batch (`EpochComputations._batches`); what
changes is where a party's values come from and go to. In a simulation the coordinator's
process passes each party's weights, optimizer state, rows and noise as its CLIENTS value and
gets the new weights back. Across sites a party's CLIENTS value is only public: its run
folder at the site (`finance.site_folder`), the state tags to read and write, its encoded
width, the chunk's row positions (from the seeded batch order every party derives), its
noise scale and a public stream counter. The party's TensorFlow, on its own worker, reads
its weights and optimizer state and its encoded rows from the folder, draws its noise from
its own secret seed (a file the coordinator never reads; `tf.random.stateless_normal` folded
with the stream counter, so a resumed run replays the same noise), and writes the new state
back under the out tag; what returns to the coordinator is the party's step count.

The lender's release u (its labels and label noise), its training loss (from every batch's
z) and its evaluation histograms run at the lender only: every party runs the same
computation and a partner contributes zeros (its CLIENTS value says it is not the lender),
so a federated sum hands the coordinator the lender's values. z reaches the lender as its
own CLIENTS value (the partners get zeros), never by broadcast.

The secure sum across sites: TFF's open runtime sums `federated_secure_sum_bitwidth` in the
clear at the coordinator, so each party adds its pairwise mask (a file its gateway wrote in
the run folder, `tff_apps.sites.vertical_masks`) to its fixed-point values, mod 2^ring_bits,
before they leave its worker; the masks of all parties cancel in the sum, which the
coordinator decodes mod 2^ring_bits.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_apps.learning.vertical_epoch import EpochComputations, _tuple

HISTOGRAM_BINS = 4096  # the lender's evaluation histograms: metrics exact to 1/4096 of a score
_STR, _I32, _F32, _BOOL = np.str_, np.int32, np.float32, np.bool_


def _vec(dtype, *shape):
    return tff.TensorType(dtype, list(shape))


def _file(folder, name: str):
    return tf.strings.join([folder, "/", name])


def ring_bits(summer) -> int:
    """The ring of the masked sum: every party's values (each in [0, 2K]) add up below 2^bits."""
    return (summer.n_parties * 2 * summer.offset).bit_length()


def _masked(q, folder, mask_name, offset, n: int, bits: int):
    """q plus the party's masks of rows offset .. offset+n (its gateway's file), mod 2^bits."""
    masks = tf.io.decode_raw(tf.io.read_file(_file(folder, mask_name)), tf.int64)
    return tf.math.floormod(q + tf.slice(masks, tf.reshape(tf.cast(offset, tf.int64), [1]), [n]), 2**bits)


class SiteEpochComputations(EpochComputations):
    """`EpochComputations` whose party values live in each party's run folder at its site."""

    # -- the party's TensorFlow at its site --

    def _state_shapes(self) -> list[list[int]]:
        return [list(t.shape) for t in self.weight_type + self.opt_type]

    def _read_state(self, folder, tag):
        flat = tf.io.parse_tensor(tf.io.read_file(_file(folder, tf.strings.join(["state-", tag]))), tf.float32)
        parts, start = [], 0
        for shape in self._state_shapes():
            size = math.prod(shape)
            parts.append(tf.reshape(flat[start : start + size], shape))
            start += size
        k = len(self.weight_type)
        return parts[:k], parts[k:]

    def _write_state(self, folder, tag, w, opt):
        flat = tf.concat([tf.reshape(v, [-1]) for v in [*w, *opt]], axis=0)
        return tf.io.write_file(_file(folder, tf.strings.join(["state-", tag])), tf.io.serialize_tensor(flat))

    def _matrix(self, folder, split: str, width):
        """The party's encoded rows of a split ([rows, own width] on disk), padded to the common width."""
        values = tf.io.decode_raw(tf.io.read_file(_file(folder, f"{split}_x.f32")), tf.float32)
        x = tf.reshape(values, [-1, width])
        x = tf.pad(x, [[0, 0], [0, self.width - width]])
        return tf.ensure_shape(x, [None, self.width])

    def _noise(self, folder, std, stream, shape):
        seed = tf.io.decode_raw(tf.io.read_file(_file(folder, "noise_seed")), tf.int64)
        seed = tf.random.experimental.stateless_fold_in(tf.reshape(seed, [2]), stream[0])
        seed = tf.random.experimental.stateless_fold_in(seed, stream[1])
        return tf.random.stateless_normal(shape, seed) * std

    # -- computations --

    def _site_input(self, n_prev: int, n: int):
        # (folder, tag in, tag out, own width, previous batch's rows, this batch's rows, noise std, stream [2],
        #  mask file, the batch's first row in it)
        return _tuple(_STR, _STR, _STR, _I32, _vec(_I32, n_prev), _vec(_I32, n), _F32, _vec(np.int64, 2), _STR, _I32)

    def _party_step(self, site, g_prev, n_prev: int, n: int):
        """At the party's site: the previous batch's update with its g~ (if any), then (if n) this
        batch's encoded partial scores; the new state written under the out tag first."""
        folder, tag_in, tag_out, width, prev_rows, rows, std, stream, mask_name, mask_offset = site
        w, opt = self._read_state(folder, tag_in)
        x = self._matrix(folder, "train", width)
        if n_prev:
            w, opt = self._update(w, opt, tf.gather(x, prev_rows), g_prev)
        written = self._write_state(folder, tag_out, w, opt)
        with tf.control_dependencies([written]):
            if not n:
                return tf.identity(opt[0])  # the party's step count
            q = self._encode(w, tf.gather(x, rows), self._noise(folder, std, stream, [n]))
            return _masked(q, folder, mask_name, mask_offset, n, ring_bits(self))

    def _build_site_step(self, n_prev: int, n: int):
        """One batch across the sites, in TFF's mergeable form (one aggregation): g~ of the
        previous batch broadcast, each party's step at its site, the secure sum, z decoded."""
        site_type, g_type = self._site_input(n_prev, n), _vec(_F32, n_prev)

        @tff.tensorflow.computation(site_type, g_type)
        def step(site, g_prev):
            return self._party_step(site, g_prev, n_prev, n)

        decode = self._decoder(n, ring_bits(self))

        @tff.federated_computation(self._clients(site_type), tff.FederatedType(g_type, tff.SERVER))
        def site_step(sites, g_prev):
            encoded = tff.federated_map(step, (sites, tff.federated_broadcast(g_prev)))
            return tff.federated_map(decode, tff.federated_secure_sum_bitwidth(encoded, ring_bits(self)))

        return site_step

    def _build_site_flush(self, n_prev: int):
        """The epoch's last update (no batch to encode); returns the parties' summed step counts."""
        site_type, g_type = self._site_input(n_prev, 0), _vec(_F32, n_prev)

        @tff.tensorflow.computation(site_type, g_type)
        def flush(site, g_prev):
            return self._party_step(site, g_prev, n_prev, 0)

        @tff.federated_computation(self._clients(site_type), tff.FederatedType(g_type, tff.SERVER))
        def site_flush(sites, g_prev):
            return tff.federated_sum(tff.federated_map(flush, (sites, tff.federated_broadcast(g_prev))))

        return site_flush

    def _build_gradient(self, n: int):
        vec = _vec(_F32, n)

        @tff.tensorflow.computation(vec, vec)
        def gradient(z, u):
            return tf.sigmoid(z) / float(n) + u  # the coordinator's g~ (as `_CoordinatorSteps`)

        return gradient

    def _build_site_init(self):
        @tff.tensorflow.computation(_STR, _STR, self.weight_type, self.opt_type)
        def write(folder, tag, w, opt):
            with tf.control_dependencies([self._write_state(folder, tag, w, opt)]):
                return tf.identity(opt[0])

        @tff.federated_computation(
            self._clients(_STR), self._clients(_STR), self._clients(self.weight_type), self._clients(self.opt_type)
        )
        def init(folders, tags, w, opt):
            return tff.federated_map(write, (folders, tags, w, opt))

        return init

    def _build_site_release(self, rows: int):
        release_type = _tuple(_STR, _BOOL, _vec(_I32, rows), _vec(_F32, rows), _F32, _vec(np.int64, 2))

        @tff.tensorflow.computation(release_type)
        def release(site):
            folder, is_lender, order, batch_rows, sigma, stream = site

            def lender():
                y = tf.gather(tf.io.decode_raw(tf.io.read_file(_file(folder, "train_y.f32")), tf.float32), order)
                noise = self._noise(folder, sigma, stream, [rows]) / batch_rows
                return -y / batch_rows + noise  # u (vertical_epoch's module docstring)

            return tf.cond(is_lender, lender, lambda: tf.zeros([rows], tf.float32))

        @tff.federated_computation(self._clients(release_type))
        def release_all(sites):
            return tff.federated_sum(tff.federated_map(release, sites))

        return release_all

    def _build_site_loss(self, rows: int, batches: int):
        loss_type = _tuple(_STR, _BOOL, _vec(_F32, rows), _vec(_I32, rows), _vec(_I32, rows))

        @tff.tensorflow.computation(loss_type)
        def loss(site):
            folder, is_lender, z, order, batch = site

            def lender():
                y = tf.gather(tf.io.decode_raw(tf.io.read_file(_file(folder, "train_y.f32")), tf.float32), order)
                per_row = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=z)
                return tf.math.unsorted_segment_mean(per_row, batch, batches)

            return tf.cond(is_lender, lender, lambda: tf.zeros([batches], tf.float32))

        @tff.federated_computation(self._clients(loss_type))
        def loss_all(sites):
            return tff.federated_sum(tff.federated_map(loss, sites))

        return loss_all

    def _build_site_evaluate(self, rows: int):
        eval_type = _tuple(_STR, _STR, _I32, _STR)  # (folder, weights' tag, own width, mask file)

        @tff.tensorflow.computation(eval_type)
        def encode(site):
            folder, tag, width, mask_name = site
            w, _ = self._read_state(folder, tag)
            x = tf.ensure_shape(self._matrix(folder, "test", width), [rows, self.width])
            return _masked(self._fixed_point(tf.cast(self._score(w, x), tf.float64)), folder, mask_name, 0, rows,
                           ring_bits(self))

        decode = self._decoder(rows, ring_bits(self))

        @tff.federated_computation(self._clients(eval_type))
        def evaluate(sites):
            encoded = tff.federated_map(encode, sites)
            return tff.federated_map(decode, tff.federated_secure_sum_bitwidth(encoded, ring_bits(self)))

        return evaluate

    def _build_site_histograms(self, rows: int):
        hist_type = _tuple(_STR, _BOOL, _vec(_F32, rows))

        @tff.tensorflow.computation(hist_type)
        def histogram(site):
            folder, is_lender, z = site

            def lender():
                y = tf.cast(tf.io.decode_raw(tf.io.read_file(_file(folder, "test_y.f32")), tf.float32), tf.int32)
                bins = tf.clip_by_value(tf.cast(tf.floor(tf.sigmoid(z) * HISTOGRAM_BINS), tf.int32), 0, HISTOGRAM_BINS - 1)
                counts = tf.math.bincount(bins + y * HISTOGRAM_BINS, minlength=2 * HISTOGRAM_BINS,
                                          maxlength=2 * HISTOGRAM_BINS, dtype=tf.int64)
                return tf.reshape(counts, [2 * HISTOGRAM_BINS])  # a sum needs the static shape

            return tf.cond(is_lender, lender, lambda: tf.zeros([2 * HISTOGRAM_BINS], tf.int64))

        @tff.federated_computation(self._clients(hist_type))
        def histograms(sites):
            return tff.federated_sum(tff.federated_map(histogram, sites))

        return histograms

    # -- calls (each one TFF call) --

    def site_step(self, sites, g_prev: np.ndarray) -> np.ndarray:
        """z of one batch (one TFF call at the sites); `sites[p]` is party p's `_site_input` tuple."""
        self.calls += 1
        return np.asarray(self._get("site_step", len(sites[0][4]), len(sites[0][5]))(sites, g_prev), np.float32)

    def site_flush(self, sites, g_prev: np.ndarray) -> float:
        self.calls += 1
        return float(self._get("site_flush", len(sites[0][4]))(sites, g_prev))

    def gradient(self, z: np.ndarray, u: np.ndarray) -> np.ndarray:
        """The coordinator's g~ = sigmoid(z)/n + u (on its own worker)."""
        return np.asarray(self._get("gradient", len(z))(z, u), np.float32)

    def site_init(self, folders, tags, weights, optimizer_states):
        self.calls += 1
        return self._get("site_init")(folders, tags, weights, optimizer_states)

    def site_release(self, sites) -> np.ndarray:
        self.calls += 1
        return np.asarray(self._get("site_release", len(sites[0][2]))(sites), np.float32)

    def site_loss(self, sites, batches: int) -> np.ndarray:
        self.calls += 1
        return np.asarray(self._get("site_loss", len(sites[0][2]), batches)(sites), np.float32)

    def site_evaluate(self, sites, rows: int) -> np.ndarray:
        self.eval_calls += 1
        return np.asarray(self._get("site_evaluate", rows)(sites), np.float32)

    def site_histograms(self, sites) -> np.ndarray:
        self.eval_calls += 1
        return np.asarray(self._get("site_histograms", len(sites[0][2]))(sites), np.int64)


def site_score_sum(summer, folders: list[str], mask_name: str, rows: int) -> np.ndarray:
    """`tff-apps score` across sites: each party's worker reads its partial scores of the aligned
    customers (`score_aligned.f64` in its folder), clipped, encoded and masked as in training,
    and the secure sum's decoded z comes back (one TFF call). `summer`: the job's
    `vertical.SecureScoreSum` (parties, score bound)."""
    site_type = _tuple(_STR, _STR)

    @tff.tensorflow.computation(site_type)
    def encode(site):
        folder, masks = site
        scores = tf.io.decode_raw(tf.io.read_file(_file(folder, "score_aligned.f64")), tf.float64)
        return _masked(summer._fixed_point(tf.ensure_shape(scores, [rows])), folder, masks, 0, rows, ring_bits(summer))

    decode = summer._decoder(rows, ring_bits(summer))

    @tff.federated_computation(tff.FederatedType(site_type, tff.CLIENTS))
    def score_sum(sites):
        encoded = tff.federated_map(encode, sites)
        return tff.federated_map(decode, tff.federated_secure_sum_bitwidth(encoded, ring_bits(summer)))

    return np.asarray(score_sum([(folder, mask_name) for folder in folders]), np.float32)
