"""Finance across sites (`job.sites`): the lender and each partner run `tff-apps site serve`
next to their own folder (`tff-apps site prepare finance --site PARTY`); this coordinator
relays and sums, it never reads a row, an ID or a column name.

1. Manifests (through a computation at each site): each site's party and role, its customer count.
2. PSI between the party sites: for each partner, the coordinator relays the lender's and the
   partner's PSI messages between their gateways (`tff_apps.sites.vertical_party`): each party
   blinds its own IDs at its site, the coordinator sees blinded values and counts only.
3. Alignment: the lender's gateway keeps the customers every partner shares, sends each
   partner its kept bits and the held-out split (positions) through the coordinator; each
   party encodes its own columns of the aligned customers into its run folder at its site.
4. Training and evaluation: `tff_apps.program.vertical_site_rounds` (TFF computations on each
   party's worker; weights stay at the sites).

What differs from a simulation of the same files: the DP noise comes from each party's own
secret seed at its site (so runs with noise differ from a simulation's draws); evaluation
metrics come from the lender's score histograms (exact to 1/4096 of the score); the joined-table
baseline cannot exist and the lender-alone baseline is not trained across sites yet; each party's
export is written at its own site (`finance.site_export`), the coordinator's run folder has none.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from finance.parties import LENDER
from shared import secagg_wire as wire
from shared.errors import UserError
from tff_apps.config import JobConfig

RUNS = "runs"
SECURE_SUM_AT_SITES = (
    "partial scores (training, evaluation, scoring) masked at each party's worker with pairwise masks its gateway "
    "derives (X25519 key agreement with every other party, ChaCha20 keystream; tff_apps/sites/vertical_masks.py), "
    "summed by the coordinator's TFF runtime: the coordinator sees each party's masked values (uniform in the ring) "
    "and their sum z of every batch and of the held-out customers; semi-honest coordinator (it relays the public keys)"
)
NOT_ACROSS_SITES = ("n/a across sites: the joined-table baseline would pool the parties' columns; the lender-alone "
                    "baseline is not trained at the lender's site yet")
PSI_TIMEOUT_S = 600.0


@dataclass
class SitesPrepared:
    sites: list  # tff_apps.sites.sites_config.SiteRef, the lender first
    manifests: list[dict[str, Any]]
    widths: list[int]
    n_train: int
    n_test: int
    alignment: dict[str, Any]

    @property
    def names(self) -> list[str]:
        return [site.name for site in self.sites]


def prepare(cfg: JobConfig) -> SitesPrepared:
    """Manifests, PSI between the party sites, alignment and encoding at each site."""
    from tff_apps.sites.connect import sites_and_manifests

    sites, manifests = sites_and_manifests(cfg)
    _check_parties(sites, manifests)
    calls = GatewayCalls(cfg, sites)
    relay = Relay(calls, [site.name for site in sites])
    started = time.perf_counter()
    shared = {site.name: relay.psi(site.name) for site in sites[1:]}
    aligned = relay.align(cfg.evaluate.test_fraction, cfg.job.seed)
    widths = [aligned[site.name]["width"] for site in sites]
    counts = aligned[LENDER]
    customers = {site.name: m["rows"]["customers"] for site, m in zip(sites, manifests)}
    matched = counts["train"] + counts["test"]
    alignment = {
        "protocol": "ECDH-PSI on ristretto255 between the party sites, relayed by the coordinator",
        "customers": customers, "match_rate": {name: matched / n for name, n in customers.items()},
        "pairwise_match_count": shared, "match_count": matched,
        "seconds": round(time.perf_counter() - started, 3), "bytes_exchanged": calls.bytes,
    }
    return SitesPrepared(sites, manifests, widths, counts["train"], counts["test"], alignment)


def _check_parties(sites, manifests) -> None:
    for site, manifest in zip(sites, manifests):
        if manifest.get("app") != "finance" or "role" not in manifest:
            raise UserError(f"site {site.name}: its data folder {site.data} is not a finance party's "
                            "(make it with tff-apps site prepare finance --site NAME)")
        if manifest["site"] != site.name:
            raise UserError(f"site {site.name}: its folder holds party {manifest['site']!r}; name the site as its party")
        if not site.tls:
            raise UserError(f"job.sites: site {site.name} has no ca, cert and key; a finance party's PSI runs in its "
                            "gateway (serve it with tff-apps site serve and give the certificates)")
    lenders = [site.name for site, m in zip(sites, manifests) if m["role"] == "lender"]
    if lenders != [sites[0].name] or len(sites) < 2:
        raise UserError(f"job.sites: finance needs the lender's site first (named {LENDER!r}) and at least one partner "
                        f"site; the file lists {', '.join(s.name for s in sites)} (lender sites: {lenders or 'none'})")


class GatewayCalls:
    """The coordinator's calls to the parties' gateways (`tff_apps.v1.VerticalParty`), one
    mutual-TLS channel per site carrying the job's descriptor; a refusal is one line."""

    def __init__(self, cfg: JobConfig, sites) -> None:
        from tff_apps.sites.masked_rounds import site_channels

        self._sites, self._channel = sites, site_channels(cfg, sites, None)
        self._channels: dict[int, Any] = {}
        self.bytes = 0

    def __call__(self, index: int, method: str, body: dict[str, Any]) -> dict[str, Any]:
        import grpc

        from tff_apps.sites.vertical_party import SERVICE

        if index not in self._channels:
            self._channels[index] = self._channel(index)
        request = wire.dumps(body)
        try:
            answer = self._channels[index].unary_unary(f"/{SERVICE}/{method}")(request, timeout=PSI_TIMEOUT_S)
        except grpc.RpcError as err:
            site = self._sites[index].name
            line = (err.details() or err.code().name).splitlines()[0]
            raise UserError(line if line.startswith(f"site {site}") else f"site {site}: {method}: {line}") from None
        self.bytes += len(request) + len(answer)
        return wire.loads(answer)


