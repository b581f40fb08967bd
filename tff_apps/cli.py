"""`tff-apps`: list apps, run or resume a job, list runs, score a CSV with an exported model, audit a run, run the demo, serve a TFF worker, print the configuration reference.

Exit codes: 0 success (also: the run id had already succeeded, nothing was done), 2 user
error (one line on stderr, no traceback; also a run id another live process holds), 3 refused by the
lifetime privacy budget (one line giving the spent and remaining budget), 1 internal
error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Sequence

from shared.errors import UserError
from tff_apps.privacy.ledger import BudgetExhausted
from tff_apps.sites.commands import SITE_COMMANDS, add_site_commands, command_site

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_BUDGET = 3


class _Parser(argparse.ArgumentParser):
    """argparse's own mistakes follow the house rule too: one line, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tff-apps", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser("apps", help="list the installed apps")

    run = commands.add_parser("run", help="run a training job")
    run.add_argument("app", nargs="?", help="app name (or set job.app in --config)")
    run.add_argument("--config", metavar="FILE", help="TOML job file, applied over the app's default.toml")
    run.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.rounds=10 (repeatable)",
    )
    run.add_argument(
        "--run-id",
        help="name of the run folder (default: a timestamp); a finished run id is not trained "
        "again, a failed or interrupted one resumes from its last checkpoint",
    )
    run.add_argument(
        "--resume", action="store_true",
        help="continue an existing run (its folder must exist) from its last checkpoint",
    )
    run.add_argument(
        "--workers", metavar="HOST:PORT,...",
        help="running TFF workers (tff-apps worker) to spread each round's clients over, "
        "e.g. --workers 127.0.0.1:8001,127.0.0.1:8002 (default: one local worker)",
    )
    run.add_argument(
        "--sites", metavar="SITES.toml",
        help="train across sites (each holds its own data; docs/sites.md): sets job.sites",
    )

    worker = commands.add_parser(
        "worker", help="run one TFF worker (the C++ worker_binary) in the foreground until SIGTERM/Ctrl-C"
    )
    worker.add_argument("--port", type=int, required=True, help="port to serve on (all interfaces, no TLS)")
    worker.add_argument("--host", default="127.0.0.1", help="the address to announce (default: 127.0.0.1)")
    worker.add_argument("--log", metavar="FILE", help="append the worker's own output to FILE")

    runs = commands.add_parser("runs", help="list the runs and how they ended (newest first)")
    runs.add_argument("--runs-dir", default="runs", help="the runs folder (default: runs)")
    runs.add_argument("--app", help="only this app's runs")

    predict = commands.add_parser("predict", help="score a CSV of raw rows with an exported model")
    predict.add_argument("model_dir", help="an export folder (runs/<app>/<run_id>/export)")
    predict.add_argument("--input", required=True, metavar="CSV")
    predict.add_argument("--output", required=True, metavar="CSV")

    score = commands.add_parser(
        "score", help="vertical inference: score customers from one CSV per party with a split model's export"
    )
    score.add_argument("model_dir", help="a vertical run's export folder (runs/finance/<run_id>/export)")
    score.add_argument(
        "--input", dest="inputs", action="append", default=[], required=True, metavar="PARTY=CSV",
        help="one party's CSV, keyed by customer ID, e.g. --input lender=a.csv --input partner=b.csv",
    )
    score.add_argument("--output", required=True, metavar="CSV")
    score.add_argument("--id-column", default="", help="the ID column of both CSVs (default: the job's)")
    score.add_argument("--sites", metavar="SITES.toml",
                       help="score at the parties' sites: MODEL_DIR is then the run id, each CSV and --output "
                            "a path at its party's site (the output at the lender's)")

    audit = commands.add_parser(
        "audit", help="membership-inference audit of a finished run's exported model"
    )
    audit.add_argument("run_dir", help="a run folder (runs/<app>/<run_id>) with an export")

    demo = commands.add_parser("demo", help="run every app on its embedded default data")
    demo.add_argument("--runs-dir", default="runs", help="where the demo runs go (default: runs)")
    demo.add_argument("--sites", action="store_true",
                      help="start three loopback sites with test certificates and train across them")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override one config key in every app's job (repeatable)")

    config = commands.add_parser("config", help="print the configuration reference (docs/configuration.md)")
    config.add_argument(
        "--docs", action="store_true", required=True,
        help="print every job key as markdown, generated from the config dataclasses",
    )
    add_site_prepare(add_site_commands(commands))
    return parser


