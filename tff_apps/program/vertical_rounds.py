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
partial_scores_up P*n*8 (int64), sum_to_lender n*4, gradient_up n*4 (lender -> coordinator),
gradient_down (P-1)*n*4 (coordinator -> partners), loss_up 4 per epoch (lender -> coordinator).
An evaluation of m held-out rows sends partial_scores_up P*m*8 and sum_to_lender m*4, counted
apart (`VerticalResult.eval_bytes_total`). Weights, features and labels are never sent.

Evaluation and scoring go through the same secure sum: `secure_logits` (each party's weights
and held-out rows as its own CLIENTS value) and `secure_score_sum` (each party's partial
scores from its exported model) return only the decoded sum z, in calls of at most
`EVAL_ROWS` rows. The lender's metrics are functions of z and its own labels.
"""

from __future__ import annotations

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
from tff_apps.privacy import accounting
from tff_apps.program.metrics_log import MetricsLog

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
    noise, label_epsilon so far.
    """
    started = time.perf_counter()
    parties, labels = validate_inputs(parties, labels, settings)
    held_out = _eval_matrices(eval_parties, parties, evaluate)
    names = resolve_party_names(party_names, len(parties))
    n_rows, n_parties = len(labels), len(parties)
    width = max(x.shape[1] for x in parties)
    comps = _checked_bitwidth(VerticalComputations(settings, n_parties, width))
    states = [
        PartyState(
            name=names[p], index=p, width=x.shape[1],
            features=_pad_columns(x, width),
            weights=pad_weights(initial_weights(settings.kind, x.shape[1], settings.hidden_units, settings.seed, p), width),
            optimizer_state=comps.initial_optimizer_state(),
            labels=labels if p == 0 else None,
            noise_rng=unseeded_generator() if _draws_noise(settings, p) else None,
            eval_features=None if held_out is None else _pad_columns(held_out[p], width),
        )
        for p, x in enumerate(parties)
    ]
    lender = states[0]
    coordinator = CoordinatorState(n_parties, n_rows, settings.batch_size, comps.bitwidth)
    schedule = [
        (epoch, rows)
        for epoch in range(1, settings.epochs + 1)
        for rows in batch_indices(n_rows, settings.batch_size, epoch, settings.seed)
    ]

    log = MetricsLog(_run_dir(run_dir)) if run_dir is not None else None
    bar = tqdm(total=settings.epochs, desc="vertical", unit="epoch", dynamic_ncols=True, disable=not progress)
    history: list[dict[str, Any]] = []
    eval_bytes = dict.fromkeys(EVAL_MESSAGE_KINDS, 0)
    eval_logits = None
    epoch_bytes = dict.fromkeys(MESSAGE_KINDS, 0)
    epoch_loss, epoch_started = 0.0, time.perf_counter()
    try:
        rows0 = schedule[0][1]
        z = comps.forward(
            [s.weights for s in states], [s.features[rows0] for s in states],
            [_partial_noise(s, settings, len(rows0)) for s in states],
        )
        for k, (epoch, rows) in enumerate(schedule):
            n = len(rows)
            # coordinator -> lender: z; lender: loss and the gradient it releases.
            label_noise = (
                draw_noise(lender.noise_rng, settings.label_noise_multiplier / n, n)
                if settings.label_noise_multiplier > 0 else np.zeros(n, np.float32)
            )
            loss, g = comps.lender_step(z, lender.labels[rows], label_noise)
            epoch_loss += loss * n
            _count(epoch_bytes, n, n_parties)
            # coordinator -> every party: g; each party updates; (next batch's forward).
            weights = [s.weights for s in states]
            opts = [s.optimizer_state for s in states]
            x = [s.features[rows] for s in states]
            if k + 1 < len(schedule):
                next_rows = schedule[k + 1][1]
                weights, opts, z = comps.backward_forward(
                    g, weights, opts, x, [s.features[next_rows] for s in states],
                    [_partial_noise(s, settings, len(next_rows)) for s in states],
                )
            else:
                weights, opts = comps.backward(g, weights, opts, x)
            for s, w, o in zip(states, weights, opts):
                s.weights = [np.asarray(a, np.float32) for a in w]
                s.optimizer_state = [np.asarray(a, np.float32) for a in o]
            coordinator.step += 1
            if k + 1 < len(schedule) and schedule[k + 1][0] == epoch:
                continue
            # end of the epoch: the lender reports its mean loss (one float32) to the coordinator.
            epoch_bytes["loss_up"] += 4
            coordinator.epoch = epoch
            coordinator.loss_history.append(epoch_loss / n_rows)
            for kind, count in epoch_bytes.items():
                coordinator.bytes_sent[kind] += count
            record: dict[str, Any] = {
                "round": epoch, "epoch": epoch, "loss": epoch_loss / n_rows,
                "bytes": sum(epoch_bytes.values()),
            }
            if settings.label_noise_multiplier > 0:
                record["label_epsilon"] = label_dp_epsilon(
                    settings.label_noise_multiplier, epoch, settings.delta, settings.accountant
                )
            if evaluate is not None and (epoch % settings.eval_every == 0 or epoch == settings.epochs):
                # coordinator -> lender: z of the held-out rows; the lender scores it.
                eval_logits = _secure_logits(comps, [s.weights for s in states], [s.eval_features for s in states])
                _count_evaluation(eval_bytes, len(eval_logits), n_parties)
                record.update(evaluate(eval_logits))
            record["seconds"] = time.perf_counter() - epoch_started
            history.append(record)
            if log is not None:
                log.write(record)
            bar.update(1)
            bar.set_postfix(_postfix(record), refresh=False)
            last_epoch_bytes = dict(epoch_bytes)
            epoch_bytes = dict.fromkeys(MESSAGE_KINDS, 0)
            epoch_loss, epoch_started = 0.0, time.perf_counter()
    finally:
        bar.close()
        if log is not None:
            log.close()

    return VerticalResult(
        party_weights=[unpad_weights(s.weights, s.width) for s in states],
        history=history,
        bytes_per_epoch={**last_epoch_bytes, "total": sum(last_epoch_bytes.values())},
        bytes_total={**coordinator.bytes_sent, "total": sum(coordinator.bytes_sent.values())},
        seconds=time.perf_counter() - started,
        label_dp=_label_dp_report(settings),
        partial_noise=_partial_noise_report(settings, n_parties),
        coordinator=coordinator,
        tff_calls=comps.calls,
        eval_calls=comps.eval_calls,
        eval_bytes_total={**eval_bytes, "total": sum(eval_bytes.values())},
        eval_logits=eval_logits,
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
    counter["gradient_down"] += (n_parties - 1) * n * np.dtype(np.float32).itemsize


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
        "mechanism": "g + N(0, (noise_multiplier/batch_rows)^2) on dL/dz, L2 sensitivity 1/batch_rows, once per epoch",
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
