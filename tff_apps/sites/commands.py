"""`tff-apps site certs` and `tff-apps site serve`, for tff_apps/cli.py to register:
``add_site_commands(commands)`` in its parser and ``"site": command_site`` in its table.
Another ``site`` subcommand is added to the returned subparsers and to `SITE_COMMANDS`.
Imports nothing heavy until a command runs (neither command imports TensorFlow).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_site_commands(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Adds ``site`` with ``certs`` and ``serve``; returns the subparsers of ``site``."""
    site = subparsers.add_parser("site", help="run a site (gateway + TFF worker) or make test certificates")
    # The same parser class as the CLI's, so argparse's own mistakes stay one line.
    commands = site.add_subparsers(dest="site_command", required=True, parser_class=type(site))

    certs = commands.add_parser("certs", help="write a test CA, one certificate per site and the coordinator's")
    certs.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder for the files")
    certs.add_argument("--sites", required=True, metavar="NAME,...", help="the site names, e.g. hospital_a,hospital_b")
    certs.add_argument("--days", type=int, default=30, help="validity in days (default: 30)")

    serve = commands.add_parser(
        "serve", help="serve one site: its TFF worker behind a mutual-TLS gateway, until SIGTERM/Ctrl-C"
    )
    serve.add_argument("--data", required=True, metavar="DIR", help="the site's data folder (the worker runs there)")
    serve.add_argument("--port", type=int, required=True, help="the gateway's port (mutual TLS)")
    serve.add_argument("--certs", required=True, metavar="DIR", help="folder with ca.pem, NAME.pem and NAME.key")
    serve.add_argument("--name", required=True, help="the site's name, as in its certificate")
    serve.add_argument("--policy", metavar="FILE", help="site.toml with a [policy] table (default: admit every job)")
    serve.add_argument("--audit", metavar="FILE", help="the audit log, JSON lines (default: NAME-audit.jsonl)")
    serve.add_argument("--host", default="[::]", help="the address to listen on (default: every interface)")
    serve.add_argument(
        "--isolation", choices=("netns", "none"), default="netns",
        help="netns (default): the worker in a private network namespace (needs root); "
        "none: the worker on the host's network (keep its port closed yourself, docs/sites.md)",
    )
    serve.add_argument("--log", metavar="FILE", help="append the worker's own output to FILE")
    return commands


def command_site(args: argparse.Namespace) -> None:
    SITE_COMMANDS[args.site_command](args)


def _certs(args: argparse.Namespace) -> None:
    from tff_apps.sites.certs import make_test_pki

    names = [name.strip() for name in args.sites.split(",") if name.strip()]
    out = make_test_pki(Path(args.out), names, days=args.days)
    print(f"test certificates in {out}: ca.pem, coordinator.pem/.key, " + ", ".join(f"{n}.pem/.key" for n in names))
    print("each site gets ca.pem and its own pair; the coordinator gets ca.pem and coordinator.pem/.key; "
          "ca.key stays with whoever issues certificates")


def _serve(args: argparse.Namespace) -> None:
    from tff_apps.sites.policy import load_policy
    from tff_apps.sites.serve import serve_site

    folder = Path(args.certs)
    certs = (folder / "ca.pem", folder / f"{args.name}.pem", folder / f"{args.name}.key")
    policy = load_policy(args.policy, args.name)
    audit = Path(args.audit) if args.audit else Path(f"{args.name}-audit.jsonl")
    code = serve_site(args.data, args.port, certs, policy, audit, args.host, isolation=args.isolation, log_path=args.log)
    if code:
        raise SystemExit(code)


SITE_COMMANDS = {"certs": _certs, "serve": _serve}
