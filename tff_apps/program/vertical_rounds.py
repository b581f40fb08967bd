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
Weights, features and labels are never sent.
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
from tff_apps.learning.preprocessing import SECURE_SUM_BITWIDTH
from tff_apps.learning.vertical import (
    MESSAGE_KINDS,
    CoordinatorState,
    PartyState,
    VerticalComputations,
    VerticalResult,
    VerticalSettings,
    batch_indices,
    initial_weights,
    pad_weights,
    resolve_party_names,
    unpad_weights,
    validate_inputs,
)
from tff_apps.privacy import accounting
from tff_apps.program.metrics_log import MetricsLog


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
    evaluate: Callable[[list[list[np.ndarray]]], dict[str, float]] | None = None,
    run_dir: Path | str | None = None,
    progress: bool = True,
) -> VerticalResult:
    """Trains the split model on aligned party matrices (party 0 = the lender, with `labels`).

    Must run inside `tff_apps.runtime.context.Runtime()`. `evaluate(unpadded party weights)` is called
    every `eval_every` epochs and after the last; its metrics go into that epoch's record.
    With `run_dir`, one line per epoch goes to metrics.jsonl (`metrics_log.MetricsLog`): epoch
    (also as "round", the key the other apps' records and TensorBoard steps use), loss (mean
    training BCE before each batch's update, as the lender reports it), bytes, seconds,
    the evaluate metrics and, with label noise, label_epsilon so far.
    """
    started = time.perf_counter()
    parties, labels = validate_inputs(parties, labels, settings)
    names = resolve_party_names(party_names, len(parties))
    n_rows, n_parties = len(labels), len(parties)
    width = max(x.shape[1] for x in parties)
    comps = VerticalComputations(settings, n_parties, width)
    if comps.bitwidth > SECURE_SUM_BITWIDTH:
        raise UserError(
            f"score_bound = {settings.score_bound} needs {comps.bitwidth}-bit secure-sum inputs; "
            f"at most {SECURE_SUM_BITWIDTH} are supported, choose a smaller bound"
        )
    states = [
        PartyState(
            name=names[p], index=p, width=x.shape[1],
            features=np.pad(x, ((0, 0), (0, width - x.shape[1]))),
            weights=pad_weights(initial_weights(settings.kind, x.shape[1], settings.hidden_units, settings.seed, p), width),
            optimizer_state=comps.initial_optimizer_state(),
            labels=labels if p == 0 else None,
            noise_rng=unseeded_generator() if _draws_noise(settings, p) else None,
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
                record.update(evaluate([unpad_weights(s.weights, s.width) for s in states]))
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
    )


def _count(counter: dict[str, int], n: int, n_parties: int) -> None:
    """One batch's payloads (see the module docstring)."""
    counter["partial_scores_up"] += n_parties * n * np.dtype(np.int64).itemsize
    counter["sum_to_lender"] += n * np.dtype(np.float32).itemsize
    counter["gradient_up"] += n * np.dtype(np.float32).itemsize
    counter["gradient_down"] += (n_parties - 1) * n * np.dtype(np.float32).itemsize


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
