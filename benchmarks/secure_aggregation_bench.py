"""Per-round time of a healthcare job with simulated vs masked secure aggregation.

    .venv/bin/python benchmarks/secure_aggregation_bench.py [--clients 10] [--rounds 12]
        [--repeats 2] [--set section.key=value ...]

Both modes run the same job (breast cancer split over `--clients` hospitals, FedAvg,
no baselines, no export, no checkpoints) in this process, each with its own TFF worker.
A round's time is the program's `round_seconds` (client work, aggregation, server update);
the first round (tracing and compilation) and the last (evaluation) are left out, and the
median of the rest is reported, over `--repeats` alternating runs per mode. For masked, the
share of the round spent in the secure-aggregation protocol (`secagg_seconds`) and its
traffic are shown too. Target: masked <= 3 x simulated at 10 clients.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_mode(mode: str, clients: int, rounds: int, runs_dir: Path, extra: list[str]) -> list[dict]:
    from tff_apps.program import round_loop
    from tff_apps.program.job import resolve_job, run_job

    overrides = [
        f"data.n_clients={clients}",
        f"train.rounds={rounds}",
        f"train.eval_every={rounds}",
        "train.checkpoint_every=0",
        f"privacy.secure_aggregation={mode}",
        "evaluate.centralized_baseline=false",
        "evaluate.local_baseline=false",
        "export.enabled=false",
        f'job.runs_dir="{runs_dir}"',
        *extra,
    ]
    app, cfg = resolve_job("healthcare", None, overrides)
    history: list[dict] = []
    original = round_loop.run_rounds

    def keep_history(*args, **kwargs):
        result = original(*args, **kwargs)
        history.extend(result.history)
        return result

    round_loop.run_rounds = keep_history
    try:
        run_job(app, cfg.replace("job", run_id=f"{mode}-{time.time_ns()}"))
    finally:
        round_loop.run_rounds = original
    return history[1:-1]  # without compilation (first) and evaluation (last)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)

    rounds: dict[str, list[dict]] = {"simulated": [], "masked": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for mode in rounds:  # alternate, so load on the machine hits both alike
                rounds[mode].extend(run_mode(mode, args.clients, args.rounds, Path(tmp), args.extra))

    median = {mode: statistics.median(r["round_seconds"] for r in records) for mode, records in rounds.items()}
    secagg = statistics.median(r["secagg_seconds"] for r in rounds["masked"])
    traffic = statistics.median(r["secagg_bytes"] for r in rounds["masked"])
    print(f"healthcare, {args.clients} clients, median of {len(rounds['masked'])} rounds per mode")
    print(f"{'mode':<10} {'s/round':>9}")
    print(f"{'simulated':<10} {median['simulated']:9.3f}")
    print(f"{'masked':<10} {median['masked']:9.3f}   (secure-aggregation protocol {secagg:.3f} s, {traffic:,.0f} bytes)")
    ratio = median["masked"] / median["simulated"]
    print(f"masked / simulated = {ratio:.2f} (target <= 3)")


if __name__ == "__main__":
    main()