def add_site_prepare(site_commands) -> None:
    prepare = site_commands.add_parser(
        "prepare", help="at a site: encode the site's own files into its data folder for `site serve`"
    )
    prepare.add_argument("app", help="the app whose loaders read the files (healthcare, traffic)")
    prepare.add_argument("--config", metavar="SITE.toml", help="a job file whose [data] names the site's files")
    prepare.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override one config key (repeatable)")
    prepare.add_argument("--out", required=True, metavar="DIR", help="the data folder to create (must not exist)")
    prepare.add_argument("--site", default="", help="the site's name when the data holds several (e.g. a generator)")


def command_site_prepare(args) -> None:
    from tff_apps.program.job import resolve_job
    from tff_apps.sites.prepare import prepare_site

    app, cfg = resolve_job(args.app, args.config, args.overrides)
    manifest = prepare_site(app, cfg, args.out, args.site)
    rows = ", ".join(f"{count} {kind}" for kind, count in manifest["rows"].items())
    print(f"[{app.name}] site {manifest['site']}: {rows} in {args.out}")
    if "schema_fingerprint" in manifest:  # a vertical party's columns are its own: no schema is shared
        print(f"[{app.name}] schema fingerprint {manifest['schema_fingerprint']}")


def command_apps(_args) -> None:
    from tff_apps.registry import app_names, load_app

    for name in app_names():
        print(f"{name:12s} {load_app(name).description}")


def command_run(args) -> None:
    from tff_apps.program.job import resolve_job

    overrides = list(args.overrides)
    if args.run_id:
        overrides.append(f'job.run_id="{args.run_id}"')
    if args.sites:
        overrides.append(f"job.sites={json.dumps(str(Path(args.sites).resolve()))}")
    workers = parse_workers(args.workers) if args.workers is not None else ()
    app, cfg = resolve_job(args.app, args.config, overrides)
    _run_and_print(app, cfg, resume=args.resume, workers=workers)


def parse_workers(value: str) -> tuple[str, ...]:
    """`--workers host:port,host:port` -> ("host:port", ...); anything else is a UserError."""
    workers = []
    for item in value.split(","):
        address = item.strip()
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
            raise UserError(
                f"--workers {value!r}: expected HOST:PORT[,HOST:PORT...] with ports in 1..65535, got {item!r}"
            )
        if address in workers:
            raise UserError(f"--workers {value!r}: {address} is listed twice")
        workers.append(address)
    return tuple(workers)


def command_worker(args) -> None:
    from tff_apps.runtime.worker import serve_worker  # does not import TensorFlow

    code = serve_worker(args.port, host=args.host, log_path=args.log)
    if code:
        raise SystemExit(code)


def command_runs(args) -> None:
    from tff_apps.program.runs import list_runs, table

    records = list_runs(args.runs_dir, args.app)
    if not records:
        print(f"no runs in {args.runs_dir}" + (f" for app {args.app}" if args.app else ""))
        return
    print(table(records))


def command_config(_args) -> None:
    from tff_apps.config_docs import render

    sys.stdout.write(render())


def command_demo(args) -> None:
    from tff_apps.program.job import resolve_job
    from tff_apps.registry import app_names

    if args.sites:
        from tff_apps.program.site_demo import site_demo

        reports = site_demo(app_names(), args.runs_dir, args.overrides, _run_and_print)
    else:
        reports = []
        for name in app_names():
            app, cfg = resolve_job(name, None, [f'job.runs_dir="{args.runs_dir}"', *args.overrides])
            summary = _run_and_print(app, cfg)
            reports.append((name, summary.get("report_html") or summary.get("report", "")))
    print("\nDemo reports:")
    for name, report in reports:
        print(f"  {name:12s} {report}")


