"""The coordinator's connection to its sites: one TFF worker per site, reached through the
site's gateway over mutual TLS when the sites.toml gives certificates, each call carrying
the job's descriptor, which the site's policy admits or refuses before any computation."""

from __future__ import annotations

from collections.abc import Sequence

from shared.errors import UserError
from tff_apps.runtime.context import Runtime
from tff_apps.sites.sites_config import SiteRef

# The largest value a site is asked to send back: model updates, statistics and score
# histograms of the apps here are far below it; a site's own policy may set less.
MAX_VALUE_BYTES = 64 * 2**20


def job_descriptor(cfg, epsilon: float | None = None, spend=None):
    """What each call tells the site; `spend` is this site's planned DP spend (for its ledger)."""
    from tff_apps.privacy.dp_events import spend_to_json
    from tff_apps.sites.policy import Job

    return Job(
        app=cfg.job.app, run_id=cfg.job.run_id or "unnamed", rounds=int(cfg.train.rounds),
        privacy_level=cfg.privacy.level, epsilon=epsilon, max_value_bytes=MAX_VALUE_BYTES,
        spend=spend_to_json(spend) if spend is not None else None,
        delta=cfg.privacy.delta if spend is not None else None, accountant=cfg.privacy.accountant,
    )


def site_spends(plan, sites: Sequence[SiteRef]) -> dict:
    """Each site's planned spend: its own clients' events at record level, the run's at client level."""
    if plan is None:
        return {}
    spend = plan.spend()
    return {site.name: spend[site.name] if isinstance(spend, dict) else spend for site in sites}


def site_runtime(cfg, sites: Sequence[SiteRef], epsilon: float | None = None, log_path=None, spends=None) -> Runtime:
    """A Runtime over the sites, each client pinned to its site's worker. Its `site_budgets`
    fill in as the sites admit the job (the sites that keep their own budget)."""
    tls = [site.tls for site in sites]
    if any(tls) and not all(tls):
        plain = [site.name for site in sites if not site.tls]
        raise UserError(f"job.sites: sites {', '.join(plain)} have no certificates; give ca, cert and key for every site or none")
    labels = {site.address: f"site {site.name}" for site in sites}
    budgets: dict[str, dict] = {}
    jobs = {site.name: job_descriptor(cfg, epsilon, (spends or {}).get(site.name)) for site in sites}
    factory = _tls_channels(sites, jobs, budgets) if all(tls) else None
    runtime = Runtime(
        workers=[site.address for site in sites], pinned=True, channel_factory=factory, worker_labels=labels,
        log_path=log_path,
    )
    runtime.site_budgets = budgets
    return runtime


def _tls_channels(sites: Sequence[SiteRef], jobs: dict, budgets: dict):
    from tff_apps.sites.certs import load_credentials
    from tff_apps.sites.channel import admission_check, site_channel

    by_address = {site.address: site for site in sites}

    def channel(address: str):
        site = by_address[address]
        credentials = load_credentials(site.ca, site.cert, site.key, what=f"job.sites site {site.name}")
        made = site_channel(address, credentials, jobs[site.name], server_name=site.name)
        budget = admission_check(made, site=site.name)  # the site's policy and budget, before any computation
        if budget is not None:
            budgets[site.name] = budget
        return made

    return channel


def check_masked_sites(cfg, sites) -> None:
    """Masking runs in each site's gateway: every site needs one (mutual TLS), and the
    protocol needs at least 2 sites."""
    if cfg.privacy.secure_aggregation != "masked":
        return
    plain = [site.name for site in sites if not site.tls]
    if plain:
        raise UserError(
            f"job.sites: privacy.secure_aggregation = 'masked' runs in each site's gateway; sites "
            f"{', '.join(plain)} have no ca, cert and key (serve them with tff-apps site serve and give the certificates)"
        )


def sites_and_manifests(cfg) -> tuple[list[SiteRef], list[dict]]:
    """The job's sites (`job.sites`, in the file's order) and each one's manifest, read at the
    site, once masking's needs are checked. Connecting states the job's planned ε: each site's
    policy admits or refuses the job before anything else runs."""
    from tff_apps.sites.site_computations import read_manifests
    from tff_apps.sites.sites_config import load_sites

    sites = load_sites(cfg.job.sites)
    check_masked_sites(cfg, sites)
    planned = cfg.privacy.target_epsilon if cfg.privacy.level != "none" and cfg.privacy.target_epsilon > 0 else None
    with site_runtime(cfg, sites, planned):
        manifests = read_manifests([site.data for site in sites])
    return sites, manifests


def refuse_what_sites_do_not_run(cfg, app: str, stacked: str, app_refusals: dict[str, bool]) -> None:
    """What does not run across sites yet, refused in one line before anything starts: the
    refusals every app shares (`stacked` names what the grouped engine would pool in one
    process) and the app's own."""
    refusals = {
        "robustness.bad_clients (a simulation's evaluation mode)": cfg.robustness.bad_clients > 0,
        f"train.engine = 'grouped' (it stacks {stacked} in one process)": cfg.train.engine == "grouped",
        **app_refusals,
    }
    for what, refused in refusals.items():
        if refused:
            raise UserError(f"job.sites: {what} is not available across sites for {app}; remove it or run a simulation")
