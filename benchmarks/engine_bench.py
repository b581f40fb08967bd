"""Engine speed: one FedAvg round on TFF's stock simulation and on the grouped engine, against
the limit; each app's default job; one versus two TFF workers.

Run with `make bench` or:  cd /work/main && uv run --locked python benchmarks/engine_bench.py
Writes benchmarks/results.json and benchmarks/results.md, and prints the Markdown.

1. Engine overhead, at 10, 100 and 1000 clients per round: the healthcare MLP (30-64-1,
   sigmoid output, binary cross-entropy), 57 examples per client, batch 16, one local epoch,
   client SGD 0.1, server SGD 1.0. Three ways to run the same round, in ONE process per
   clients-per-round value (the ratios are measured in the same process):
   - limit: the same local SGD steps (same model, examples, batch size) in one plain
     tf.function loop over the clients, data already in memory, no TFF;
   - stock: `tff.learning.algorithms.build_weighted_fed_avg`, one tf.data.Dataset per client;
   - grouped: `factory.build_learning_process` with `train.engine = "grouped"`, the same datasets.
   Each is warmed up by one round (tracing, the worker's compile), then timed over several
   rounds; the figure is the median. Peak RSS is the process tree's (Python + the TFF worker),
   sampled every 20 ms during each phase; phases run grouped, limit, stock (memory a phase
   allocated is not always returned, so a later phase's peak can include an earlier one's).
2. Each app's default job (`tff-apps run <app>`, a subprocess): wall time, peak RSS of its
   process tree, federated quality against its centralized baseline (summary.json), and for
   healthcare the same job with `--set train.engine=grouped`.
3. One versus two TFF workers for the stock path: `benchmarks/workers_bench.py` (the healthcare
   job, per-round seconds from metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS_JSON = ROOT / "benchmarks" / "results.json"
RESULTS_MD = ROOT / "benchmarks" / "results.md"

FEATURES, HIDDEN, EXAMPLES, BATCH = 30, 64, 57, 16
CLIENT_LR, SERVER_LR = 0.1, 1.0
CLIENT_COUNTS = (10, 100, 1000)
ROUNDS = {10: 7, 100: 5, 1000: 3}  # timed rounds after the warm-up round
APPS = ("healthcare", "traffic", "finance")


# -- memory ------------------------------------------------------------------------------------


class PeakRss:
    """Peak resident memory of a process and all its children (the TFF worker), sampled."""

    def __init__(self, pid: int, every: float = 0.02):
        import psutil

        self.process, self.every, self.peak = psutil.Process(pid), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _tree_rss(self) -> int:
        import psutil

        total = 0
        try:
            for proc in [self.process, *self.process.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        return total

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._tree_rss())
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._tree_rss())


def mb(n_bytes: int) -> float:
    return round(n_bytes / 2**20, 1)


# -- part 1: one round, three ways (run in a child process per clients-per-round value) ---------


def synthetic_clients(n: int):
    import numpy as np

    from tff_apps.learning.client_data import ClientTrainData

    rng = np.random.default_rng(n)
    true_w = rng.standard_normal(FEATURES)
    clients = []
    for i in range(n):
        x = rng.standard_normal((EXAMPLES, FEATURES)).astype(np.float32)
        y = (rng.random(EXAMPLES) < 1 / (1 + np.exp(-(x @ true_w)))).astype(np.float32).reshape(-1, 1)
        clients.append(ClientTrainData(f"c{i}", x, y))
    return clients


def build_limit(model_cfg, clients):
    """The same SGD steps in one tf.function: for each client, its batches in dataset order
    (rows already permuted as `client_data.client_dataset` permutes them), from the same start."""
    import tensorflow as tf

    from healthcare.model import build_keras_model

    return plain_round(build_keras_model(model_cfg, FEATURES, 0), tf.keras.losses.BinaryCrossentropy())


def plain_round(model, loss_fn, examples: int = EXAMPLES):
    """`build_limit`'s round for any Keras `model` and loss: (round_fn(start, x, y) -> the new
    weights, the model's start weights), x [clients, examples, ...]."""
    import tensorflow as tf

    variables = model.trainable_variables
    steps = [(s, min(s + BATCH, examples)) for s in range(0, examples, BATCH)]

    @tf.function
    def round_fn(start, x, y):
        total = [tf.zeros_like(v) for v in variables]
        for c in tf.range(tf.shape(x)[0]):
            for v, w in zip(variables, start):
                v.assign(w)
            for first, last in steps:
                with tf.GradientTape() as tape:
                    loss = loss_fn(y[c, first:last], model(x[c, first:last], training=True))
                for v, g in zip(variables, tape.gradient(loss, variables)):
                    v.assign_sub(CLIENT_LR * g)
            total = [t + float(examples) * (w - v) for t, w, v in zip(total, start, variables)]
        n = tf.cast(tf.shape(x)[0] * examples, tf.float32)
        return [w - SERVER_LR * t / n for w, t in zip(start, total)]

    start = [tf.identity(v) for v in variables]
    return round_fn, start