def _run_and_print(app, cfg, resume: bool = False, workers: tuple[str, ...] = ()) -> dict:
    from tff_apps.program.job import run_job

    print(f"[{app.name}] {app.description}", flush=True)
    if workers:
        print(f"[{app.name}] clients spread over {len(workers)} workers: {', '.join(workers)}", flush=True)
    run, summary = run_job(app, cfg, resume=resume, **({"workers": workers} if workers else {}))
    if run.already_finished:
        print(
            f"[{app.name}] run {run.run_id}: {summary.get('status')} on {summary.get('started', '?')}, "
            f"{summary.get('rounds', '?')} rounds; already finished; not retrained"
        )
        print(f"[{app.name}] summary:    {run.dir / 'summary.json'}")
        return summary
    print(summary.get("table", ""))
    print(f"[{app.name}] run folder: {run.dir}")
    print(f"[{app.name}] summary:    {run.dir / 'summary.json'}")
    print(f"[{app.name}] report:     {summary.get('report', '')}")
    if summary.get("export", "").startswith(str(run.dir)):
        print(f"[{app.name}] export:     {summary['export']}")
    return summary


def command_predict(args) -> None:
    from tff_apps.program.predict import predict_csv

    rows = predict_csv(args.model_dir, args.input, args.output)
    print(f"scored {rows} rows -> {args.output}")


def command_score(args) -> None:
    from pathlib import Path

    from tff_apps.program.predict import read_model_card
    from tff_apps.registry import load_app

    inputs = {}
    for item in args.inputs:
        party, sep, path = item.partition("=")
        if not sep or not party or not path:
            raise UserError(f"score --input {item!r}: expected PARTY=CSV, e.g. --input lender=lender.csv")
        inputs[party] = path
    if args.sites:
        return _score_at_sites(args, inputs)
    model_dir = Path(args.model_dir)
    app = load_app(read_model_card(model_dir).get("app", ""))
    if not hasattr(app, "score"):
        raise UserError(f"{model_dir}: app {app.name!r} has one table per row; use tff-apps predict")
    result = app.score(model_dir, inputs, args.output, args.id_column)
    print(
        f"scored {result['rows_written']} shared customers (match rate {result['match_rate_lender']:.3f} of "
        f"the lender's rows) in {result['seconds']:.1f} s -> {args.output}"
    )


def _score_at_sites(args, inputs: dict[str, str]) -> None:
    """`score --sites`: the one installed app that scores at its parties' sites."""
    from tff_apps.registry import app_names, load_app

    apps = [app for app in map(load_app, app_names()) if hasattr(app, "score_across_sites")]
    if len(apps) != 1:
        raise UserError(f"score --sites: {len(apps)} installed apps score across sites; expected one")
    result = apps[0].score_across_sites(args.sites, args.model_dir, inputs, args.output)
    print(f"scored {result['rows_written']} shared customers (match rate {result['match_rate_lender']:.3f} of "
          f"the lender's rows) in {result['seconds']:.1f} s -> {result['output']}")


def command_audit(args) -> None:
    from pathlib import Path

    from tff_apps.program.audit import AUDIT_FILE, audit_run, table

    result = audit_run(args.run_dir)
    print(
        f"membership-inference audit of {args.run_dir}: {result['member_count']} members (training "
        f"records) vs {result['non_member_count']} non-members (held-out records); privacy: {result['privacy']}"
    )
    print(table(result))
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"audit: {Path(args.run_dir) / AUDIT_FILE}")


COMMANDS = {
    "apps": command_apps, "run": command_run, "runs": command_runs, "predict": command_predict,
    "score": command_score, "audit": command_audit,
    "demo": command_demo, "worker": command_worker, "config": command_config, "site": command_site,
}
SITE_COMMANDS["prepare"] = command_site_prepare


def main(argv: Sequence[str] | None = None) -> int:
    # TF logs a screen of CUDA-plugin messages at import on CPU machines; TF errors still
    # surface as Python exceptions. Set TF_CPP_MIN_LOG_LEVEL=0 to see everything.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC's info lines (e.g. on fork) are noise here
    try:
        args = build_parser().parse_args(argv)
        COMMANDS[args.command](args)
        return EXIT_OK
    except BudgetExhausted as err:  # a UserError: handled first, it has its own exit code
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BUDGET
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # an internal error: show everything needed to report it
        context = sys.modules.get("tff_apps.runtime.context")
        if context is not None and isinstance(err, context.WorkerLost):  # names the worker; no traceback
            print(f"error: {err}", file=sys.stderr)
            return EXIT_INTERNAL
        traceback.print_exc()
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
