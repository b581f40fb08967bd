"""`tff-apps score RUN_ID --sites sites.toml --input PARTY=CSV ... --output CSV` across the
parties' sites: each CSV and the output are paths AT the party's site (the output at the
lender's). Each party's export of the run, at its site, scores its own rows; the PSI between
the parties' gateways aligns the customers; each party's worker sends its partial scores of the
shared customers through the secure sum, masked as in training; the lender's gateway writes its IDs
and sigmoid(z). The coordinator holds counts, blinded values and z, no ID, row or score file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping


from finance.parties import LENDER
from finance.sites import GatewayCalls, PartyMasks, Relay, RUNS, _check_parties
from shared import secagg_wire as wire
from shared.errors import UserError


def score_across_sites(sites_toml: str | Path, model_run: str, inputs: Mapping[str, str], output: str) -> dict:
    from tff_apps.learning.vertical import SecureScoreSum
    from tff_apps.learning.vertical_sites import ring_bits, site_score_sum
    from tff_apps.program.job import resolve_job, with_sites
    from tff_apps.sites.connect import site_runtime, sites_and_manifests

    started = time.perf_counter()
    session = f"{model_run}.score-{time.strftime('%Y%m%d-%H%M%S')}"
    _, cfg = resolve_job("finance", None, [f'job.run_id="{session}"'])
    cfg = with_sites(cfg, str(Path(sites_toml).resolve()))
    sites, manifests = sites_and_manifests(cfg)
    _check_parties(sites, manifests)
    names = [site.name for site in sites]
    _check_inputs(names, inputs)
    calls = GatewayCalls(cfg, sites)
    relay = Relay(calls, names)
    opened = [calls(i, "Score", {"step": "open", "model_run": model_run, "input": inputs[name]})
              for i, name in enumerate(names)]
    bounds = {answer["score_bound"] for answer in opened}
    if len(bounds) != 1:
        raise UserError(f"run {model_run}: the parties' exports have different score bounds ({sorted(bounds)}); "
                        "score with the exports of one run")
    for partner in names[1:]:
        relay.psi(partner)
    lender = calls(0, "Align", {"partners": names[1:]})
    for index, name in enumerate(names[1:], start=1):
        calls(index, "Align", {"keep": lender["keep"][name]})
    summer = SecureScoreSum(len(names), bounds.pop() or 32.0)
    masks = PartyMasks(calls, len(names))("score", lender["rows"], ring_bits(summer))
    with site_runtime(cfg, sites):
        z = site_score_sum(summer, [f"{s.data}/{RUNS}/{session}" for s in sites], masks, lender["rows"])
    written = calls(0, "Score", {"step": "write", "z": wire.b64(z.astype("<f4").tobytes()), "output": output})
    return {"rows_written": written["rows"], "match_rate_lender": written["rows"] / opened[0]["rows"],
            "seconds": time.perf_counter() - started, "output": f"site {LENDER}: {output}"}


def _check_inputs(names: list[str], inputs: Mapping[str, Any]) -> None:
    missing, unknown = [n for n in names if n not in inputs], [p for p in inputs if p not in names]
    if missing or unknown:
        raise UserError(
            "score --sites: give one CSV per party, a path at its site, as " + " ".join(f"--input {n}=FILE" for n in names)
            + (f"; missing {', '.join(missing)}" if missing else "") + (f"; unknown party {', '.join(unknown)}" if unknown else "")
        )


__all__ = ["score_across_sites"]
