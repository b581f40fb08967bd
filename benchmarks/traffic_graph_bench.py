"""Traffic forecasters side by side: MLP and the graph models (gcn_gru, dcrnn) through the
whole `tff-apps run traffic` job, on the generator's default and on other configurations.

For each (configuration, model) it prints MAE and MAPE at 60 min of federated training, the
centralized and local-only models and persistence, the federated MAE against the federated
MLP's of the same configuration, and the job's wall time and peak memory (the largest resident
set of one process of the job, from /usr/bin/time), then which of issue 19's targets each
graph model meets. Slow: a graph-model job on the default data takes minutes on 2 cores. Usage:

    uv run python benchmarks/traffic_graph_bench.py                 # default data, 3 models
    uv run python benchmarks/traffic_graph_bench.py --config busy --seed 1
    uv run python benchmarks/traffic_graph_bench.py --config metr_la_week --models dcrnn --runs-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path
from unittest import mock

CONFIGS = {
    "default": [],
    # more, smaller districts (each agency holds less of the road network) and three times the
    # incidents: generated, written as METR-LA files and read back by the csv source (`busy_data`)
    "busy": [],
    # the size of the public METR-LA week (207 sensors), for the time and memory target
    "metr_la_week": ["--set", "data.n_districts=6", "--set", "data.sensors_per_district=35", "--set", "data.days=7"],
}
BUSY = {"n_districts": 9, "sensors_per_district": 8, "incidents_times": 3.0}
# Every model runs the default job with `model.kind` set: the graph models take their kind's
# training defaults (batch 8, client learning rate 0.005; traffic/splits.py `with_kind_defaults`).
MODELS = {"mlp": [], "gcn_gru": [], "dcrnn": []}
METHODS = ("federated", "centralized", "local_only", "persistence")


def busy_data(folder: Path, seed: int) -> list[str]:
    """The `busy` configuration's files (speeds.h5, distances.csv, sensors.csv) and the job's
    settings that read them. The generator's incident rate is not a job key, so the generator
    runs here with its own knob (GeneratorParams) and the job reads its output as user data."""
    from dataclasses import replace

    from traffic import data
    from traffic.generator import GeneratorParams

    defaults = GeneratorParams()
    low, high = defaults.incidents_per_corridor_day
    params = replace(defaults, incidents_per_corridor_day=(low * BUSY["incidents_times"], high * BUSY["incidents_times"]))
    cfg = data.DataConfig(n_districts=BUSY["n_districts"], sensors_per_district=BUSY["sensors_per_district"])
    generate = data._generate  # write_generated's own generator call, with the knob set
    with mock.patch.object(data, "_generate", lambda c, s: generate(c, s, params)):
        paths = data.write_generated(cfg, seed, folder)
    return ["--set", "data.source=csv", "--set", f"data.path={paths['speeds']}",
            "--set", f"data.metadata_path={paths['sensors']}", "--set", f"data.graph_path={paths['distances']}"]


def run(config: str, model: str, seed: int, runs_dir: Path) -> dict:
    data = busy_data(runs_dir / f"busy-{seed}", seed) if config == "busy" else CONFIGS[config]
    run_id = f"{config}-{model}-{seed}"
    args = ["tff-apps", "run", "traffic", *data, "--set", f"model.kind={model}", *MODELS[model],
            "--set", f"job.seed={seed}", "--set", f"job.runs_dir={runs_dir}", "--run-id", run_id]
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    summary = json.loads((runs_dir / "traffic" / run_id / "summary.json").read_text())
    results = {m: summary["results"][m]["overall"] for m in METHODS if m in summary["results"]}
    return {"seconds": seconds, "training_seconds": summary["training_seconds"], "peak_mb": peak_kb / 1024,
            "results": results}


def targets(row: dict, mlp: dict | None) -> list[str]:
    """Issue 19's targets a graph model's run meets (+) or misses (-), at 60 min."""
    r = {m: row["results"][m] for m in METHODS}
    fed = r["federated"]["mae_60min"]
    checks = {
        "fed<=central": fed <= r["centralized"]["mae_60min"],
        "fed<local": fed < r["local_only"]["mae_60min"],
        "MAE<persistence": fed < r["persistence"]["mae_60min"],
        "MAPE<persistence": r["federated"]["mape_60min"] < r["persistence"]["mape_60min"],
    }
    if mlp is not None:
        checks["10% below MLP"] = fed <= 0.9 * mlp["results"]["federated"]["mae_60min"]
    return [("+" if ok else "-") + name for name, ok in checks.items()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", choices=sorted(CONFIGS), action="append")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--seed", type=int, default=0, help="job.seed (the generator's seed too)")
    parser.add_argument("--runs-dir", default="", help="keep the runs here (default: a temporary folder)")
    options = parser.parse_args()
    print("| config | model | " + " | ".join(f"{m} MAE60 / MAPE60" for m in METHODS)
          + " | fed vs MLP | wall s | peak MB | targets |")
    print("|---" * (len(METHODS) + 6) + "|")
    with tempfile.TemporaryDirectory() as temporary:
        folder = options.runs_dir or temporary
        for config in options.config or ["default"]:
            mlp = None
            for model in options.models:
                row = run(config, model, options.seed, Path(folder))
                mlp = row if model == "mlp" else mlp
                cells = [
                    f"{r['mae_60min']:.3f} / {r['mape_60min']:.1f} %" if (r := row["results"].get(m)) else "-"
                    for m in METHODS
                ]
                fed = row["results"]["federated"]["mae_60min"]
                versus = f"{fed / mlp['results']['federated']['mae_60min'] - 1:+.1%}" if mlp and model != "mlp" else "-"
                met = " ".join(targets(row, mlp)) if model != "mlp" else ""
                print(f"| {config} | {model} | " + " | ".join(cells)
                      + f" | {versus} | {row['seconds']:.0f} | {row['peak_mb']:.0f} | {met} |", flush=True)


if __name__ == "__main__":
    main()
