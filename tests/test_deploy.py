"""deploy/: the Kubernetes files parse, their commands are ones the CLI accepts, and the
coordinator's sites.toml has the keys `job.sites` reads."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

from tff_apps.cli import build_parser
from tff_apps.sites.sites_config import KEYS

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


@pytest.mark.parametrize("name", sorted(p.name for p in K8S.glob("*.yaml")))
def test_every_manifest_parses_with_kind_and_name(name):
    for document in documents(name):
        assert document["kind"] and document["metadata"]["name"]


def test_the_site_serves_through_the_gateway_port_only():
    site = {d["kind"]: d for d in documents("site.yaml")}
    container = site["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])
    assert (args.command, args.site_command, args.port) == ("site", "serve", 7443)
    assert [p["containerPort"] for p in container["ports"]] == [7443]
    assert site["NetworkPolicy"]["spec"]["ingress"] == [{"ports": [{"port": 7443, "protocol": "TCP"}]}]
    policy = tomllib.loads(site["ConfigMap"]["data"]["site.toml"])["policy"]
    assert policy["require_privacy"] == "client" and policy["max_epsilon"] == 3.0


def test_the_coordinators_sites_file_lists_gateways_and_certificates():
    config = documents("coordinator-sites.yaml")[0]["data"]
    sites = tomllib.loads(config["sites.toml"])["site"]
    assert len(sites) == 2 and all(set(site) == KEYS for site in sites)
    assert tomllib.loads(config["job.toml"])["privacy"]["level"] == "client"