def round_inputs(clients, train, round_number: int):
    from tff_apps.learning import client_data

    return [client_data.client_dataset(c, train, client_data.round_seed(0, round_number, i)) for i, c in enumerate(clients)]


def permuted_arrays(clients, train, round_number: int):
    """The limit's data: each client's rows in its dataset's order, stacked [clients, rows, ...]."""
    import numpy as np

    from tff_apps.learning import client_data

    assert train.local_epochs == 1 and train.local_steps == 0  # one permutation, as client_dataset draws it
    xs, ys = [], []
    for i, c in enumerate(clients):
        order = np.random.default_rng(client_data.round_seed(0, round_number, i)).permutation(len(c.x))
        xs.append(c.x[order])
        ys.append(c.y[order])
    return np.stack(xs), np.stack(ys)


def engine_overhead(n_clients: int) -> dict:
    """One process: builds and warms up the three paths (one round each, the peak RSS of the
    process tree measured during each), then times them round by round in turn (limit,
    grouped, stock; the machine's load at any moment falls on all three alike)."""
    import dataclasses

    import tensorflow as tf
    import tensorflow_federated as tff

    from healthcare.model import ModelConfig, tff_model_fn
    from tff_apps.learning import factory
    from tff_apps.config import TrainSection
    from tff_apps.runtime.context import Runtime

    model_cfg = ModelConfig(kind="mlp", hidden_units=HIDDEN)
    model_fn = tff_model_fn(model_cfg, FEATURES, 0)
    train = TrainSection(batch_size=BATCH, local_epochs=1, client_learning_rate=CLIENT_LR, server_learning_rate=SERVER_LR)
    clients = synthetic_clients(n_clients)
    timed = ROUNDS[n_clients]
    inputs = {r: round_inputs(clients, train, r) for r in range(timed + 1)}  # built before timing
    arrays = {r: permuted_arrays(clients, train, r) for r in range(timed + 1)}
    me = os.getpid()
    with Runtime():
        grouped = factory.build_learning_process(dataclasses.replace(train, engine="grouped"), model_fn)
        stock = tff.learning.algorithms.build_weighted_fed_avg(
            model_fn,
            client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=CLIENT_LR),
            server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=SERVER_LR),
        )
        round_fn, start = build_limit(model_cfg, clients)
        state = {"grouped": grouped.initialize(), "stock": stock.initialize(), "limit": start}

        def run(path: str, r: int) -> None:
            if path == "limit":
                x, y = arrays[r]
                state["limit"] = [w.numpy() for w in round_fn(state["limit"], tf.constant(x), tf.constant(y))]
            else:
                process = grouped if path == "grouped" else stock
                state[path] = process.next(state[path], inputs[r]).state

        paths = ("grouped", "limit", "stock")  # the order of the memory phases: see the docstring
        result = {"clients": n_clients, "rounds_timed": timed}
        for path in paths:
            with PeakRss(me) as peak:
                started = time.perf_counter()
                run(path, 0)
                result[path] = {"warmup_s": time.perf_counter() - started, "round_s": []}
            result[path]["peak_rss_mb"] = mb(peak.peak)
        with PeakRss(me) as peak:
            for r in range(1, timed + 1):
                for path in paths:
                    started = time.perf_counter()
                    run(path, r)
                    result[path]["round_s"].append(time.perf_counter() - started)
        result["peak_rss_all_mb"] = mb(peak.peak)
        final = {
            "grouped": grouped.get_model_weights(state["grouped"]).trainable,
            "stock": stock.get_model_weights(state["stock"]).trainable,
            "limit": state["limit"],
        }
    # Same mathematics: after the same rounds the three models agree (float32 rounding).
    for other in ("stock", "limit"):
        result[f"{other}_vs_grouped_max_abs_diff"] = float(
            max(abs(a - b).max() for a, b in zip(final[other], final["grouped"]))
        )
    limit = statistics.median(result["limit"]["round_s"])
    for path in paths:
        result[path]["median_round_s"] = statistics.median(result[path]["round_s"])
        result[path]["ratio_to_limit"] = result[path]["median_round_s"] / limit
    return result


# -- part 2: each app's default job ---------------------------------------------------------------


def run_app(app: str, runs: Path, run_id: str, extra: list[str]) -> dict:
    args = [sys.executable, "-m", "tff_apps.cli", "run", app, "--run-id", run_id, "--set", f'job.runs_dir="{runs}"']
    for item in extra:
        args += ["--set", item]
    started = time.perf_counter()
    child = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with PeakRss(child.pid) as peak:
        _, stderr = child.communicate()
    wall = time.perf_counter() - started
    if child.returncode != 0:
        return {"app": app, "extra": extra, "error": f"exit {child.returncode}: {stderr.strip().splitlines()[-1:]}"}
    summary = json.loads((runs / app / run_id / "summary.json").read_text())
    return {
        "app": app,
        "extra": extra,
        "wall_s": round(wall, 1),
        "training_s": summary.get("training_seconds"),
        "peak_rss_mb": mb(peak.peak),
        **quality(summary),
    }


