"""Split-model (vertical) federated training as TFF computations.

Parties hold different columns of the same customers, aligned row by row beforehand (private
set intersection): row k of every party's matrix is the same customer. Party 0 is the
*lender* (the active party, it alone holds the labels); parties 1.. are *partners* (passive).
The engine is domain-free: it sees encoded float32 matrices and 0/1 labels.

Model
-----
Each party p runs a bottom model on its own columns and outputs one partial score per row,
clipped to the public bound B (`score_bound`): s_p = clip(bottom(w_p, x_p), -B, B).
bottom is `logistic` (x @ kernel + bias) or `mlp` (relu(x @ k1 + b1) @ k2 + b2). The logit is
z = sum_p s_p, the prediction sigmoid(z), the loss the mean binary cross-entropy over the
batch plus l2/2 * ||kernels_p||^2 for each party on its own kernels (biases are not penalised).
The clip is part of the model (`shared.split_model.predict_proba` applies it too): a party
whose score is clipped on a row gets zero gradient for that row, so training is exact
gradient descent on this model. With scores inside +-B (the usual case) it is the plain sum
model, i.e. a centralized model on the joined columns with one bias per party. Weights per party are
float32 arrays in Keras Dense order: logistic [kernel (d,1), bias (1,)], mlp
[kernel1 (d,h), bias1 (h,), kernel2 (h,1), bias2 (1,)]. Init: logistic zeros; mlp
Glorot-uniform kernels from `default_rng([seed, 0, party_index])`, zero biases.

Roles and messages, per mini-batch of n aligned rows (TFF places the parties as CLIENTS and
the coordinator as SERVER; `vertical_epoch` runs them)
-----------------------------------------------------------------------------------------
1. forward (federated): each party computes s_p on its rows, a partner adds its own noise
   N(0, partial_noise_std^2) if asked, clips to +-B and encodes in fixed point:
   q_p = round(s_p * 2^F) + K, F = SCORE_FRACTION_BITS = 16 (step 2^-16 ~ 1.5e-5, rounding
   error <= 2^-17 per party and row), K = ceil(B * 2^F), so 0 <= q_p <= 2K. The int64 vectors
   go through `tff.federated_secure_sum_bitwidth` with bitwidth = bit_length(2K) (the range
   of one party's value; 23 bits for B = 32); the coordinator decodes z = (sum - P*K) * 2^-F
   (float32, exact for |z| < 2^(24-F) = 256) and sees only that sum.
2. gradient: g = dL/dz = (sigmoid(z) - y) / n. With label protection the released gradient
   is g~ = g + N(0, (sigma / n)^2): flipping one label y_i changes exactly one entry, g_i,
   by exactly 1/n (the sigmoid term does not depend on y_i), so the L2 sensitivity is 1/n of
   the batch actually drawn (the last batch of an epoch may be smaller). The label enters
   additively, g~ = sigmoid(z)/n + u with u = -y/n + noise, so the lender releases u (its own
   computation, before the epoch, `vertical_epoch.EpochComputations.lender_release`) and the
   coordinator adds sigmoid(z)/n once it has decoded z: TFF has no intrinsic that sends z
   to the lender alone inside a computation, and a broadcast would give it to the partners.
   The coordinator's view (z, u) and (z, g~) are functions of each other. The noise is drawn
   with unseeded OS randomness (DP noise must not be predictable from the job seed;
   everything else is seeded). After the batches, the coordinator hands the lender every z
   (its training loss, `lender_loss`).
3. backward (federated): the coordinator broadcasts g~ (SERVER -> CLIENTS); every party
   updates its own weights with a tf.GradientTape on its bottom model
   (output_gradients = g~) plus its l2 term, by SGD or Adam (optimizer state party-held).
   Steps 1-3 of up to `vertical_epoch.CHUNK_BATCHES` consecutive batches run in one TFF call
   (a federated computation whose traced loop holds a secure sum per batch); TFF calls per
   epoch: ceil(batches / CHUNK_BATCHES) + 2 (the lender's release and loss).
4. evaluation (federated, `evaluate`): the forward of step 1 without partial noise, on each
   party's own held-out rows; the coordinator passes the decoded z to the lender, which
   scores it against its own labels. Scoring (`SecureScoreSum`): each party's exported model
   gives its partial scores as its CLIENTS value, clipped, encoded and summed as in step 1.

Deviation from a "clean lender update": the lender updates with the same g~ it released, not
with its clean g. If the lender trained on clean gradients, its weights would depend on every
label outside the noise, and every later z and g~ would carry that dependence to the
coordinator and the partners: the Gaussian-mechanism accounting below would not describe
the mechanism that ran. With g~ everywhere, every weight is post-processing of released
g~ values and features, so the accounting is exact. Without label noise g~ = g.

Party weights and optimizer state never leave their party. The coordinator holds a
`CoordinatorState` (epoch, step, loss history, byte counters) and nothing else. In this
simulation one Python driver plays every role, but each party's values (`PartyState`) are
only passed as that party's CLIENTS member to the computations (training and evaluation),
and the labels only to the lender step and the lender's own metrics. Secure sum is
simulated by TFF's open runtime (plain sum; see tff_apps/runtime/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from shared.errors import UserError
from shared.split_model import KINDS, weight_shapes
from tff_apps.privacy import dp_config

OPTIMIZERS = ("sgd", "adam")
SCORE_FRACTION_BITS = 16  # fixed-point step of a partial score in the secure sum: 2^-16
ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON = 0.9, 0.999, 1e-7  # Keras defaults
MESSAGE_KINDS = ("partial_scores_up", "sum_to_lender", "gradient_up", "gradient_down", "loss_up")
_INIT_STREAM, _BATCH_STREAM = 0, 1  # seed streams: default_rng([seed, stream, index])


@dataclass(frozen=True)
class VerticalSettings:
    kind: str = "logistic"  # "logistic" | "mlp"
    hidden_units: int = 16  # mlp only
    l2: float = 0.0  # l2/2 * ||kernels||^2 per party
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 0.1
    optimizer: str = "sgd"  # "sgd" | "adam"
    label_noise_multiplier: float = 0.0  # sigma; 0 = no label protection
    partial_noise_std: float = 0.0  # std of the noise partners add to their partial scores
    score_bound: float = 32.0  # partial scores are clipped to +-score_bound
    seed: int = 0
    delta: float = 1e-5
    accountant: str = "rdp"  # "rdp" | "pld"
    eval_every: int = 1


@dataclass
class PartyState:
    """What one party holds; never given to the coordinator or another party."""

    name: str
    index: int
    width: int  # the party's own feature count (weights are padded to the common width)
    features: np.ndarray  # float32 (rows, d_max), zero-padded
    weights: list[np.ndarray]  # padded, Keras order
    optimizer_state: list[np.ndarray]  # [step] (+ Adam moments m..., v...)
    labels: np.ndarray | None = None  # the lender only
    eval_features: np.ndarray | None = None  # float32 (held-out rows, d_max), zero-padded
    noise_rng: np.random.Generator | None = None  # OS-seeded, for the party's DP noise


@dataclass
class CoordinatorState:
    """Everything the coordinator (SERVER) keeps between calls: no weights, no data."""

    parties: int
    rows: int
    batch_size: int
    bitwidth: int
    epoch: int = 0
    step: int = 0
    loss_history: list[float] = field(default_factory=list)  # per epoch, as the lender reports
    bytes_sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MESSAGE_KINDS, 0))


@dataclass
class VerticalResult:
    party_weights: list[list[np.ndarray]]  # unpadded, Keras order, party 0 = lender
    history: list[dict[str, Any]]
    bytes_per_epoch: dict[str, int]  # by message kind, plus "total"
    bytes_total: dict[str, int]
    seconds: float
    label_dp: dict[str, Any] | None
    partial_noise: dict[str, Any] | None
    coordinator: CoordinatorState
    tff_calls: int = 0  # training calls
    eval_calls: int = 0
    eval_bytes_total: dict[str, int] = field(default_factory=dict)  # partial_scores_up, sum_to_lender
    eval_logits: np.ndarray | None = None  # the last evaluation's z, as the lender received it
    resumed_after_epoch: int = 0  # the checkpoint a resumed run continued from (0: started afresh)


def initial_weights(kind: str, width: int, hidden_units: int, seed: int, party_index: int) -> list[np.ndarray]:
    shapes = weight_shapes(kind, width, hidden_units)
    if kind == "logistic":
        return [np.zeros(s, np.float32) for s in shapes]
    rng = np.random.default_rng([seed, _INIT_STREAM, party_index])
    weights = []
    for shape in shapes:
        if len(shape) == 2:
            limit = math.sqrt(6.0 / (shape[0] + shape[1]))
            weights.append(rng.uniform(-limit, limit, shape).astype(np.float32))
        else:
            weights.append(np.zeros(shape, np.float32))
    return weights


def batch_indices(n_rows: int, batch_size: int, epoch: int, seed: int) -> list[np.ndarray]:
    """Epoch `epoch`'s (1-based) mini-batches: a seeded permutation of the aligned positions cut
    into consecutive batches (the last one may be smaller). Every party derives the same ones;
    a centralized baseline on the joined table uses them to train on identical batches."""
    order = np.random.default_rng([seed, _BATCH_STREAM, epoch]).permutation(n_rows)
    return [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]


class SecureScoreSum:
    """The secure sum of per-party partial scores (step 1's encoding), computations cached by
    row count. On its own it serves scoring: each party's CLIENTS value is the partial scores
    its exported model computed on its own rows; the coordinator gets only the decoded sum."""

    def __init__(self, n_parties: int, score_bound: float):
        self.n_parties = n_parties
        self.bound = float(score_bound)
        self.offset = math.ceil(score_bound * 2**SCORE_FRACTION_BITS)  # K
        self.bitwidth = (2 * self.offset).bit_length()
        self._cache: dict[tuple, Any] = {}
        self.calls = 0

    def _fixed_point(self, released):
        """float64 scores -> the integers summed: clip to +-B, steps of 2^-F, shifted by K >= 0."""
        released = tf.clip_by_value(released, -self.bound, self.bound)
        return tf.cast(tf.round(released * 2.0**SCORE_FRACTION_BITS), tf.int64) + self.offset

    def _decoder(self, n: int, ring_bits: int = 0):
        """The summed integers -> z; with `ring_bits` the sum is first taken mod 2^ring_bits
        (across sites each party's values arrive masked, the masks cancel in that ring)."""
        total_offset = self.n_parties * self.offset

        @tff.tensorflow.computation(tff.TensorType(np.int64, [n]))
        def decode(total):
            if ring_bits:
                total = tf.math.floormod(total, 2**ring_bits)
            return tf.cast(total - total_offset, tf.float32) * (2.0**-SCORE_FRACTION_BITS)

        return decode

    def _clients(self, t):
        return tff.FederatedType(t, tff.CLIENTS)

    def _build_score_sum(self, n):
        vec = tff.TensorType(np.float32, [n])

        @tff.tensorflow.computation(vec)
        def encode(scores):
            return self._fixed_point(tf.cast(scores, tf.float64))

        decode = self._decoder(n)

        @tff.federated_computation(self._clients(vec))
        def score_sum(scores):
            encoded = tff.federated_map(encode, scores)
            return tff.federated_map(decode, tff.federated_secure_sum_bitwidth(encoded, self.bitwidth))

        return score_sum

    def _get(self, name, *shape):
        key = (name, *shape)
        if key not in self._cache:
            self._cache[key] = getattr(self, f"_build_{name}")(*shape)
        return self._cache[key]

    def score_sum(self, scores):
        """One TFF call: `scores[p]` (float32 [n]) is party p's CLIENTS value; returns z [n]."""
        self.calls += 1
        return np.asarray(self._get("score_sum", len(scores[0]))(scores), np.float32)


class VerticalComputations(SecureScoreSum):
    """The protocol's TFF computations for one party layout, built once per batch shape.
    `calls` counts training calls, `eval_calls` evaluation calls."""

    def __init__(self, settings: VerticalSettings, n_parties: int, width: int):
        super().__init__(n_parties, settings.score_bound)
        self.s = settings
        self.width = width
        self.shapes = weight_shapes(settings.kind, width, settings.hidden_units)
        self.is_kernel = [len(shape) == 2 for shape in self.shapes]
        self.weight_type = [tff.TensorType(np.float32, s) for s in self.shapes]
        self.opt_type = [tff.TensorType(np.float32, [])]
        if settings.optimizer == "adam":
            self.opt_type += self.weight_type + self.weight_type
        self.eval_calls = 0

    def initial_optimizer_state(self) -> list[np.ndarray]:
        state = [np.zeros((), np.float32)]
        if self.s.optimizer == "adam":
            state += [np.zeros(s, np.float32) for s in self.shapes] * 2
        return state

    # -- party-local TensorFlow (traced inside tff.tensorflow.computation) --

    def _score(self, w, x):
        if self.s.kind == "logistic":
            z = tf.matmul(x, w[0])[:, 0] + w[1][0]
        else:
            hidden = tf.nn.relu(tf.matmul(x, w[0]) + w[1])
            z = tf.matmul(hidden, w[2])[:, 0] + w[3][0]
        bound = float(self.s.score_bound)
        return tf.clip_by_value(z, -bound, bound)

    def _update(self, w, opt, x, g):
        w, opt = list(w), list(opt)
        with tf.GradientTape() as tape:
            tape.watch(w)
            score = self._score(w, x)
        grads = tape.gradient(score, w, output_gradients=g)
        l2, lr = float(self.s.l2), float(self.s.learning_rate)
        grads = [gr + l2 * wi if kernel else gr for gr, wi, kernel in zip(grads, w, self.is_kernel)]
        step = opt[0] + 1.0
        if self.s.optimizer == "sgd":
            return [wi - lr * gr for wi, gr in zip(w, grads)], [step]
        k = len(w)
        m, v = opt[1 : 1 + k], opt[1 + k :]
        m = [mi + (gr - mi) * (1.0 - ADAM_BETA1) for mi, gr in zip(m, grads)]
        v = [vi + (tf.square(gr) - vi) * (1.0 - ADAM_BETA2) for vi, gr in zip(v, grads)]
        rate = lr * tf.sqrt(1.0 - tf.pow(ADAM_BETA2, step)) / (1.0 - tf.pow(ADAM_BETA1, step))
        new_w = [wi - rate * mi / (tf.sqrt(vi) + ADAM_EPSILON) for wi, mi, vi in zip(w, m, v)]
        return new_w, [step, *m, *v]

    def _encode(self, w, x, noise):
        return self._fixed_point(tf.cast(self._score(w, x), tf.float64) + tf.cast(noise, tf.float64))

    def _x(self, n):
        return tff.TensorType(np.float32, [n, self.width])

    # -- computations --

    def _build_evaluate(self, n):
        # Step 1 without noise: metrics need the model's own z, and no label is involved.
        @tff.tensorflow.computation(self.weight_type, self._x(n))
        def encode(w, x):
            return self._fixed_point(tf.cast(self._score(w, x), tf.float64))

        decode = self._decoder(n)

        @tff.federated_computation(self._clients(self.weight_type), self._clients(self._x(n)))
        def evaluate(w, x):
            encoded = tff.federated_map(encode, (w, x))
            return tff.federated_map(decode, tff.federated_secure_sum_bitwidth(encoded, self.bitwidth))

        return evaluate

    # -- calls (each one TFF call) --

    def evaluate(self, w, x):
        self.eval_calls += 1
        return np.asarray(self._get("evaluate", len(x[0]))(w, x), np.float32)


def pad_weights(weights: list[np.ndarray], width: int) -> list[np.ndarray]:
    first = weights[0]
    return [np.pad(first, ((0, width - first.shape[0]), (0, 0))), *weights[1:]]


def unpad_weights(weights: list[np.ndarray], width: int) -> list[np.ndarray]:
    return [np.array(weights[0][:width]), *(np.array(w) for w in weights[1:])]


def resolve_party_names(names: list[str] | None, n: int) -> list[str]:
    if names is None:
        return ["lender"] + [f"partner{p}" for p in range(1, n)]
    if len(names) != n:
        raise ValueError(f"party_names has {len(names)} names for {n} parties")
    return [str(name) for name in names]


def validate_inputs(parties, labels, settings: VerticalSettings) -> tuple[list[np.ndarray], np.ndarray]:
    if not isinstance(settings, VerticalSettings):
        raise ValueError(f"settings must be a VerticalSettings, got {type(settings).__name__}")
    _validate_settings(settings)
    matrices = validate_matrices(parties)
    rows = len(matrices[0])
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != rows:
        raise UserError(f"data: {y.shape} labels for {rows} aligned rows; give one label per row")
    if not np.all(np.isin(y, (0, 1))):
        raise UserError("data: labels must be 0 or 1")
    if settings.batch_size > rows:
        raise UserError(
            f"batch_size = {settings.batch_size} is larger than the {rows} training rows; choose at most {rows}"
        )
    return matrices, y.astype(np.float32)


def validate_matrices(parties, what: str = "parties") -> list[np.ndarray]:
    """Aligned float32 party matrices (party 0 the lender), finite, at least one column each."""
    if not isinstance(parties, (list, tuple)) or not parties:
        raise ValueError(f"{what} must be a non-empty list of matrices, party 0 the lender")
    matrices = []
    for p, x in enumerate(parties):
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"party {p} matrix must be 2-D (rows, columns), got shape {x.shape}")
        if x.shape[1] == 0:
            raise UserError(f"data: party {p} has no feature columns; give it at least one")
        if not np.all(np.isfinite(x)):
            raise UserError(f"data: party {p} has non-finite values (NaN or inf); impute and encode them first")
        matrices.append(x.astype(np.float32))
    rows = [len(x) for x in matrices]
    if len(set(rows)) != 1:
        raise UserError(f"data: the parties have different row counts {rows}; rows must be aligned (PSI) first")
    return matrices


def _validate_settings(s: VerticalSettings) -> None:
    def need(ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise UserError(f"{name} = {getattr(s, name)!r} is not allowed; expected {expected}")

    need(s.kind in KINDS, "kind", f"one of {KINDS}")
    need(s.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}")
    need(s.accountant in dp_config.ACCOUNTANTS, "accountant", f"one of {dp_config.ACCOUNTANTS}")
    need(_is_int(s.hidden_units) and s.hidden_units >= 1, "hidden_units", "an integer >= 1")
    need(_is_int(s.epochs) and s.epochs >= 1, "epochs", "an integer >= 1")
    need(_is_int(s.batch_size) and s.batch_size >= 1, "batch_size", "an integer >= 1")
    need(_is_int(s.eval_every) and s.eval_every >= 1, "eval_every", "an integer >= 1")
    need(_is_int(s.seed), "seed", "an integer")
    need(_finite(s.learning_rate) and s.learning_rate > 0, "learning_rate", "a number > 0")
    need(_finite(s.l2) and s.l2 >= 0, "l2", "a number >= 0")
    need(_finite(s.label_noise_multiplier) and s.label_noise_multiplier >= 0, "label_noise_multiplier", "a number >= 0")
    need(_finite(s.partial_noise_std) and s.partial_noise_std >= 0, "partial_noise_std", "a number >= 0")
    need(_finite(s.score_bound) and s.score_bound > 0, "score_bound", "a number > 0")
    need(_finite(s.delta) and 0 < s.delta < 1, "delta", "a number in (0, 1)")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _finite(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)
