"""Traffic forecasters side by side: MLP and the graph models (gcn_gru, dcrnn) through the
whole `tff-apps run traffic` job, on the generator's default and on other configurations.

For each (configuration, model) it prints MAE and MAPE at 60 min of federated training, the
centralized and local-only models and persistence, with the job's wall time and peak memory
(the largest resident set of one process of the job, from /usr/bin/time). Slow: a graph-model job on
the default data takes minutes on 2 cores. Usage:

    uv run python benchmarks/traffic_graph_bench.py                 # default data, 3 models
    uv run python benchmarks/traffic_graph_bench.py --config more_districts --models dcrnn
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "default": [],
    # more, smaller districts: each agency holds less of the road network
    "more_districts": ["--set", "data.n_districts=9", "--set", "data.sensors_per_district=8"],
    # the size of the public METR-LA week (207 sensors), for the time and memory target
    "metr_la_week": ["--set", "data.n_districts=6", "--set", "data.sensors_per_district=35", "--set", "data.days=7"],
}
# a graph example is a whole district: 8 of them hold about as many sensor windows as the MLP's 64
MODELS = {"mlp": ["--set", "train.batch_size=64"], "gcn_gru": ["--set", "train.batch_size=8"],
          "dcrnn": ["--set", "train.batch_size=8"]}
METHODS = ("federated", "centralized", "local_only", "persistence")


def run(config: str, model: str, runs_dir: Path) -> dict:
    args = ["tff-apps", "run", "traffic", *CONFIGS[config], "--set", f"model.kind={model}", *MODELS[model],
            "--set", f"job.runs_dir={runs_dir}", "--run-id", f"{config}-{model}"]
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    summary = json.loads((runs_dir / "traffic" / f"{config}-{model}" / "summary.json").read_text())
    results = {m: summary["results"][m]["overall"] for m in METHODS if m in summary["results"]}
    return {"seconds": seconds, "training_seconds": summary["training_seconds"], "peak_mb": peak_kb / 1024,
            "results": results}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", choices=sorted(CONFIGS), action="append")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    options = parser.parse_args()
    print("| config | model | " + " | ".join(f"{m} MAE60 / MAPE60" for m in METHODS) + " | wall s | peak MB |")
    print("|---" * (len(METHODS) + 4) + "|")
    with tempfile.TemporaryDirectory() as folder:
        for config in options.config or ["default"]:
            for model in options.models:
                row = run(config, model, Path(folder))
                cells = [
                    f"{r['mae_60min']:.3f} / {r['mape_60min']:.1f} %" if (r := row["results"].get(m)) else "-"
                    for m in METHODS
                ]
                print(f"| {config} | {model} | " + " | ".join(cells) + f" | {row['seconds']:.0f} | {row['peak_mb']:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
