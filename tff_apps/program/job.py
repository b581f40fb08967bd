"""One job from config to summary: the part of a run that every app shares.

Order matters for the house rules: the config is resolved and the app loads and
validates its data BEFORE the run folder exists, so a user mistake leaves nothing
behind. Training runs inside a `Runtime`, which owns TFF's worker process.

Run ids are idempotent: a run id whose folder says `succeeded` is not trained again; a
failed, interrupted or killed one is resumed (from its last checkpoint, see
`round_loop.run_rounds`) with the config saved in its folder. One process at a time holds
a run id (`runs.RunLock`), and every run is recorded in the registry (`runs.Registry`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, Sequence

from shared.errors import UserError
from tff_apps import config as config_lib
from tff_apps.learning import federation
from tff_apps.privacy import private_run
from tff_apps.privacy import secure_settings
from tff_apps.program import runs
from shared.files import write_json_atomic, write_text_atomic
from tff_apps.registry import load_app
from tff_apps.runtime.worker import raise_system_exit

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class App(Protocol):
    """What the engine calls. Each app's `app.py` provides one as `APP`."""

    name: str
    description: str
    default_config: Path
    sections: dict[str, type]  # the app's own config sections: "data" and "model"
    horizontal: bool  # clients hold rows of one table: [communication], [clients], ... apply

    def prepare(self, cfg: config_lib.JobConfig) -> Any:
        """Loads and validates the data (raises UserError); no output is written yet."""

    def train(self, cfg: config_lib.JobConfig, prepared: Any, run: "Run") -> dict[str, Any]:
        """Trains, evaluates, exports into `run.dir`; returns the summary's app part.

        Passes `run.privacy` to `factory.build_learning_process` and `round_loop.run_rounds`.
        """

    # For [privacy] (horizontal apps): the clients' training example counts, by client name
    # as the program will see them, and the data fingerprint that keys the lifetime ledger.
    def client_rows(self, cfg: config_lib.JobConfig, prepared: Any) -> dict[str, int]: ...

    def fingerprint(self, prepared: Any) -> str: ...


@dataclass
class Run:
    app: str
    run_id: str
    dir: Path
    config: config_lib.JobConfig
    privacy: Any = None  # a tff_apps.private_run.RunPrivacy when privacy.level is not "none"
    resumed: bool = False  # the folder existed: a failed, interrupted or killed attempt continues
    already_finished: bool = False  # the run id had succeeded: nothing was done
    init_from: Any = None  # an InitFrom when job.init_from is set (warm start)

    @property
    def export_dir(self) -> Path:
        return self.dir / "export"


def resolve_job(
    app_name: str | None, config_file: str | None, overrides: Sequence[str]
) -> tuple[App, config_lib.JobConfig]:
    """Finds the app (argument, else `job.app` in the job file) and resolves its config."""
    if app_name is None:
        if config_file is None:
            raise UserError("run: name an app (tff-apps run healthcare) or give --config JOB.toml")
        job_table = config_lib.read_toml(config_file, "job file").get("job", {})
        if not isinstance(job_table, dict):
            raise UserError(f"job file {config_file}: 'job' must be a [job] table with app = \"NAME\"")
        app_name = job_table.get("app", "")
        if not app_name:
            raise UserError(f"job file {config_file}: set job.app or name the app on the command line")
    app = load_app(app_name)
    cfg = config_lib.resolve(app.default_config, app.sections, config_file, overrides)
    if cfg.job.app and cfg.job.app != app.name:
        raise UserError(f"config: job.app = {cfg.job.app!r} but the command runs app {app.name!r}")
    if cfg.job.sites:
        cfg = with_sites(cfg, cfg.job.sites)
    return app, cfg.replace("job", app=app.name)


def with_sites(cfg: config_lib.JobConfig, sites: str) -> config_lib.JobConfig:
    """The job across the sites of `sites` (a sites.toml): each site trains its own client on its
    own worker, so `train.engine = "auto"` means stock TFF there."""
    cfg = cfg.replace("job", sites=sites)
    return cfg.replace("train", engine="tff") if cfg.train.engine == "auto" else cfg


def new_run(app: App, cfg: config_lib.JobConfig) -> Run:
    run_id = cfg.job.run_id or datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    if not RUN_ID_PATTERN.match(run_id):
        raise UserError(
            f"job.run_id = {run_id!r}: use letters, digits, '.', '_' or '-' (at most 128 characters)"
        )
    run_dir = Path(cfg.job.runs_dir) / app.name / run_id
    return Run(app.name, run_id, run_dir, cfg.replace("job", run_id=run_id))


