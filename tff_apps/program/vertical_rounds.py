"""The vertical (split-model) training loop: epochs of mini-batches through the TFF
computations of `tff_apps.learning.vertical`, label DP accounting, bytes, metrics.

Label DP (when label_noise_multiplier sigma > 0)
-----------------------------------------------
Adjacency: one customer's label changed. Each label enters exactly one released g~ per epoch
(every epoch is a shuffled partition of the rows; no subsampling amplification is claimed);
the batch order is public and data-independent, and every other input of g~ is
post-processing of earlier releases, so E epochs are an adaptive E-fold composition of a
Gaussian mechanism with noise multiplier sigma: SelfComposed(Gaussian(sigma), E), accounted
by dp_accounting (RDP or PLD, via tff_apps.privacy). Not covered: the training loss the lender
reports (one unnoised scalar per epoch, the lender's own report) and what `evaluate` reports.

Partial-score noise: reported as its std only, no epsilon. The clip bounds how much one
partner record moves that record's own score (2B), but the record also moves the partner's
weights (its update x_i * g~_i is not clipped per example and features are unbounded), and
those weights produce every later partial score: no finite sensitivity holds for the
sequence of releases, so an epsilon would not be honest. Per-example clipping of the partners'
updates (DP-SGD at the partner) would be needed for one.

Bytes exchanged, counted from the payloads as sent (per batch of n rows, P parties):
partial_scores_up P*n*8 (int64), sum_to_lender n*4 (z, handed to the lender after the
epoch's batches), gradient_up n*4 (u, lender -> coordinator), gradient_down P*n*4 (g~,
broadcast to every party, the lender included), loss_up 4 per epoch (lender -> coordinator).
An evaluation of m held-out rows sends partial_scores_up P*m*8 and sum_to_lender m*4, counted
apart (`VerticalResult.eval_bytes_total`). Weights, features and labels are never sent.

Evaluation and scoring go through the same secure sum: `secure_logits` (each party's weights
and held-out rows as its own CLIENTS value) and `secure_score_sum` (each party's partial
scores from its exported model) return only the decoded sum z, in calls of at most
`EVAL_ROWS` rows. The lender's metrics are functions of z and its own labels.

Checkpoints (`checkpoint_every` epochs, `vertical_checkpoints`): each party's weights,
optimizer state and noise-generator state as they were at the end of the epoch (every noise
of the epoch drawn, none of the next), then the coordinator's state. A resumed run starts the
next epoch and replays the same batches and noise, so it ends with an uninterrupted run's
weights and releases nothing the killed attempt did not.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from dp_accounting import dp_event as dpe
from tqdm import tqdm

from shared.errors import UserError
from shared.split_model import weight_shapes
from tff_apps.learning.preprocessing import SECURE_SUM_BITWIDTH
from tff_apps.learning.vertical import (
    MESSAGE_KINDS,
    CoordinatorState,
    PartyState,
    SecureScoreSum,
    VerticalComputations,
    VerticalResult,
    VerticalSettings,
    batch_indices,
    initial_weights,
    pad_weights,
    resolve_party_names,
    unpad_weights,
    validate_inputs,
    validate_matrices,
)
from tff_apps.learning.vertical_epoch import CHUNK_BATCHES, EpochComputations, chunk_shape, split_chunk, stack_batches
from tff_apps.privacy import accounting
from tff_apps.program.metrics_log import MetricsLog
from tff_apps.program.vertical_checkpoints import PartyCheckpoint, VerticalCheckpoints, party_checkpoint, restore_party

EVAL_ROWS = 4096  # rows per evaluation or scoring call: bounds one call's tensors, two traced shapes at most
EVAL_MESSAGE_KINDS = ("partial_scores_up", "sum_to_lender")


def unseeded_generator() -> np.random.Generator:
    """A generator seeded from the OS (128 bits), for DP noise: not derivable from the job seed."""
    return np.random.default_rng(secrets.randbits(128))


def draw_noise(rng: np.random.Generator, std: float, n: int) -> np.ndarray:
    return (rng.standard_normal(n) * std).astype(np.float32)


def label_dp_epsilon(noise_multiplier: float, epochs: int, delta: float, accountant: str = "rdp") -> float:
    """epsilon at delta of E epochs of noisy gradients: SelfComposed(Gaussian(sigma), E)."""
    if epochs <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    event = dpe.SelfComposedDpEvent(dpe.GaussianDpEvent(float(noise_multiplier)), int(epochs))
    return accounting.epsilon(event, delta, accountant)


def train_vertical(
    parties: list[np.ndarray],
    labels: np.ndarray,
    settings: VerticalSettings,
    *,
    party_names: list[str] | None = None,
    evaluate: Callable[[np.ndarray], dict[str, float]] | None = None,
    eval_parties: list[np.ndarray] | None = None,
    run_dir: Path | str | None = None,
    progress: bool = True,
    checkpoint_every: int = 0,
) -> VerticalResult:
    """Trains the split model on aligned party matrices (party 0 = the lender, with `labels`).

    Must run inside `tff_apps.runtime.context.Runtime()`. `evaluate` and `eval_parties` (each
    party's aligned held-out rows, encoded like its training rows) come together: every
    `eval_every` epochs and after the last, each party's current weights and its own held-out
    rows go, as its CLIENTS value, through the secure sum (`VerticalComputations.evaluate`),
    and `evaluate(z)` -- the lender's code, which holds the held-out labels -- gets only the
    decoded logits z; its metrics go into that epoch's record. With `run_dir`, one line per
    epoch goes to metrics.jsonl (`metrics_log.MetricsLog`): epoch (also as "round", the key the
    other apps' records and TensorBoard steps use), loss (mean training BCE before each batch's
    update, as the lender reports it), bytes, seconds, the evaluate metrics and, with label
    noise, label_epsilon so far. With `run_dir` and `checkpoint_every` > 0, every party and the
    coordinator checkpoint every `checkpoint_every` epochs and after the last
    (`vertical_checkpoints`); a run folder with a checkpoint continues after it, replaying the
    same batches and the same DP noise, and ends with the weights of an uninterrupted run.
    """
    started = time.perf_counter()
    parties, labels = validate_inputs(parties, labels, settings)
    held_out = _eval_matrices(eval_parties, parties, evaluate)
    names = resolve_party_names(party_names, len(parties))
    training = _Training(parties, labels, held_out, names, settings)
    return drive(training, names, evaluate, run_dir, progress, checkpoint_every, started)


def drive(training: "_Training", checkpointed: list[str], evaluate, run_dir, progress: bool, checkpoint_every: int,
          started: float) -> VerticalResult:
    """`train_vertical`'s loop over `training`'s epochs: metrics log, checkpoints (each party in
    `checkpointed` its own file, and the coordinator's), resume, progress bar."""
    settings = training.s
    checkpoints = VerticalCheckpoints(_run_dir(run_dir), checkpoint_every, checkpointed) if run_dir is not None else None
    first_epoch = training.restore(checkpoints.load_latest()) + 1 if checkpoints is not None else 1
    log = MetricsLog(_run_dir(run_dir)) if run_dir is not None else None
    history = log.keep_rounds_up_to(first_epoch - 1) if log is not None else []
    bar = tqdm(
        total=settings.epochs, initial=first_epoch - 1, desc="vertical", unit="epoch", dynamic_ncols=True,
        disable=not progress,
    )
    try:
        for record in training.epochs(first_epoch, evaluate):
            history.append(record)
            if log is not None:
                log.write(record)
            if checkpoints is not None and checkpoints.due(record["epoch"], settings.epochs):
                checkpoints.save(record["epoch"], training.party_checkpoints(), training.coordinator_checkpoint())
            bar.update(1)
            bar.set_postfix(_postfix(record), refresh=False)
        if evaluate is not None and training.eval_logits is None:  # resumed after the last epoch's checkpoint
            training.evaluate_now()
    finally:
        bar.close()
        if log is not None:
            log.close()
    return training.result(history, time.perf_counter() - started)


class _Training:
    """The protocol's loop state: every party's `PartyState`, the coordinator's state and
    counters; `epochs` runs the mini-batches of the given epochs and yields one record each."""

    def __init__(self, parties, labels, held_out, names: list[str], settings: VerticalSettings):
        self.s = settings
        self.rows, self.n_parties = len(labels), len(parties)
        width = max(x.shape[1] for x in parties)
        self.comps = _checked_bitwidth(EpochComputations(settings, self.n_parties, width))
        self.states = [
            PartyState(
                name=names[p], index=p, width=x.shape[1],
                features=_pad_columns(x, width),
                weights=pad_weights(initial_weights(settings.kind, x.shape[1], settings.hidden_units, settings.seed, p), width),
                optimizer_state=self.comps.initial_optimizer_state(),
                labels=labels if p == 0 else None,
                noise_rng=unseeded_generator() if _draws_noise(settings, p) else None,
                eval_features=None if held_out is None else _pad_columns(held_out[p], width),
            )
            for p, x in enumerate(parties)
        ]
        self.coordinator = CoordinatorState(self.n_parties, self.rows, settings.batch_size, self.comps.bitwidth)
        self.eval_bytes = dict.fromkeys(EVAL_MESSAGE_KINDS, 0)
        self.last_epoch_bytes = dict.fromkeys(MESSAGE_KINDS, 0)
        self.eval_logits: np.ndarray | None = None
        self.noise_at_epoch_end: list[dict | None] = self._noise_states()
        self.resumed_after_epoch = 0

    # -- the loop --

    def epochs(self, first_epoch: int, evaluate):
        """Runs the given epochs; yields one record per epoch. An epoch: the lender releases u
        of every batch (one call), the parties and the coordinator run the batches in chunks
        of at most CHUNK_BATCHES (one call each, `vertical_epoch`), the coordinator hands the
        lender every batch's z and the lender computes its loss (one call)."""
        for epoch in range(first_epoch, self.s.epochs + 1):
            started = time.perf_counter()
            batches = batch_indices(self.rows, self.s.batch_size, epoch, self.s.seed)
            sizes = np.array([len(rows) for rows in batches])
            order, batch_of_row = np.concatenate(batches), np.repeat(np.arange(len(batches), dtype=np.int32), sizes)
            u = self._release(batches, order, np.repeat(sizes, sizes).astype(np.float32), epoch)
            z, done = [], 0
            for start in range(0, len(batches), CHUNK_BATCHES):
                chunk = batches[start : start + CHUNK_BATCHES]
                rows = sum(len(r) for r in chunk)
                z.append(self._chunk(chunk, u[done : done + rows], (epoch, start, len(batches))))
                done += rows
            losses = self._losses(np.concatenate(z), order, batch_of_row, len(batches))
            epoch_bytes = dict.fromkeys(MESSAGE_KINDS, 0)
            for n in sizes:
                _count(epoch_bytes, int(n), self.n_parties)
            # the epoch's checkpoint: every noise of this epoch drawn, none of the next one
            self.noise_at_epoch_end = self._noise_states()
            epoch_loss = float(np.dot(losses.astype(np.float64), sizes))  # sum over batches of n * mean loss
            yield self._end_epoch(epoch, epoch_bytes, epoch_loss, started, evaluate)

    def _release(self, batches: list[np.ndarray], order: np.ndarray, batch_rows: np.ndarray, epoch: int) -> np.ndarray:
        """The lender's u of the epoch's rows in batch order (one call, its own)."""
        y = self.states[0].labels[order]
        return self.comps.lender_release(y, self._label_noise(batches), batch_rows)

    def _losses(self, z: np.ndarray, order: np.ndarray, batch_of_row: np.ndarray, batches: int) -> np.ndarray:
        """The lender's mean loss of each batch at the epoch's z (one call, its own)."""
        return self.comps.lender_loss(z, self.states[0].labels[order], batch_of_row, batches)

    def _label_noise(self, batches: list[np.ndarray]) -> np.ndarray:
        """The lender's DP noise of each batch, N(0, (sigma/n)^2) for a batch of n, in batch order."""
        sigma, lender = self.s.label_noise_multiplier, self.states[0]
        if sigma <= 0:
            return np.zeros(sum(len(rows) for rows in batches), np.float32)
        return np.concatenate([draw_noise(lender.noise_rng, sigma / len(rows), len(rows)) for rows in batches])

    def _chunk(self, chunk: list[np.ndarray], u: np.ndarray, where: tuple[int, int, int]) -> np.ndarray:
        """Consecutive mini-batches in one TFF call; `u` is what the lender released for their
        rows. Each party gives its own rows and its own noise, drawn one batch after the other
        as the per-batch protocol drew them. Returns the z the coordinator decoded, in order."""
        shape = chunk_shape(chunk)
        rows = [split_chunk(state.features, chunk) for state in self.states]
        noise = [
            stack_batches(np.concatenate([_partial_noise(state, self.s, len(batch)) for batch in chunk]), shape)
            for state in self.states
        ]
        parties, (z, z_last, _) = self.comps.chunk(
            shape, [s.weights for s in self.states], [s.optimizer_state for s in self.states],
            [r[0] for r in rows], [r[1] for r in rows], [v[0] for v in noise], [v[1] for v in noise],
            *stack_batches(u, shape),
        )
        for s, (w, o) in zip(self.states, parties):
            s.weights = [np.asarray(a, np.float32) for a in w]
            s.optimizer_state = [np.asarray(a, np.float32) for a in o]
        self.coordinator.step += len(chunk)
        return np.concatenate([np.asarray(z, np.float32).reshape(-1), np.asarray(z_last, np.float32)])

    def _end_epoch(self, epoch, epoch_bytes, epoch_loss, epoch_started, evaluate) -> dict[str, Any]:
        # the lender reports its mean loss (one float32) to the coordinator.
        epoch_bytes["loss_up"] += 4
        coordinator = self.coordinator
        coordinator.epoch = epoch
        coordinator.loss_history.append(epoch_loss / self.rows)
        for kind, count in epoch_bytes.items():
            coordinator.bytes_sent[kind] += count
        self.last_epoch_bytes = dict(epoch_bytes)
        record: dict[str, Any] = {
            "round": epoch, "epoch": epoch, "loss": epoch_loss / self.rows, "bytes": sum(epoch_bytes.values()),
        }
        if self.s.label_noise_multiplier > 0:
            record["label_epsilon"] = label_dp_epsilon(self.s.label_noise_multiplier, epoch, self.s.delta, self.s.accountant)
        if evaluate is not None and (epoch % self.s.eval_every == 0 or epoch == self.s.epochs):
            record.update(evaluate(self.evaluate_now()))
        record["seconds"] = time.perf_counter() - epoch_started
        return record

    def evaluate_now(self) -> np.ndarray:
        """coordinator -> lender: z of the held-out rows (the lender scores it)."""
        self.eval_logits = _secure_logits(
            self.comps, [s.weights for s in self.states], [s.eval_features for s in self.states]
        )
        _count_evaluation(self.eval_bytes, len(self.eval_logits), self.n_parties)
        return self.eval_logits

    # -- checkpoints --

    def _noise_states(self) -> list[dict | None]:
        return [s.noise_rng.bit_generator.state if s.noise_rng is not None else None for s in self.states]

    def party_checkpoints(self) -> dict[str, PartyCheckpoint]:
        return {s.name: party_checkpoint(s, noise) for s, noise in zip(self.states, self.noise_at_epoch_end)}

    def coordinator_checkpoint(self) -> dict[str, Any]:
        return {
            "coordinator": dataclasses.asdict(self.coordinator), "last_epoch_bytes": self.last_epoch_bytes,
            "eval_bytes": self.eval_bytes, "calls": self.comps.calls, "eval_calls": self.comps.eval_calls,
        }

    def restore(self, latest) -> int:
        """Each party's and the coordinator's state from a checkpoint; returns its epoch (0: none)."""
        if latest is None:
            return 0
        epoch, party_states, saved = latest
        for state in self.states:
            restore_party(state, party_states[state.name])
        for key in ("epoch", "step", "loss_history", "bytes_sent"):
            setattr(self.coordinator, key, saved["coordinator"][key])
        self.last_epoch_bytes, self.eval_bytes = saved["last_epoch_bytes"], saved["eval_bytes"]
        self.comps.calls, self.comps.eval_calls = saved["calls"], saved["eval_calls"]
        logging.getLogger(__name__).info("resuming vertical training after epoch %d", epoch)
        self.resumed_after_epoch = epoch
        return epoch

    def result(self, history, seconds: float) -> VerticalResult:
        coordinator, last = self.coordinator, self.last_epoch_bytes
        return VerticalResult(
            party_weights=[unpad_weights(s.weights, s.width) for s in self.states],
            history=history,
            bytes_per_epoch={**last, "total": sum(last.values())},
            bytes_total={**coordinator.bytes_sent, "total": sum(coordinator.bytes_sent.values())},
            seconds=seconds,
            label_dp=_label_dp_report(self.s),
            partial_noise=_partial_noise_report(self.s, self.n_parties),
            coordinator=coordinator,
            tff_calls=self.comps.calls,
            eval_calls=self.comps.eval_calls,
            eval_bytes_total={**self.eval_bytes, "total": sum(self.eval_bytes.values())},
            eval_logits=self.eval_logits,
            resumed_after_epoch=self.resumed_after_epoch,
        )


def secure_logits(
    party_weights: list[list[np.ndarray]], party_matrices: list[np.ndarray], settings: VerticalSettings
) -> np.ndarray:
    """The split model's logits z = sum_p clip(score_p, +-B) of aligned rows, through the secure sum.

    `party_weights[p]` (unpadded, Keras order) and `party_matrices[p]` are party p's own and go
    only into its CLIENTS value; the result is what the coordinator decodes and hands the
    lender. Equals the plain sum up to the fixed-point step (<= 2^-17 per party and row).
    Must run inside `tff_apps.runtime.context.Runtime()`.
    """
    matrices = validate_matrices(party_matrices, "party_matrices")
    if len(party_weights) != len(matrices):
        raise ValueError(f"{len(party_weights)} weight sets for {len(matrices)} party matrices")
    width = max(x.shape[1] for x in matrices)
    for p, (w, x) in enumerate(zip(party_weights, matrices)):
        expected = weight_shapes(settings.kind, x.shape[1], settings.hidden_units)
        if [tuple(np.shape(a)) for a in w] != expected:
            raise ValueError(f"party {p}: {settings.kind} weights for {x.shape[1]} columns must have shapes {expected}")
    comps = _checked_bitwidth(VerticalComputations(settings, len(matrices), width))
    weights = [pad_weights([np.asarray(a, np.float32) for a in w], width) for w in party_weights]
    return _secure_logits(comps, weights, [_pad_columns(x, width) for x in matrices])


def secure_score_sum(party_scores: list[np.ndarray], score_bound: float) -> np.ndarray:
    """z = sum_p clip(party_scores[p], +-score_bound) through `federated_secure_sum_bitwidth`, with
    training's fixed-point encoding: `party_scores[p]` (one per aligned row, from party p's own
    model) is only party p's CLIENTS value; only the decoded sum comes back. Must run inside
    `tff_apps.runtime.context.Runtime()`."""
    scores = [np.asarray(s, np.float32).reshape(-1) for s in party_scores]
    if not scores or len({len(s) for s in scores}) != 1:
        raise ValueError(f"party_scores must be one aligned vector per party, got lengths {[len(s) for s in scores]}")
    summer = _checked_bitwidth(SecureScoreSum(len(scores), score_bound))
    chunks = [
        summer.score_sum([s[start : start + EVAL_ROWS] for s in scores]) for start in range(0, len(scores[0]), EVAL_ROWS)
    ]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def _secure_logits(comps: VerticalComputations, weights, matrices) -> np.ndarray:
    """z of every row, at most EVAL_ROWS rows a call; party p's (padded) weights and rows are
    its CLIENTS value."""
    chunks = [
        comps.evaluate(weights, [x[start : start + EVAL_ROWS] for x in matrices])
        for start in range(0, len(matrices[0]), EVAL_ROWS)
    ]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def _checked_bitwidth(summer):
    if summer.bitwidth > SECURE_SUM_BITWIDTH:
        raise UserError(
            f"score_bound = {summer.bound} needs {summer.bitwidth}-bit secure-sum inputs; "
            f"at most {SECURE_SUM_BITWIDTH} are supported, choose a smaller bound"
        )
    return summer


def _eval_matrices(eval_parties, parties: list[np.ndarray], evaluate) -> list[np.ndarray] | None:
    """The held-out rows, checked against the training layout (same parties, same columns)."""
    if (eval_parties is None) != (evaluate is None):
        raise ValueError("give evaluate and eval_parties together (the held-out rows the lender's evaluate scores)")
    if eval_parties is None:
        return None
    matrices = validate_matrices(eval_parties, "eval_parties")
    widths, expected = [x.shape[1] for x in matrices], [x.shape[1] for x in parties]
    if widths != expected:
        raise ValueError(f"eval_parties have {widths} columns per party; training has {expected}")
    return matrices


def _pad_columns(x: np.ndarray, width: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, width - x.shape[1])))