def quality(summary: dict) -> dict:
    """The headline metric of the federated model and of the centralized baseline."""
    headline = summary.get("headline", "")
    key = headline.removeprefix("test_")
    values = {}
    results = summary.get("results", {})
    for label, names in (("federated", ("federated", "vertical")), ("centralized", ("centralized",))):
        report = next((results[name] for name in names if name in results), {})
        for where in (report.get("pooled", {}), report, report.get("overall", {})):
            if isinstance(where, dict) and isinstance(where.get(key), (int, float)):
                values[label] = float(where[key])
                break
    return {"metric": key, "federated": values.get("federated"), "centralized": values.get("centralized")}


# -- part 3: one versus two workers ---------------------------------------------------------------


def workers_comparison() -> dict:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "workers_bench.py"), "--rounds", "4"],
        cwd=ROOT, capture_output=True, text=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"exit": done.returncode, "output": lines or done.stderr.strip().splitlines()[-3:]}


# -- report ----------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    out = ["# Engine benchmark", "", f"Machine: {results['machine']}", ""]
    out += [
        "## One FedAvg round (healthcare MLP 30-64-1, 57 examples per client, batch 16, one epoch)",
        "",
        "Median seconds per round over the timed rounds (each path's round is timed in turn, in one "
        "process per row, after a warm-up round); ratio = round time / limit. The limit is the same SGD "
        "steps in one plain tf.function loop, data in memory. Peak RSS: the process tree (Python + TFF "
        "worker), sampled every 20 ms, during the path's warm-up round (grouped first, then limit, then "
        "stock). Last column: the three models agree after the same rounds.",
        "",
        "| clients per round | limit s | stock TFF s | grouped s | stock / limit | grouped / limit | "
        "peak RSS stock MB | peak RSS grouped MB | max abs diff grouped vs stock / vs limit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["engine_overhead"]:
        if "error" in r:
            out.append(f"| {r['clients']} | error: {r['error']} |||||||")
            continue
        out.append(
            f"| {r['clients']} | {r['limit']['median_round_s']:.3f} | {r['stock']['median_round_s']:.3f} | "
            f"{r['grouped']['median_round_s']:.3f} | {r['stock']['ratio_to_limit']:.2f}x | "
            f"{r['grouped']['ratio_to_limit']:.2f}x | {r['stock']['peak_rss_mb']:.0f} | "
            f"{r['grouped']['peak_rss_mb']:.0f} | {r['stock_vs_grouped_max_abs_diff']:.1e} / "
            f"{r['limit_vs_grouped_max_abs_diff']:.1e} |"
        )
    out += ["", "## Each app's default job (`tff-apps run <app>`)", "",
            "| app | settings | wall s | training s | peak RSS MB | metric | federated | centralized |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results["apps"]:
        settings = " ".join(r["extra"]) or "default"
        if "error" in r:
            out.append(f"| {r['app']} | {settings} | error: {r['error']} ||||||")
            continue
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        out.append(
            f"| {r['app']} | {settings} | {r['wall_s']} | {r['training_s']} | {r['peak_rss_mb']:.0f} | "
            f"{r['metric']} | {fmt(r['federated'])} | {fmt(r['centralized'])} |"
        )
    out += ["", "## One versus two TFF workers (stock engine, healthcare job; benchmarks/workers_bench.py)", "", "```"]
    out += results["workers"]["output"] + ["```", ""]
    return "\n".join(out)


def machine() -> str:
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overhead-only", type=int, help=argparse.SUPPRESS)  # child: one clients value
    parser.add_argument("--clients", type=int, nargs="*", default=list(CLIENT_COUNTS))
    parser.add_argument("--skip-apps", action="store_true")
    parser.add_argument("--skip-workers", action="store_true")
    args = parser.parse_args()
    if args.overhead_only:
        print(json.dumps(engine_overhead(args.overhead_only)))
        return

    results = {"machine": machine(), "engine_overhead": [], "apps": [], "workers": {"output": ["skipped"]}}
    for n in args.clients:
        done = subprocess.run(
            [sys.executable, __file__, "--overhead-only", str(n)], cwd=ROOT, capture_output=True, text=True
        )
        if done.returncode != 0:
            results["engine_overhead"].append({"clients": n, "error": done.stderr.strip().splitlines()[-1:]})
        else:
            results["engine_overhead"].append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"engine overhead, {n} clients: done", file=sys.stderr, flush=True)
    if not args.skip_apps:
        with tempfile.TemporaryDirectory() as tmp:
            runs = Path(tmp)
            jobs = [(app, []) for app in APPS] + [("healthcare", ["train.engine=grouped"])]
            for index, (app, extra) in enumerate(jobs):
                results["apps"].append(run_app(app, runs, f"bench{index}", extra))
                print(f"app {app} {extra}: done", file=sys.stderr, flush=True)
    if not args.skip_workers:
        results["workers"] = workers_comparison()
    RESULTS_JSON.write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    RESULTS_MD.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