# Keys that may differ between a run's saved config.toml and the job that resumes it: they
# name where the folder is and describe it, and change nothing the run computes.
RESUME_IGNORES = frozenset({"job.runs_dir", "job.description"})


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`section.key` names whose values differ (RESUME_IGNORES aside), sorted."""
    differing = []
    for section in sorted(set(saved) | set(current)):
        left, right = saved.get(section, {}), current.get(section, {})
        if not isinstance(left, dict) or not isinstance(right, dict):
            differing.append(section)
            continue
        for key in sorted(set(left) | set(right)):
            name = f"{section}.{key}"
            if name not in RESUME_IGNORES and left.get(key) != right.get(key):
                differing.append(name)
    return differing


def existing_summary(run: Run, resume: bool = False) -> dict[str, Any] | None:
    """An existing run folder's summary ({} when the attempt was killed before writing one),
    or None when the run id is new. Raises UserError if the folder is not this job's run."""
    config_file = run.dir / "config.toml"
    if not run.dir.exists():
        if resume:
            raise UserError(f"--resume: run folder {run.dir} does not exist; nothing to resume")
        return None
    if not config_file.is_file():
        raise UserError(f"run folder {run.dir} exists but holds no config.toml (not a run); choose another --run-id")
    saved = config_lib.read_toml(config_file, "run config")
    differing = config_differences(saved, tomllib.loads(run.config.to_toml()))
    if differing:
        shown = ", ".join(
            f"{name} (run: {_lookup(saved, name)!r}, now: {_lookup(run.config.to_dict(), name)!r})"
            for name in differing[:5]
        )
        more = f" and {len(differing) - 5} more" if len(differing) > 5 else ""
        raise UserError(
            f"run {run.app}/{run.run_id} was started with another config: {shown}{more}; rerun it with "
            f"--config {config_file}, or choose another --run-id"
        )
    try:
        summary = json.loads((run.dir / "summary.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # unreadable: treated as an attempt that did not finish
    return summary if isinstance(summary, dict) else {}


def _lookup(table: dict[str, Any], name: str) -> Any:
    section, _, key = name.partition(".")
    return table.get(section, {}).get(key) if key else table.get(section)


@dataclass
class InitFrom:
    """`job.init_from`, resolved: the parent's servable version folder (with weights.npz)."""

    source: str  # the parent's run id, or the export path as given
    model_dir: Path
    parent_data_fingerprint: str | None

    def lineage(self) -> dict[str, Any]:
        return {
            "init_from": self.source,
            "parent_export": str(self.model_dir),
            "parent_data_fingerprint": self.parent_data_fingerprint,
        }


def resolve_init_from(run: Run) -> InitFrom | None:
    """"" -> None; "latest" -> the newest succeeded run of this app in runs_dir (not this one)
    whose export exists; else an export path. UserError if there is none or it cannot warm-start."""
    wanted = run.config.job.init_from.strip()
    if not wanted:
        return None
    from tff_apps.program.predict import resolve_export  # loads TF: only once the job is known to be valid

    if wanted == "latest":
        for record in runs.list_runs(run.config.job.runs_dir, run.app):
            if record.status == "succeeded" and record.run_id != run.run_id:
                model_dir = resolve_export(Path(record.run_dir) / "export")
                if (model_dir / "weights.npz").is_file():
                    return _init_from(record.run_id, model_dir, run)
        raise UserError(
            f"job.init_from = 'latest': no succeeded {run.app} run with an export in {run.config.job.runs_dir}; "
            "run one first or set job.init_from to an export path"
        )
    model_dir = resolve_export(Path(wanted))
    if not (model_dir / "weights.npz").is_file():
        raise UserError(
            f"job.init_from = {wanted!r}: not the export of a {run.app} run with its weights (no weights.npz); "
            "give a run's export folder or 'latest'"
        )
    return _init_from(wanted, model_dir, run)


def _init_from(source: str, model_dir: Path, run: Run) -> InitFrom:
    try:
        card = json.loads((model_dir / "model_card.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"job.init_from = {source!r}: {model_dir}/model_card.json is missing or not JSON") from None
    if card.get("app") != run.app:
        raise UserError(
            f"job.init_from = {source!r}: {model_dir} is a {card.get('app')!r} model; this job runs {run.app!r}"
        )
    return InitFrom(source, model_dir, card.get("data_fingerprint"))


def data_fingerprint(fingerprints: Sequence[str]) -> str:
    """One hash over the sites' own hashes: identifies the data without revealing it."""
    return hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()


def run_job(
    app: App, cfg: config_lib.JobConfig, resume: bool = False, workers: Sequence[str] = ()
) -> tuple[Run, dict[str, Any]]:
    """Runs the job, resumes its run id, or (run id succeeded already) returns its summary
    with `run.already_finished`. `resume`: the run folder must exist. `workers`: running TFF
    workers ("host:port") to spread each round's clients over, instead of a local worker."""
    if resume and not cfg.job.run_id:
        raise UserError("--resume: name the run to continue with --run-id (or job.run_id)")
    run = new_run(app, cfg)
    previous = existing_summary(run, resume)
    if previous is not None and previous.get("status") == "succeeded":
        run.already_finished = True  # checked again under the lock below
        return run, previous
    workers = site_workers(app, run.config, workers)
    prepared = app.prepare(run.config)
    horizontal = getattr(app, "horizontal", False)
    federation.check(run.config, app.client_rows(run.config, prepared) if horizontal else None)
    run.init_from = resolve_init_from(run)
    registry = runs.Registry(run.config.job.runs_dir)
    label = f"{app.name}/{run.run_id}"
    with _sigterm_as_exit(), runs.RunLock(run.dir, label) as lock:
        previous = existing_summary(run, resume)  # another process may have finished it meanwhile
        if previous is not None and previous.get("status") == "succeeded":
            run.already_finished = True
            return run, previous
        run.resumed = previous is not None
        # The privacy plan and the lifetime-budget reservation come before the run folder: a
        # refused run (bad target, budget exhausted) leaves nothing behind. A resumed run
        # reopens its own ledger row instead of adding one.
        try:
            run.privacy = private_run.start(app, run.config, prepared, run.run_id, resume=run.resumed)
        except UserError as err:
            registry.ended(app.name, run.run_id, run.dir, "refused", error=str(err))
            raise
        try:
            return _run_prepared(app, prepared, run, registry, lock, workers)
        finally:
            if run.privacy is not None:
                run.privacy.finish()  # releases a reservation if no round ran (idempotent)


def _runtime(run: Run, workers: Sequence[str]):
    """The job's TFF runtime: a local worker, `--workers`, or the sites (`job.sites`)."""
    from tff_apps.runtime.context import Runtime

    if not run.config.job.sites:
        return Runtime(log_path=run.dir / "worker.log", workers=workers)
    from tff_apps.sites.connect import site_runtime, site_spends
    from tff_apps.sites.sites_config import load_sites

    sites = load_sites(run.config.job.sites)
    plan = run.privacy.plan if run.privacy is not None else None
    return site_runtime(
        run.config, sites, plan.epsilon() if plan else None, log_path=run.dir / "worker.log", spends=site_spends(plan, sites)
    )


def site_workers(app: App, cfg: config_lib.JobConfig, workers: Sequence[str]) -> Sequence[str]:
    """With `job.sites`: the sites' addresses, one TFF worker per site, in the file's order."""
    if not cfg.job.sites:
        return workers
    if workers:
        raise UserError("--workers and job.sites (--sites) both place the clients; give one of them")
    if not getattr(app, "supports_sites", False):
        raise UserError(f"job.sites: app {app.name!r} does not run across sites yet; run it as a simulation")
    from tff_apps.sites.sites_config import load_sites

    return tuple(site.address for site in load_sites(cfg.job.sites))


@contextlib.contextmanager
def _sigterm_as_exit():
    """SIGTERM unwinds (SystemExit) so that the lock is released; the Runtime does the same
    for its worker while it runs. Only the main thread can set signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_system_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _create_run_folder(run: Run) -> None:
    """The folder appears with its config.toml or not at all (temporary folder, renamed)."""
    for leftover in run.dir.parent.glob(f".{run.run_id}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)  # of an attempt killed right here
    temporary = run.dir.with_name(f".{run.run_id}.tmp-{os.getpid()}")
    temporary.mkdir(parents=True)
    write_text_atomic(temporary / "config.toml", run.config.to_toml())
    os.rename(temporary, run.dir)


def _run_prepared(
    app: App, prepared: Any, run: Run, registry: runs.Registry, lock: runs.RunLock, workers: Sequence[str] = ()
) -> tuple[Run, dict[str, Any]]:

    if not run.resumed:
        _create_run_folder(run)
    log_handler = _attach_log_file(run.dir / "run.log")
    engine_log = logging.getLogger("tff_apps")
    engine_level = engine_log.level
    engine_log.setLevel(logging.INFO)  # the engine's progress notes go to run.log
    if lock.took_over is not None:
        logging.getLogger(__name__).warning(
            "took over the stale lock of pid %s on %s (started %s)",
            lock.took_over.get("pid", "?"), lock.took_over.get("host", "?"), lock.took_over.get("started", "?"),
        )
    if run.privacy is not None and run.privacy.warning:
        logging.getLogger(__name__).warning(run.privacy.warning)
    if run.resumed:
        logging.getLogger(__name__).info("resuming run %s/%s in %s", run.app, run.run_id, run.dir)
    started = time.time()
    summary: dict[str, Any] = {"app": app.name, "run_id": run.run_id, "status": "running"}
    if run.resumed:
        summary["resumed"] = True
    try:
        registry.started(app.name, run.run_id, run.dir)
        if workers:
            summary["workers"] = list(workers)
        with _runtime(run, workers) as runtime:
            summary.update(app.train(run.config, prepared, run))
            summary["secure_sum"] = secure_settings.secure_sum_summary(run.config.privacy, runtime.simulated_secure_sum)
            if getattr(runtime, "site_budgets", None):  # what each site's own ledger has left
                summary["site_budgets"] = dict(runtime.site_budgets)
        summary["status"] = "succeeded"
        return run, summary
    except BaseException as err:
        interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))
        summary["status"] = "interrupted" if interrupted else "failed"
        summary["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        if run.privacy is not None:
            run.privacy.finish()  # commit the spend that actually ran, failed run or not
            summary["privacy"] = run.privacy.statement()
        summary["started"] = _iso(started)
        summary["seconds"] = round(time.time() - started, 3)
        summary["config"] = summary_config(app, run.config)
        write_json_atomic(run.dir / "summary.json", summary)
        try:
            _record_end(registry, run, summary)
        finally:
            engine_log.setLevel(engine_level)
            logging.getLogger().removeHandler(log_handler)
            log_handler.close()


def summary_config(app: App, cfg: config_lib.JobConfig) -> dict[str, Any]:
    """The config as summary.json shows it: an app whose parties keep parts of it private
    (finance: each party's columns) gives its `public_config`."""
    public = getattr(app, "public_config", None)
    return public(cfg) if public is not None else cfg.to_dict()


def _record_end(registry: runs.Registry, run: Run, summary: dict[str, Any]) -> None:
    privacy_statement = summary.get("privacy")
    epsilon = privacy_statement.get("epsilon") if isinstance(privacy_statement, dict) else None
    rounds = summary.get("rounds")
    if not isinstance(rounds, int):
        rounds = _rounds_in_metrics(run.dir)
    headline = summary.get("headline")
    registry.ended(
        run.app, run.run_id, run.dir, summary["status"],
        rounds=rounds,
        headline=headline if isinstance(headline, str) else None,
        headline_value=_headline_value(summary, run.dir),
        epsilon=epsilon if isinstance(epsilon, (int, float)) else None,
        error=summary.get("error"),
    )


def _rounds_in_metrics(run_dir: Path) -> int | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _headline_value(summary: dict[str, Any], run_dir: Path) -> float | None:
    """The headline metric of the federated model: the summary's `headline_value`, its
    federated results (pooled or overall), else the last round that evaluated it."""
    name = summary.get("headline")
    if not isinstance(name, str):
        return None
    if isinstance(summary.get("headline_value"), (int, float)):
        return float(summary["headline_value"])
    federated = summary.get("results", {}).get("federated", {}) if isinstance(summary.get("results"), dict) else {}
    for group in ("pooled", "overall"):
        values = federated.get(group) if isinstance(federated, dict) else None
        if isinstance(values, dict):
            for key in (name, name.removeprefix("test_")):
                if isinstance(values.get(key), (int, float)):
                    return float(values[key])
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in reversed(path.read_text(encoding="utf-8").splitlines()):
            try:
                value = json.loads(line).get(name)
            except (ValueError, AttributeError):
                continue
            if isinstance(value, (int, float)):
                return float(value)
    return None


def _attach_log_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")