def _count(counter: dict[str, int], n: int, n_parties: int) -> None:
    """One batch's payloads (see the module docstring)."""
    counter["partial_scores_up"] += n_parties * n * np.dtype(np.int64).itemsize
    counter["sum_to_lender"] += n * np.dtype(np.float32).itemsize
    counter["gradient_up"] += n * np.dtype(np.float32).itemsize
    counter["gradient_down"] += n_parties * n * np.dtype(np.float32).itemsize


def _count_evaluation(counter: dict[str, int], m: int, n_parties: int) -> None:
    """One evaluation's payloads: every party's int64 scores up, the float32 sum to the lender."""
    counter["partial_scores_up"] += n_parties * m * np.dtype(np.int64).itemsize
    counter["sum_to_lender"] += m * np.dtype(np.float32).itemsize


def _draws_noise(settings: VerticalSettings, party: int) -> bool:
    return settings.label_noise_multiplier > 0 if party == 0 else settings.partial_noise_std > 0


def _partial_noise(state: PartyState, settings: VerticalSettings, n: int) -> np.ndarray:
    """A partner's own noise for its partial scores (drawn by the partner; the lender adds none)."""
    if state.index == 0 or settings.partial_noise_std <= 0:
        return np.zeros(n, np.float32)
    return draw_noise(state.noise_rng, settings.partial_noise_std, n)