class Relay:
    """The coordinator's part in PSI and alignment: it passes each party's messages to the
    other and keeps only counts. `call(index, method, body)` reaches party `index` (the lender 0)."""

    def __init__(self, call, names: list[str]) -> None:
        self.call, self._names = call, names

    def psi(self, partner: str) -> int:
        """One PSI between the lender (site 0) and `partner`, each step at both sites in parallel."""
        index = self._names.index(partner)
        parties, peers = (0, index), (partner, LENDER)
        messages = self._both(parties, peers, "salt", (None, None))
        for step in ("blinded", "double_blind", "finish"):
            answers = self._both(parties, peers, step, (messages[1], messages[0]))
            messages = answers
        counts = {int(answer["shared"]) for answer in messages}
        if len(counts) != 1:
            raise RuntimeError(f"PSI: the lender and {partner} disagree on the intersection size ({counts})")
        return counts.pop()

    def _both(self, parties, peers, step: str, incoming) -> list[Any]:
        def ask(k: int):
            body = {"peer": peers[k], "step": step}
            if incoming[k] is not None:
                body["message"] = incoming[k]
            return self.call(parties[k], "Psi", body)

        with ThreadPoolExecutor(max_workers=2) as pool:
            answers = list(pool.map(ask, (0, 1)))
        return [answer.get("message", answer) if step != "finish" else answer for answer in answers]

    def align(self, test_fraction: float, seed: int) -> dict[str, dict[str, int]]:
        """Each party's encoded width and row counts, once it has written its aligned rows."""
        partners = self._names[1:]
        lender = self.call(0, "Align", {"partners": partners, "test_fraction": test_fraction, "seed": seed})
        encoded = {LENDER: lender["encoded"]}
        for index, name in enumerate(partners, start=1):
            answer = self.call(index, "Align", {"keep": lender["keep"][name], "train": lender["train"],
                                                "test": lender["test"]})
            encoded[name] = answer["encoded"]
        return encoded


def train(cfg: JobConfig, prepared: SitesPrepared, run, settings) -> tuple[Any, dict[str, Any]]:
    """Split-model training at the sites with `settings` (`VerticalSettings`); (the result, the
    lender's final metrics)."""
    from finance import evaluate
    from tff_apps.program.vertical_site_rounds import SiteParty, train_vertical_at_sites

    parties = [SiteParty(site.name, f"{site.data}/{RUNS}/{run.run_id}", width)
               for site, width in zip(prepared.sites, prepared.widths)]
    return train_vertical_at_sites(
        parties, prepared.n_train, prepared.n_test, settings, metrics=evaluate.binary_metrics,
        masks=PartyMasks(GatewayCalls(cfg, prepared.sites), len(parties)),
        run_dir=run.dir, checkpoint_every=cfg.train.checkpoint_every,
    )


class PartyMasks:
    """Every party's pairwise masks of the secure sum, written at its site by its gateway
    (`tff_apps.sites.vertical_masks`); the coordinator relays the parties' public keys."""

    def __init__(self, call, n_parties: int) -> None:
        self._call, self._parties = call, range(n_parties)
        self._keys = self._each(lambda i: call(i, "Masks", {"step": "advertise"})["public"])

    def __call__(self, purpose: str, rows: int, bits: int) -> str:
        """Has every party write its masks of `purpose` for `rows` values in Z_{2^bits}; the file's name."""
        body = {"step": "write", "keys": self._keys, "purpose": purpose, "length": rows, "bits": bits}
        names = set(self._each(lambda i: self._call(i, "Masks", {**body, "index": i})["file"]))
        if len(names) != 1:
            raise RuntimeError(f"the parties wrote their {purpose} masks under different names ({sorted(names)})")
        return names.pop()

    def _each(self, ask) -> list:
        with ThreadPoolExecutor(max_workers=len(self._parties)) as pool:
            return list(pool.map(ask, self._parties))


def export_at_sites(cfg: JobConfig, prepared: SitesPrepared, run, summary: dict[str, Any]) -> dict[str, str]:
    """Each party's SavedModel written at its own site from its final weights there; returns
    where (party -> "site NAME: PATH", a path on the site's machine)."""
    from finance.parties import party_view

    calls = GatewayCalls(cfg, prepared.sites)
    card = {
        "app": "finance", "run_id": run.run_id, "task": "probability of default = sigmoid(sum of every party's "
        "partial score)", "metrics": summary["results"]["vertical"], "privacy": summary["privacy"],
        "trained_across_sites": prepared.names,
    }
    model = {"tag": f"e{cfg.train.rounds}", "kind": cfg.model.kind, "width": max(prepared.widths),
             "hidden_units": cfg.model.hidden_units, "score_bound": cfg.model.score_bound}
    where = {}
    for index, name in enumerate(prepared.names):
        body = {**model, "card": {**card, "config": party_view(cfg, name).to_dict()}}
        where[name] = f"site {name}: {calls(index, 'Export', body)['export']}"
    return where
