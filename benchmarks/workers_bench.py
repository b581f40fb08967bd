"""Time one training round on one TFF worker versus two (loopback).

Run by hand (not by pytest):  cd /work/main && .venv/bin/python benchmarks/workers_bench.py
Starts two `worker_binary` processes on 127.0.0.1 (owned: stopped on exit), runs the same
healthcare job through `tff-apps run --workers` once with one worker and once with both,
and prints the seconds per round from each run's metrics.jsonl (round 1 separately: it
includes compiling and tracing), plus the largest difference between the two final models.
Extra `--set` values go to both jobs, e.g. `--set train.local_epochs=5` for more client work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import portpicker  # noqa: E402

from tff_apps.runtime.worker import port_accepts, stop_process, start_worker  # noqa: E402


def run_job(runs: Path, run_id: str, workers: list[str], rounds: int, extra: list[str]) -> list[dict]:
    args = [
        sys.executable, "-m", "tff_apps.cli", "run", "healthcare", "--run-id", run_id,
        "--set", f"train.rounds={rounds}", "--set", f"train.checkpoint_every={rounds}",
        "--set", "evaluate.centralized_baseline=false", "--set", "evaluate.local_baseline=false",
        "--set", "export.enabled=false", "--set", f'job.runs_dir="{runs}"',
        "--workers", ",".join(workers),
    ]
    for item in extra:
        args += ["--set", item]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{run_id} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = (runs / "healthcare" / run_id / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def final_weights(run_dir: Path, rounds: int):
    import numpy as np
    import tensorflow as tf

    saved = tf.saved_model.load(str(run_dir / "checkpoints" / f"round_{rounds}"))()
    return [np.asarray(leaf) for leaf in tf.nest.flatten(saved)]


@contextlib.contextmanager
def loopback_workers(count: int):
    """`count` TFF workers on free loopback ports (ours: stopped on exit); yields their addresses."""
    ports = [portpicker.pick_unused_port() for _ in range(count)]
    processes = [start_worker(port) for port in ports]
    try:
        deadline = time.monotonic() + 30
        while not all(port_accepts(port) for port in ports):
            if time.monotonic() > deadline:
                raise SystemExit("the workers did not start")
            time.sleep(0.05)
        yield [f"127.0.0.1:{port}" for port in ports]
    finally:
        for process in processes:
            stop_process(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()

    with loopback_workers(2) as addresses:
        with tempfile.TemporaryDirectory() as tmp:
            runs = Path(tmp)
            results = {}
            for name, workers in (("1 worker ", addresses[:1]), ("2 workers", addresses)):
                rounds = run_job(runs, name.strip().replace(" ", "_"), workers, args.rounds, args.extra)
                seconds = [r["round_seconds"] for r in rounds]
                results[name] = seconds
                print(
                    f"{name}: first round {seconds[0]:.3f} s, then median {statistics.median(seconds[1:]):.3f} s "
                    f"per round (min {min(seconds[1:]):.3f}, rounds 2..{len(seconds)}; "
                    f"{rounds[0]['train_num_examples']:.0f} examples, {len(rounds[0]['clients'])} clients per round)",
                    flush=True,
                )
            one = final_weights(runs / "healthcare" / "1_worker", args.rounds)
            two = final_weights(runs / "healthcare" / "2_workers", args.rounds)
            diff = max(
                float(abs(a.astype(float) - b.astype(float)).max())
                for a, b in zip(one, two) if a.dtype.kind in "fiu" and a.size
            )
            ratio = statistics.median(results["1 worker "][1:]) / statistics.median(results["2 workers"][1:])
            print(f"speed-up of 2 workers over 1 (median round): {ratio:.2f}x on {os.cpu_count()} cores")
            print(f"max |weight difference| after {args.rounds} rounds, 1 vs 2 workers: {diff:.3g}")


if __name__ == "__main__":
    main()
