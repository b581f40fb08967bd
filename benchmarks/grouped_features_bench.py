"""The grouped engine per feature: one round at 10 / 100 / 1,000 clients (and 10,000 for the
plain mean), against the plain loop.

Run with `make bench` or:  uv run --locked python benchmarks/grouped_features_bench.py [--clients 10 100]
[--features median quantize] [--timed 2] [--out FILE]. Writes benchmarks/grouped_features.md (or FILE)
and prints it.

The round is `engine_bench`'s (healthcare MLP 30-64-1, 57 examples per client, batch 16, one
local epoch, client SGD 0.1, server SGD 1.0) with one feature switched on (workers_2: the round
spread over two loopback TFF workers, as `--workers`; server_adam / server_yogi at rate 0.01; [robustness] and
[communication]: median, trimmed_mean 0.2, clip_zero, scaled_update with a tenth of the clients
bad, 8-bit quantize / hadamard / dft; secure_masked: the Bonawitz protocol over every client of
the round, in Python; ddp_simulated / ddp_masked: distributed DP, clip 1.0, z 1.0, its integer
vectors summed plainly or by the Bonawitz protocol; dp_record: record-level DP-SGD, clip 1.0, noise 1.0, on Poisson round inputs
of the same expected batch and steps). The model rows (traffic_gru, traffic_gcn_gru,
traffic_dcrnn) run the plain weighted mean with traffic's model instead of the MLP (32 units;
history 12, horizon 12; the graph models' districts of 4 sensors; the masked MAE loss), on
synthetic windows, the same 57 examples a client. The limit is the
plain FedAvg round of `engine_bench.build_limit` (the same local SGD steps in one tf.function,
data in memory, no clipping, noise or quantization), so a ratio above the plain mean's is the
feature's own cost. The round time includes stacking the clients' datasets. One process per
(feature, clients) cell: warm-up round, then the median of the timed rounds; peak RSS of the
process tree (Python + the TFF worker) over the whole cell.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS_MD = ROOT / "benchmarks" / "grouped_features.md"

FEATURES = (
    "mean", "workers_2", "fedprox", "server_adam", "server_yogi", "dp_fixed", "dp_adaptive", "dp_record", "secure_simulated", "secure_masked",
    "ddp_simulated", "ddp_masked",
)
# [robustness] and [communication] (grouped_robust.py): a tenth of the clients bad for scaled_update
ROBUST_FEATURES = ("median", "trimmed_mean", "clip_zero", "scaled_update", "quantize", "hadamard", "dft")
MODEL_FEATURES = ("traffic_gru", "traffic_gcn_gru", "traffic_dcrnn")  # the plain mean with another model
CLIENT_COUNTS = (10, 100, 1000)
LARGE = 10_000  # the plain mean only: a large federation's round
# The Bonawitz protocol's Shamir shares (pycryptodome, pure-Python GF(2^128)) grow as clients^2:
# 100 clients take ~30 s a round in the protocol alone, on either engine; larger rounds are skipped.
MASKED_MAX_CLIENTS = 100
MASKED_FEATURES = ("secure_masked", "ddp_masked")
TIMED_ROUNDS = {10: 5, 100: 4, 1000: 3, LARGE: 4}


def process_for(feature: str, n_clients: int):
    """(train section, build kwargs) of one feature."""
    from engine_bench import BATCH, CLIENT_LR, SERVER_LR

    from tff_apps.config import TrainSection
    from tff_apps.privacy import secure_settings
    from tff_apps.privacy.dp_config import PrivacySection

    train = TrainSection(
        batch_size=BATCH, local_epochs=1, client_learning_rate=CLIENT_LR, server_learning_rate=SERVER_LR, engine="grouped"
    )
    if feature == "fedprox":
        return dataclasses.replace(train, algorithm="fedprox", proximal_strength=0.1), {}
    if feature.startswith("server_"):  # Reddi et al.'s adaptive server optimizers
        return dataclasses.replace(train, server_optimizer=feature.removeprefix("server_"), server_learning_rate=0.01), {}
    if feature == "dp_record":  # DP-SGD at every client (grouped_dp_sgd.py): per-example clipping and noise
        section = PrivacySection(level="record", clip_norm=1.0)
        return train, {"privacy": types.SimpleNamespace(level="record", section=section, noise_multiplier=1.0)}
    if feature.startswith("ddp_"):  # distributed DP (grouped_ddp.py): TFF's DistributedDpSumFactory, z = 1
        from engine_bench import EXAMPLES

        section = PrivacySection(level="client", clipping="fixed", clip_norm=1.0, noise_multiplier=1.0,
                                 secure_aggregation=feature.removeprefix("ddp_"))
        plan = types.SimpleNamespace(
            level="client", section=section, noise_multiplier=1.0, sampling=types.SimpleNamespace(participants=n_clients)
        )
        secure = secure_settings.secure_aggregation(section, train, {f"c{i}": EXAMPLES for i in range(n_clients)})
        return train, {"privacy": types.SimpleNamespace(plan=plan, secure=secure), "secure": secure}
    if feature.startswith("dp_"):
        section = PrivacySection(level="client", clipping=feature.removeprefix("dp_"), clip_norm=1.0)
        plan = types.SimpleNamespace(
            level="client", section=section, noise_multiplier=1.0, sampling=types.SimpleNamespace(participants=n_clients)
        )
        return train, {"privacy": plan}
    if feature in ROBUST_FEATURES:
        return train, {"federation": federation_for(feature, n_clients), "client_names": [f"c{i}" for i in range(n_clients)]}
    if feature.startswith("secure_"):  # simulated (TFF's SecureSumFactory) or masked (Bonawitz, in Python)
        from engine_bench import EXAMPLES

        rows = {f"c{i}": EXAMPLES for i in range(n_clients)}
        section = PrivacySection(secure_aggregation=feature.removeprefix("secure_"))
        return train, {"secure": secure_settings.secure_aggregation(section, train, rows)}
    return train, {}


def federation_for(feature: str, n_clients: int):
    from tff_apps.learning.federation import CommunicationSection, Federation, RobustnessSection

    if feature in ("quantize", "hadamard", "dft"):
        return Federation(communication=CommunicationSection(compression=feature, bits=8))
    if feature == "scaled_update":
        bad = max(1, n_clients // 10)
        return Federation(robustness=RobustnessSection(bad_clients=bad, bad_client_mode="scaled_update"))
    return Federation(robustness=RobustnessSection(aggregation=feature, trim_fraction=0.2))


def measure(feature: str, n_clients: int, timed: int | None = None) -> dict:
    """One cell, in this process."""
    import tensorflow as tf

    from engine_bench import FEATURES as N_FEATURES
    from engine_bench import HIDDEN, PeakRss, build_limit, mb, permuted_arrays, round_inputs, synthetic_clients
    from healthcare.model import ModelConfig, tff_model_fn
    from tff_apps.learning import factory
    from tff_apps.program.round_loop import next_round

    train, kwargs = process_for(feature, n_clients)
    timed = timed or TIMED_ROUNDS[n_clients]
    with PeakRss(os.getpid()) as peak, runtime_for(feature):
        # the limit's eager Keras model is built after the process's graph-mode ones (Keras 2.14
        # swaps its classes to the mode of the latest build: traffic/app.py `train_and_evaluate`)
        if feature in MODEL_FEATURES:
            model_fn, build_round, clients = traffic_model(feature.removeprefix("traffic_"), n_clients)
        else:
            model_cfg = ModelConfig(kind="mlp", hidden_units=HIDDEN)
            clients = synthetic_clients(n_clients)
            model_fn, build_round = tff_model_fn(model_cfg, N_FEATURES, 0), lambda: build_limit(model_cfg, clients)
        process = factory.build_learning_process(train, model_fn, **kwargs)
        round_fn, start = build_round()
        state, limit_state, times = process.initialize(), start, {"grouped": [], "limit": []}
        for r in range(timed + 1):  # each round's inputs made untimed, and dropped after it (peak RSS)
            inputs = (poisson_round_inputs if feature == "dp_record" else round_inputs)(clients, train, r)
            x, y = permuted_arrays(clients, train, r)
            started = time.perf_counter()
            state = next_round(process, state, inputs, [c.name for c in clients]).state
            grouped_s = time.perf_counter() - started
            started = time.perf_counter()
            limit_state = [w.numpy() for w in round_fn(limit_state, tf.constant(x), tf.constant(y))]
            if r:  # round 0 warms up (tracing, the worker's compile)
                times["grouped"].append(grouped_s)
                times["limit"].append(time.perf_counter() - started)
    grouped, limit = statistics.median(times["grouped"]), statistics.median(times["limit"])
    return {
        "feature": feature, "clients": n_clients, "grouped_s": grouped, "limit_s": limit,
        "ratio": grouped / limit, "peak_rss_mb": mb(peak.peak), "engine": factory.engine_of(process),
    }


@contextlib.contextmanager
def runtime_for(feature: str):
    """The TFF runtime of a cell: one worker of its own, or for workers_2 two loopback workers
    (`tff-apps run --workers`: each trains one contiguous slice of the round's clients)."""
    from tff_apps.runtime.context import Runtime

    if feature != "workers_2":
        with Runtime():
            yield
        return
    from workers_bench import loopback_workers

    with loopback_workers(2) as addresses, Runtime(workers=addresses):
        yield


def traffic_model(kind: str, n_clients: int):
    """(TFF model function, a builder of the limit's (round_fn, start), clients) of traffic's `kind` on
    synthetic windows (module docstring); a quarter of the targets missing."""
    import numpy as np

    from engine_bench import EXAMPLES, plain_round
    from tff_apps.learning.client_data import ClientTrainData
    from traffic.model import GRAPH_KINDS, ModelConfig, build_keras_model, masked_mae, tff_model_fn
    from traffic.windows import N_FEATURES

    history, horizon, nodes = 12, 12, 4 if kind in GRAPH_KINDS else 0
    rng = np.random.default_rng(n_clients)
    clients = []
    for i in range(n_clients):
        if nodes:  # a district's windows, typical speeds and graph rows (traffic/graph_model.py)
            graph = rng.random((EXAMPLES, nodes, nodes)) * (rng.random((EXAMPLES, nodes, nodes)) < 0.5)
            x = np.concatenate([rng.standard_normal((EXAMPLES, nodes, history * N_FEATURES + history + horizon)), graph], -1)
            y = rng.standard_normal((EXAMPLES, nodes, horizon))
        else:
            x, y = rng.standard_normal((EXAMPLES, history, N_FEATURES)), rng.standard_normal((EXAMPLES, horizon))
        y[rng.random(y.shape) < 0.25] = np.nan
        clients.append(ClientTrainData(f"c{i}", x.astype(np.float32), y.astype(np.float32)))
    cfg = ModelConfig(kind=kind, hidden_units=32)
    limit = lambda: plain_round(build_keras_model(cfg, history, N_FEATURES, horizon, 0, nodes), masked_mae)  # noqa: E731
    return tff_model_fn(cfg, history, N_FEATURES, horizon, 0, nodes), limit, clients


def poisson_round_inputs(clients, train, round_number: int) -> list:
    """DP-SGD's round inputs (`dp_sgd.poisson_client_dataset`), seeded as `engine_bench.round_inputs`."""
    from tff_apps.learning import client_data, dp_sgd

    return [
        dp_sgd.poisson_client_dataset(c, train, client_data.round_seed(0, round_number, i)) for i, c in enumerate(clients)
    ]


def markdown(rows: list[dict], machine: str) -> str:
    out = [
        "# Grouped engine per feature", "", f"Machine: {machine}", "",
        "Median seconds per round (one process per row, after a warm-up round). Limit: the plain FedAvg "
        "round in one tf.function (benchmarks/engine_bench.py); ratio = grouped / limit.", "",
        "| feature | clients per round | grouped s | limit s | ratio | peak RSS MB |", "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['feature']} | {r['clients']} | error: {r['error']} ||||")
            continue
        out.append(
            f"| {r['feature']} | {r['clients']} | {r['grouped_s']:.3f} | {r['limit_s']:.3f} | {r['ratio']:.2f}x | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", nargs=2, help=argparse.SUPPRESS)  # child: feature, clients
    parser.add_argument("--clients", type=int, nargs="*", default=list(CLIENT_COUNTS))
    parser.add_argument("--features", nargs="*", default=list(FEATURES + ROBUST_FEATURES + MODEL_FEATURES))
    parser.add_argument("--large", action=argparse.BooleanOptionalAction, default=True, help="the 10,000-client row")
    parser.add_argument("--timed", type=int, default=0, help="timed rounds per cell (0: TIMED_ROUNDS)")
    parser.add_argument("--out", type=Path, default=RESULTS_MD)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(measure(args.cell[0], int(args.cell[1]), args.timed or None)))
        return
    from engine_bench import machine

    cells = [(f, n) for f in args.features for n in args.clients if f not in MASKED_FEATURES or n <= MASKED_MAX_CLIENTS]
    cells += [("mean", LARGE)] if args.large else []
    rows = []
    for feature, n in cells:
        done = subprocess.run(
            [sys.executable, __file__, "--cell", feature, str(n), "--timed", str(args.timed)],
            cwd=ROOT, capture_output=True, text=True,
        )
        if done.returncode != 0:
            rows.append({"feature": feature, "clients": n, "error": done.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{feature}, {n} clients: done", file=sys.stderr, flush=True)
    text = markdown(rows, machine())
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
