"""Cost of training across sites: round time across 3 loopback sites against the same job in
simulation, and the share of it that the mutual-TLS gateways take.

Run with `make bench` or:  cd /work/main && uv run --locked python benchmarks/sites_bench.py

The healthcare job on breast cancer over 3 hospitals (`data.n_clients=3`), 20 rounds, no
baselines, run three ways, each a `tff-apps run` subprocess:
- simulation: one local TFF worker, the rows in the coordinator's process;
- sites, plain: three `tff-apps worker` processes on loopback, each with its site's data
  folder (`site prepare`), reached with plain gRPC;
- sites, TLS: three `tff-apps site serve` processes (worker in a private network namespace
  when run as root, behind the mutual-TLS gateway with its audit log).
The figure is the median of `round_seconds` in metrics.jsonl over rounds 3..20 (the first
rounds trace and compile); evaluation runs every 5 rounds and is included in those rounds.

Masked secure aggregation at the sites (`masked_rows`): at 3 and 10 loopback sites behind
their gateways (breast cancer cut into 3 or 10 hospitals), the same job plain and with `privacy.secure_aggregation = "masked"`, MASKED_ROUNDS rounds without
evaluation until the last: median round time of rounds 2.., and the bytes through the
gateways per training round (the audit logs' bytes in + out of the rounds' calls: every call
of the run minus those of a 1-round run of the same job).
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import portpicker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tff_apps.program.job import resolve_job  # noqa: E402
from tff_apps.sites.certs import make_test_pki  # noqa: E402
from tff_apps.sites.prepare import prepare_site  # noqa: E402

ROUNDS = 20
JOB = ["--set", "data.n_clients=3", "--set", f"train.rounds={ROUNDS}", "--set", "evaluate.centralized_baseline=false",
       "--set", "evaluate.local_baseline=false", "--set", "export.enabled=false"]


def start(command: list[str], ready: str, log: Path) -> subprocess.Popen:
    out = log.open("w")
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while not re.search(ready, log.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{command} did not start: {log.read_text()}")
        time.sleep(0.05)
    return process


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        process.wait(timeout=30)


def run(base: Path, run_id: str, *extra: str) -> list[float]:
    command = [sys.executable, "-m", "tff_apps.cli", "run", "healthcare", *JOB,
               "--set", f'job.runs_dir="{base / "runs"}"', "--run-id", run_id, *extra]
    subprocess.run(command, check=True, capture_output=True)
    lines = (base / "runs" / "healthcare" / run_id / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["round_seconds"] for line in lines]


def sites_file(base: Path, name: str, entries: list[tuple[str, int]], tls: bool) -> Path:
    certs = 'ca = "pki/ca.pem"\ncert = "pki/coordinator.pem"\nkey = "pki/coordinator.key"\n' if tls else ""
    path = base / name
    path.write_text("".join(
        f'[[site]]\nname = "{site}"\naddress = "127.0.0.1:{port}"\ndata = "{base / site}"\n{certs}\n'
        for site, port in entries
    ))
    return path


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="sites-bench-") as folder:
        base = Path(folder)
        app, cfg = resolve_job("healthcare", None, ["data.n_clients=3"])
        names = [client.name for client in app.prepare(cfg).data.clients]
        for name in names:
            prepare_site(app, cfg, base / name, name)
        make_test_pki(base / "pki", names)
        seconds = {"simulation": run(base, "simulation")}
        ports = [portpicker.pick_unused_port() for _ in names]
        workers = [start([sys.executable, "-m", "tff_apps.cli", "worker", "--port", str(p)], "listening", base / f"w{p}.log")
                   for p in ports]
        try:
            seconds["sites, plain gRPC"] = run(base, "plain", "--sites", str(sites_file(base, "plain.toml", list(zip(names, ports)), False)))
        finally:
            stop(workers)
        isolation = "netns" if os.geteuid() == 0 else "none"
        ports = [portpicker.pick_unused_port() for _ in names]
        sites = [start([sys.executable, "-m", "tff_apps.cli", "site", "serve", "--data", str(base / n), "--port", str(p),
                        "--certs", str(base / "pki"), "--name", n, "--audit", str(base / f"{n}.jsonl"),
                        "--host", "127.0.0.1", "--isolation", isolation], "listening", base / f"s{p}.log")
                 for n, p in zip(names, ports)]
        try:
            seconds[f"sites, mutual TLS ({isolation})"] = run(base, "tls", "--sites", str(sites_file(base, "tls.toml", list(zip(names, ports)), True)))
        finally:
            stop(sites)
    medians = {way: statistics.median(values[2:]) for way, values in seconds.items()}
    plain, tls = medians["sites, plain gRPC"], medians[f"sites, mutual TLS ({isolation})"]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; healthcare, 3 sites, rounds 3..{ROUNDS}")
    print(f"{'way':34s} {'median round s':>15s} {'vs simulation':>14s}")
    for way, median in medians.items():
        print(f"{way:34s} {median:15.3f} {median / medians['simulation']:13.2f}x")
    print(f"the TLS gateways' share of a round across sites: {max(tls - plain, 0.0) / tls:.1%}")


MASKED_ROUNDS = 6


def audit_bytes(base: Path, names: list[str], run_id: str) -> int:
    total = 0
    for name in names:
        for line in (base / f"{name}.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record.get("run_id") == run_id:
                total += record["bytes_in"] + record["bytes_out"]
    return total


def masked_rows(n_sites: int) -> dict[str, tuple[float, float]]:
    """mode -> (median round seconds, gateway bytes per round) at `n_sites` TLS sites."""
    with tempfile.TemporaryDirectory(prefix="sites-bench-masked-") as folder:
        base = Path(folder)
        data = [f"data.n_clients={n_sites}"]
        app, cfg = resolve_job("healthcare", None, data)
        names = [client.name for client in app.prepare(cfg).data.clients][:n_sites]
        for name in names:
            prepare_site(app, cfg, base / name, name)
        make_test_pki(base / "pki", names)
        ports = [portpicker.pick_unused_port() for _ in names]
        isolation = "netns" if os.geteuid() == 0 else "none"
        sites = [start([sys.executable, "-m", "tff_apps.cli", "site", "serve", "--data", str(base / n), "--port", str(p),
                        "--certs", str(base / "pki"), "--name", n, "--audit", str(base / f"{n}.jsonl"),
                        "--host", "127.0.0.1", "--isolation", isolation], "listening", base / f"s{p}.log")
                 for n, p in zip(names, ports)]
        toml = str(sites_file(base, "tls.toml", list(zip(names, ports)), True))
        rows = {}
        try:
            for mode in ("none", "masked"):
                job = ["--sites", toml, "--set", f"privacy.secure_aggregation={mode}", "--set", "export.enabled=false",
                       "--set", "privacy.secure_threshold=0.6", "--set", f"train.eval_every={MASKED_ROUNDS}",
                       "--set", "privacy.profiles=none", *sum((["--set", d] for d in data), [])]
                seconds = run(base, f"{mode}-{n_sites}", *job, "--set", f"train.rounds={MASKED_ROUNDS}")
                run(base, f"{mode}-{n_sites}-one", *job, "--set", "train.rounds=1")
                per_round = (audit_bytes(base, names, f"{mode}-{n_sites}") - audit_bytes(base, names, f"{mode}-{n_sites}-one"))
                rows["plain" if mode == "none" else "masked"] = (statistics.median(seconds[1:]), per_round / (MASKED_ROUNDS - 1))
        finally:
            stop(sites)
    return rows


def print_masked(n_sites: int, rows: dict[str, tuple[float, float]]) -> None:
    (plain_s, plain_b), (masked_s, masked_b) = rows["plain"], rows["masked"]
    print(f"{n_sites} sites, mutual TLS: plain {plain_s:.3f} s/round {plain_b / 1e3:.1f} kB/round; masked at the "
          f"sites {masked_s:.3f} s/round ({masked_s / plain_s:.2f}x) {masked_b / 1e3:.1f} kB/round "
          f"({masked_b / plain_b:.2f}x)", flush=True)


if __name__ == "__main__":
    if "--masked-only" not in sys.argv:
        main()
    for count in (3, 10):
        print_masked(count, masked_rows(count))
