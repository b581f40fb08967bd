"""`tff-apps demo --sites`: loopback sites with test certificates (three hospitals or road
districts; finance: the lender and its partner), each app that runs across sites trained
across them, then the sites stopped.

Each site is a real `tff-apps site serve` process (its worker in a private network
namespace when this machine allows it, else on loopback with `--isolation none`) holding the
data folder that `site prepare` made of one hospital of the app's embedded data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import portpicker

from shared.errors import UserError
from tff_apps.sites.certs import make_test_pki
from tff_apps.sites.prepare import prepare_site

N_SITES = 3
READY_TIMEOUT_S = 60


@contextmanager
def loopback_sites(app, cfg, base: Path):
    """Prepares and serves one site per client of `cfg` (N_SITES of them); yields the path of
    a sites.toml naming them; stops every site on the way out."""
    names = _prepare_folders(app, cfg, base)
    make_test_pki(base / "certs", names)
    served = []
    try:
        for name in names:
            served.append(_serve(base, name))
        sites = base / "sites.toml"
        sites.write_text("".join(
            f'[[site]]\nname = "{name}"\naddress = "127.0.0.1:{port}"\ndata = "{base / name}"\n'
            'ca = "certs/ca.pem"\ncert = "certs/coordinator.pem"\nkey = "certs/coordinator.key"\n\n'
            for name, (_, port) in zip(names, served)
        ))
        yield sites
    finally:
        for process, _ in served:
            _stop(process)


def _prepare_folders(app, cfg, base: Path) -> list[str]:
    """Each site's data folder under `base`; returns the site names. An app whose sites are not
    its clients (finance: one site per party) makes its own (`site_demo_folders`)."""
    make_own = getattr(app, "site_demo_folders", None)
    if make_own is not None:
        return make_own(cfg, base)
    data = app.prepare(cfg).data  # one site per client of the embedded data: hospitals, road districts
    names = [client.name for client in getattr(data, "clients", None) or data.districts]
    for name in names:
        prepare_site(app, cfg, base / name, name)
    return names


def _serve(base: Path, name: str) -> tuple[subprocess.Popen, int]:
    port = portpicker.pick_unused_port()
    isolation = "netns" if os.geteuid() == 0 else "none"
    process = subprocess.Popen(
        [sys.executable, "-m", "tff_apps.cli", "site", "serve", "--data", str(base / name), "--port", str(port),
         "--certs", str(base / "certs"), "--name", name, "--audit", str(base / f"{name}-audit.jsonl"),
         "--host", "127.0.0.1", "--isolation", isolation, "--log", str(base / f"{name}.log")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    line = process.stdout.readline()  # "site NAME listening on ..." once it accepts calls
    if "listening on" not in line:
        _stop(process)
        raise UserError(f"demo --sites: site {name} did not start: {line.strip() or process.stdout.read().strip()}")
    print(f"[demo] {line.strip()}", flush=True)
    return process, port


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def site_demo(apps, runs_dir: str, overrides: list[str], run_and_print) -> list[tuple[str, str]]:
    """Runs each app that supports sites across three loopback sites."""
    from tff_apps.program.job import resolve_job, with_sites
    from tff_apps.registry import load_app

    reports = []
    for name in apps:
        smaller = list(getattr(load_app(name), "site_demo_overrides", ()))  # an app's lighter demo job, if any
        app, cfg = resolve_job(name, None, [f'job.runs_dir="{runs_dir}"', *smaller, *overrides])
        if not getattr(app, "supports_sites", False):
            print(f"[demo] {name}: does not run across sites yet; skipped", flush=True)
            continue
        try:  # an app that refuses the demo's overrides across sites (e.g. finance and masking) is skipped
            getattr(app, "check_sites", lambda _cfg: None)(cfg)
        except UserError as refused:
            print(f"[demo] {name}: skipped: {refused}", flush=True)
            continue
        cfg = cfg.replace("data", n_clients=N_SITES) if hasattr(cfg.data, "n_clients") else cfg
        with tempfile.TemporaryDirectory(prefix=f"tff-sites-{name}-") as folder, \
                loopback_sites(app, cfg, Path(folder)) as sites:
            summary = run_and_print(app, with_sites(cfg, str(sites)))
        if summary.get("masking"):  # privacy.secure_aggregation = "masked": say where it ran
            print(f"[demo] {name}: secure aggregation masked {summary['masking']['where']}", flush=True)
        reports.append((name, summary.get("report_html") or summary.get("report", "")))
    return reports
