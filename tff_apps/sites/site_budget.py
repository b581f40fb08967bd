"""The site's own privacy budget: a lifetime ledger kept at the site, which the coordinator
cannot override (`[policy] lifetime_epsilon`).

Each job states its planned DP spend on this site's data in its descriptor (the same
dp_accounting events the coordinator's ledger records). At admission the site composes it
with every earlier job's spend in its own ledger (`privacy.ledger.Ledger`, with the site as
the data source) and refuses the job if the lifetime budget would be passed; the spend is
reserved at the job's first computation, so a job refused at another site spends nothing
here. A resumed run id keeps its one row. The site records the planned spend (it cannot see
how many rounds will run): conservative. A DP job whose descriptor has no spend yet (the
coordinator reads the manifests before it plans) is admitted while budget remains and books
nothing; a job without DP is refused. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from tff_apps.privacy import accounting, dp_events
from tff_apps.privacy.ledger import BudgetExhausted, Ledger, composition_accountant
from tff_apps.sites.policy import Job, Refused

BUDGET_METADATA = "tff-apps-site-budget"  # trailing metadata of the admission call


class SiteBudget:
    def __init__(self, path: Path | str, site: str, lifetime_epsilon: float):
        self.site, self.lifetime = site, float(lifetime_epsilon)
        self.ledger = Ledger(path)
        self.source = f"site:{site}"
        self._reserved: set[str] = set()
        self._lock = threading.Lock()

    def check(self, job: Job) -> dict:
        """Raises Refused if the job would pass the budget; else the budget after it."""
        if job.privacy_level == "none":
            raise Refused(
                f"site {self.site}: policy lifetime_epsilon = {self.lifetime:g}, the job has no DP "
                "(privacy.level = 'none'): its ε is unbounded"
            )
        spent = self._composed(job)  # the other jobs' (a resumed run id counts once)
        if job.spend is None:  # the coordinator reading manifests before it can plan: nothing to book yet
            if spent >= self.lifetime:
                raise Refused(f"site {self.site}: its privacy budget lifetime_epsilon = {self.lifetime:g} is spent")
            return {"site": self.site, "lifetime_epsilon": self.lifetime, "remaining": self.lifetime - spent}
        after = self._composed(job, dp_events.spend_from_json(job.spend))
        if after > self.lifetime:
            raise Refused(
                f"site {self.site}: its privacy budget lifetime_epsilon = {self.lifetime:g} would be passed: "
                f"spent ε = {spent:.4g}, this job would bring it to {after:.4g} (remaining {max(self.lifetime - spent, 0):.4g})"
            )
        return {"site": self.site, "lifetime_epsilon": self.lifetime, "epsilon_with_this_job": after,
                "remaining_after_this_job": self.lifetime - after}

    def reserve(self, job: Job) -> None:
        """Books the job's spend once per run id (a resumed run reopens its row)."""
        with self._lock:
            if job.run_id in self._reserved or job.spend is None:
                return
            try:
                self.ledger.reserve(
                    self.source, job.run_id, dp_events.spend_from_json(job.spend), job.delta, job.accountant,
                    self.lifetime, resume=True,
                )
            except BudgetExhausted as err:
                raise Refused(f"site {self.site}: {err}") from None
            self._reserved.add(job.run_id)

    def _composed(self, job: Job, extra=None) -> float:
        """ε of the composition of every other live job's spend on this site (and `extra`)."""
        others = [e for e in self.ledger.history(self.source) if e.status != "released" and e.run_id != job.run_id]
        spends = [e.spend for e in others] + ([extra] if extra is not None else [])
        if not spends:
            return 0.0
        chosen = composition_accountant([e.accountant for e in others] + [job.accountant])
        delta = job.delta if job.delta is not None else min(e.delta for e in others)  # no spend stated yet
        return accounting.composed_epsilon(spends, delta, chosen)


def budget_json(status: dict) -> str:
    return json.dumps(status, sort_keys=True)
