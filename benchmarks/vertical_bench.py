"""Time vertical (split-model) training: ms per TFF call, per mini-batch, per epoch.

Run by hand (not by pytest):  cd /work/main && .venv/bin/python benchmarks/vertical_bench.py
Defaults mimic the finance app's default job: 600 aligned training rows, a lender and one
partner (German credit columns after one-hot encoding, about 60 in all), batch 64.
Prints, per model kind: the first epoch (which includes tracing the TFF computations), the
steady-state epoch, the median ms of each TFF call kind, ms per batch, and a whole
`--epochs`-epoch run, so the integrator can tune the defaults (target: < 2 min on 2 cores).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from tff_apps.learning import vertical  # noqa: E402
from tff_apps.program import vertical_rounds  # noqa: E402
from tff_apps.runtime.context import Runtime  # noqa: E402

CALLS = ("forward", "lender_step", "backward_forward", "backward")


def synthetic(rows: int, lender_cols: int, partner_cols: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, lender_cols + partner_cols)).astype(np.float32)
    logit = x @ rng.normal(size=x.shape[1]) / np.sqrt(x.shape[1]) - 0.8
    y = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return [x[:, :lender_cols], x[:, lender_cols:]], y


def instrument() -> dict[str, list[float]]:
    """Wraps each VerticalComputations call with a timer (one entry per TFF call)."""
    timings: dict[str, list[float]] = collections.defaultdict(list)
    for name in CALLS:
        original = getattr(vertical.VerticalComputations, name)

        def timed(self, *args, _original=original, _name=name):
            started = time.perf_counter()
            try:
                return _original(self, *args)
            finally:
                timings[_name].append(1e3 * (time.perf_counter() - started))

        setattr(vertical.VerticalComputations, name, timed)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--lender-cols", type=int, default=24)
    parser.add_argument("--partner-cols", type=int, default=37)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--timed-epochs", type=int, default=5, help="steady-state epochs timed after the first")
    parser.add_argument("--epochs", type=int, default=40, help="epochs of the whole-run timing")
    parser.add_argument("--kinds", default="logistic,mlp")
    args = parser.parse_args()
    parties, y = synthetic(args.rows, args.lender_cols, args.partner_cols, seed=0)
    batches = -(-args.rows // args.batch_size)
    print(
        f"{args.rows} rows, parties {args.lender_cols}+{args.partner_cols} columns, batch {args.batch_size} "
        f"-> {batches} batches/epoch; {os.cpu_count()} CPUs"
    )
    timings = instrument()
    with Runtime():
        for kind in args.kinds.split(","):
            optimizer = "adam" if kind == "mlp" else "sgd"
            base = vertical.VerticalSettings(
                kind=kind, optimizer=optimizer, batch_size=args.batch_size,
                learning_rate=0.01 if optimizer == "adam" else 0.1,
            )
            timings.clear()
            settings = vertical.VerticalSettings(**{**base.__dict__, "epochs": 1 + args.timed_epochs})
            result = vertical_rounds.train_vertical(parties, y, settings, progress=False)
            first = result.history[0]["seconds"]
            steady = statistics.median(r["seconds"] for r in result.history[1:])
            calls = sum(len(v) for v in timings.values())
            print(f"\n[{kind}, {optimizer}] {result.tff_calls} TFF calls in {len(result.history)} epochs "
                  f"({result.tff_calls / (len(result.history) * batches):.2f} per batch)")
            print(f"  first epoch (traces the computations) {first * 1e3:8.1f} ms")
            print(f"  steady epoch                           {steady * 1e3:8.1f} ms  "
                  f"= {steady * 1e3 / batches:.1f} ms per batch")
            for name in CALLS:
                if timings.get(name):
                    values = timings[name]
                    print(f"  {name:<17} median {statistics.median(values):6.2f} ms  "
                          f"max {max(values):7.1f} ms  ({len(values)} calls)")
            assert calls == result.tff_calls
            print(f"  bytes per epoch {result.bytes_per_epoch}")
            settings = vertical.VerticalSettings(**{**base.__dict__, "epochs": args.epochs})
            started = time.perf_counter()
            vertical_rounds.train_vertical(parties, y, settings, progress=False)
            print(f"  whole run, {args.epochs} epochs: {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
