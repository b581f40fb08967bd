"""One job from config to summary: the part of a run that every app shares.

Order matters for the house rules: the config is resolved and the app loads and
validates its data BEFORE the run folder exists, so a user mistake leaves nothing
behind. Training runs inside a `Runtime`, which owns TFF's worker process.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, Sequence

from shared.errors import UserError
from tff_apps import config as config_lib
from tff_apps import private_run
from shared.files import write_json_atomic, write_text_atomic
from tff_apps.registry import load_app

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class App(Protocol):
    """What the engine calls. Each app's `app.py` provides one as `APP`."""

    name: str
    description: str
    default_config: Path
    sections: dict[str, type]  # the app's own config sections: "data" and "model"

    def prepare(self, cfg: config_lib.JobConfig) -> Any:
        """Loads and validates the data (raises UserError); no output is written yet."""

    def train(self, cfg: config_lib.JobConfig, prepared: Any, run: "Run") -> dict[str, Any]:
        """Trains, evaluates, exports into `run.dir`; returns the summary's app part.

        Passes `run.privacy` to `processes.build_learning_process` and `program.run_rounds`.
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
    return app, cfg.replace("job", app=app.name)


def new_run(app: App, cfg: config_lib.JobConfig) -> Run:
    run_id = cfg.job.run_id or datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    if not RUN_ID_PATTERN.match(run_id):
        raise UserError(
            f"job.run_id = {run_id!r}: use letters, digits, '.', '_' or '-' (at most 128 characters)"
        )
    run_dir = Path(cfg.job.runs_dir) / app.name / run_id
    if run_dir.exists():
        raise UserError(f"run folder {run_dir} already exists; choose another --run-id")
    return Run(app.name, run_id, run_dir, cfg.replace("job", run_id=run_id))


def data_fingerprint(fingerprints: Sequence[str]) -> str:
    """One hash over the sites' own hashes: identifies the data without revealing it."""
    return hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()


def run_job(app: App, cfg: config_lib.JobConfig) -> tuple[Run, dict[str, Any]]:
    prepared = app.prepare(cfg)
    run = new_run(app, cfg)
    # The privacy plan and the lifetime-budget reservation come before the run folder: a
    # refused run (bad target, budget exhausted) leaves nothing behind.
    run.privacy = private_run.start(app, run.config, prepared, run.run_id)
    try:
        return _run_prepared(app, prepared, run)
    finally:
        if run.privacy is not None:
            run.privacy.finish()  # releases a reservation if no round ran (idempotent)


def _run_prepared(app: App, prepared: Any, run: Run) -> tuple[Run, dict[str, Any]]:
    from tff_apps.runtime import Runtime  # TF and TFF load only once the inputs are valid

    run.dir.mkdir(parents=True)
    write_text_atomic(run.dir / "config.toml", run.config.to_toml())
    log_handler = _attach_log_file(run.dir / "run.log")
    started = time.time()
    summary: dict[str, Any] = {"app": app.name, "run_id": run.run_id, "status": "running"}
    try:
        with Runtime(log_path=run.dir / "worker.log") as runtime:
            summary.update(app.train(run.config, prepared, run))
            summary["secure_sum"] = "simulated" if runtime.simulated_secure_sum else "not used"
        summary["status"] = "succeeded"
        return run, summary
    except BaseException as err:
        summary["status"] = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        summary["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        if run.privacy is not None:
            run.privacy.finish()  # commit the spend that actually ran, failed run or not
            summary["privacy"] = run.privacy.statement()
        summary["started"] = _iso(started)
        summary["seconds"] = round(time.time() - started, 3)
        summary["config"] = run.config.to_dict()
        write_json_atomic(run.dir / "summary.json", summary)
        logging.getLogger().removeHandler(log_handler)
        log_handler.close()


def _attach_log_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")