def _label_dp_report(settings: VerticalSettings) -> dict[str, Any] | None:
    if settings.label_noise_multiplier <= 0:
        return None
    return {
        "epsilon": label_dp_epsilon(settings.label_noise_multiplier, settings.epochs, settings.delta, settings.accountant),
        "delta": settings.delta,
        "noise_multiplier": settings.label_noise_multiplier,
        "epochs": settings.epochs,
        "accountant": settings.accountant,
        "adjacency": "one customer's label",
        "mechanism": (
            "g + N(0, (noise_multiplier/batch_rows)^2) on dL/dz, L2 sensitivity 1/batch_rows, once per epoch "
            "(the lender releases u = -y/batch_rows + the noise; the coordinator adds sigmoid(z)/batch_rows)"
        ),
        "not_covered": "the training loss the lender reports; evaluation metrics",
    }


def _partial_noise_report(settings: VerticalSettings, n_parties: int) -> dict[str, Any] | None:
    if settings.partial_noise_std <= 0 or n_parties < 2:
        return None
    return {
        "std": settings.partial_noise_std,
        "score_bound": settings.score_bound,
        "epsilon": None,
        "reason": (
            "no finite sensitivity: one partner record also changes the partner's weights (its "
            "update is not clipped per example), which produce every later partial score"
        ),
    }


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    shown = {"loss": f"{record['loss']:.4f}"}
    for key in ("auc", "val_auc", "label_epsilon"):
        if isinstance(record.get(key), (int, float)):
            shown[key] = f"{record[key]:.3f}"
    return shown


def _run_dir(run_dir: Path | str) -> Path:
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path
