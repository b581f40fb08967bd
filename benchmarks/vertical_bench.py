"""Vertical (split-model) training speed against the limit: seconds per epoch, ratio, peak memory.

Run by hand (not by pytest):  cd /work/main && .venv/bin/python benchmarks/vertical_bench.py
Synthetic customers (default 30,000 and 300,000, every one a training row), 23 standard-normal
features split 13 (lender) + 10 (partner), labels from a logistic model of all 23 (a real
signal), batch 64, the finance default's model and optimizer (logistic bottom models, Adam at
0.01). For each size it prints:
- vertical: `train_vertical` (TFF computations, the secure sum of every batch's partial
  scores, `CHUNK_BATCHES` batches per TFF call); the first epoch (it includes tracing and
  compiling the chunk computations, once per run) apart from the median of the others;
- limit: the same split-model training (each party's clipped bottom model, the sum, the
  lender's gradient, each party's Adam step, the same batches) as one plain `tf.function` per
  epoch over tensors in memory, no TFF, no fixed point; the median epoch after a warm-up;
- ratio = vertical epoch / limit epoch, and peak RSS (`resource.getrusage`) of this process
  and of the TFF worker process (its VmHWM).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tff_apps.learning import vertical  # noqa: E402
from tff_apps.learning.vertical_epoch import CHUNK_BATCHES  # noqa: E402
from tff_apps.program import vertical_rounds  # noqa: E402
from tff_apps.runtime.context import Runtime  # noqa: E402

LENDER_COLS, PARTNER_COLS = 13, 10


def synthetic(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, LENDER_COLS + PARTNER_COLS)).astype(np.float32)
    logit = x @ rng.normal(size=x.shape[1]) / 3 - 1.0
    y = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return [x[:, :LENDER_COLS], x[:, LENDER_COLS:]], y


def settings(epochs: int) -> vertical.VerticalSettings:
    return vertical.VerticalSettings(kind="logistic", optimizer="adam", learning_rate=0.01, batch_size=64, epochs=epochs)


def time_vertical(parties, y, epochs: int) -> dict:
    with Runtime() as runtime:
        result = vertical_rounds.train_vertical(parties, y, settings(epochs), progress=False)
        worker_peak = _vm_hwm_mib(runtime.worker_pid)
    seconds = [r["seconds"] for r in result.history]
    return {
        "first": seconds[0], "epoch": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0],
        "calls_per_epoch": result.tff_calls / epochs, "worker_peak_mib": worker_peak, "loss": result.history[-1]["loss"],
    }


def time_limit(parties, y, epochs: int) -> dict:
    """One tf.function per epoch: the split model's SGD over in-memory tensors (module docstring)."""
    s = settings(epochs)
    comps = vertical.VerticalComputations(s, len(parties), max(x.shape[1] for x in parties))  # its _score and _update
    weights = [[tf.Variable(w) for w in vertical.initial_weights("logistic", comps.width, 16, 0, p)] for p in range(len(parties))]
    opts = [[tf.Variable(a) for a in comps.initial_optimizer_state()] for _ in parties]
    padded = [np.pad(x, ((0, 0), (0, comps.width - x.shape[1]))) for x in parties]

    def step(xb, yb):
        z = tf.add_n([comps._score(w, x) for w, x in zip(weights, xb)])
        g = (tf.sigmoid(z) - yb) / tf.cast(tf.shape(yb)[0], tf.float32)
        for w, o, x in zip(weights, opts, xb):
            new_w, new_o = comps._update(w, o, x, g)
            for var, value in zip(w + o, new_w + new_o):
                var.assign(value)
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=yb, logits=z))

    @tf.function
    def epoch(xs, ys, x_last, y_last):
        total = tf.constant(0.0)
        for k in tf.range(tf.shape(ys)[0]):
            total += step([x[k] for x in xs], ys[k])
        return total + step(x_last, y_last)

    seconds = []
    for e in range(1, epochs + 1):
        batches = vertical.batch_indices(len(y), s.batch_size, e, s.seed)
        full = np.stack(batches[:-1])  # every batch but the last has batch_size rows
        started = time.perf_counter()
        epoch([tf.constant(x[full]) for x in padded], tf.constant(y[full]), [tf.constant(x[batches[-1]]) for x in padded],
              tf.constant(y[batches[-1]]))
        seconds.append(time.perf_counter() - started)
    return {"first": seconds[0], "epoch": statistics.median(seconds[1:])}


def _vm_hwm_mib(pid: int | None) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="30000,300000", help="customers, comma separated")
    parser.add_argument("--epochs", type=int, default=3, help="vertical epochs per size (the first includes compiling)")
    parser.add_argument("--limit-epochs", type=int, default=4)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; batch 64, "
          f"{LENDER_COLS}+{PARTNER_COLS} features, {CHUNK_BATCHES} batches per TFF call")
    print(f"{'customers':>10} {'batches':>8} {'vertical s/epoch':>17} {'first epoch s':>14} {'limit s/epoch':>14} "
          f"{'ratio':>7} {'peak RSS MiB (py / worker)':>27} {'load':>5}")
    for rows in (int(v) for v in args.sizes.split(",")):
        parties, y = synthetic(rows)
        limit = time_limit(parties, y, args.limit_epochs)
        fast = time_vertical(parties, y, args.epochs)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        batches = -(-rows // 64)
        print(f"{rows:>10} {batches:>8} {fast['epoch']:>17.2f} {fast['first']:>14.2f} {limit['epoch']:>14.3f} "
              f"{fast['epoch'] / limit['epoch']:>7.1f} {peak:>13.0f} / {fast['worker_peak_mib']:<11.0f} "
              f"{os.getloadavg()[0]:>5.2f}", flush=True)


if __name__ == "__main__":
    main()
