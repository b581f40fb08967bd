"""Real federations: the config of what makes a federation untidy, for horizontal apps.

Four sections, each off by default (a job without them runs exactly as before):

[communication]    update compression (TFF's quantizing aggregators, optionally rotated)
[clients]          unreliable clients: dropout, stragglers against a deadline,
                   over-selection, and the quorum a round needs
[robustness]       robust aggregation, and an evaluation mode that makes clients bad
[personalization]  per-client fine-tuning of the global model, evaluated per client

`check(cfg, client_rows)` refuses combinations that cannot run (one line, before any run
folder exists); the engine parts live in `processes` (aggregators), `program` (rounds)
and `personalization`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Mapping

from shared.errors import UserError

COMPRESSIONS = ("none", "quantize", "hadamard", "dft")
AGGREGATIONS = ("mean", "clip_zero", "median", "trimmed_mean")
BAD_CLIENT_MODES = ("label_flip", "scaled_update")


@dataclass(frozen=True)
class CommunicationSection:
    """Compression of the clients' updates on the way up (the broadcast stays float32)."""

    compression: str = field(default="none", metadata={"choices": COMPRESSIONS, "doc": (
        "`quantize`: each client's update goes up quantized (TFF's EncodedSumFactory: uniform quantization of the "
        "concatenated update, nearest level, bit-packed); `hadamard` / `dft`: the same after TFF's randomized "
        "Hadamard / Fourier rotation."
    )})
    bits: int = field(default=8, metadata={"min": 1, "max": 16, "doc": (
        "Bits per quantized value: 3 for a tiny model such as healthcare's (4.6x smaller upload); 7 fills TFF's "
        "28-bit packing words exactly (4x); 8 packs 3.5 values per word (3.5x)."
    )})


@dataclass(frozen=True)
class ClientsSection:
    """Simulated unreliable clients (seeded by job.seed, round and client; tff_apps/learning/participation.py)."""

    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.99, "doc": (
        "Probability that a sampled client fails in a round."
    )})
    deadline_seconds: float = field(default=0.0, metadata={"min": 0.0, "doc": (
        "Simulated round deadline; slower clients are cut as stragglers (0 = none)."
    )})
    seconds_per_example: float = field(default=0.001, metadata={"exclusive_min": 0.0, "doc": (
        "A client's simulated time is examples × seconds_per_example × exp(N(0, speed_spread²))."
    )})
    speed_spread: float = field(default=0.5, metadata={"min": 0.0, "max": 5.0, "doc": (
        "σ of a client's log-normal slowdown, drawn again each round."
    )})
    over_selection: float = field(default=0.0, metadata={"min": 0.0, "max": 10.0, "doc": (
        "Sample ceil(m × (1 + over_selection)) clients and keep the first m (`train.clients_per_round`) to report."
    )})
    quorum: int = field(default=1, metadata={"min": 1, "doc": (
        "A round with fewer reporting clients is skipped: model and ε unchanged."
    )})


@dataclass(frozen=True)
class RobustnessSection:
    """Robust aggregation, and the bad-client evaluation mode that shows what it buys."""

    aggregation: str = field(default="mean", metadata={"choices": AGGREGATIONS, "doc": (
        "`mean`: the algorithm's (un)weighted mean; `clip_zero`: TFF's robust aggregator (adaptive norm clipping "
        "and zeroing); `median` / `trimmed_mean`: coordinate-wise, unweighted."
    )})
    trim_fraction: float = field(default=0.2, metadata={"min": 0.0, "max": 0.49, "doc": (
        "`trimmed_mean`: the share of values dropped per side and coordinate."
    )})
    bad_clients: int = field(default=0, metadata={"min": 0, "doc": "Evaluation mode: the first N clients turn bad."})
    bad_client_mode: str = field(default="label_flip", metadata={"choices": BAD_CLIENT_MODES, "doc": (
        "`label_flip`: the bad clients' training labels are flipped (traffic: targets mirrored about the mean); "
        "`scaled_update`: their updates are multiplied by `bad_update_scale`."
    )})
    bad_update_scale: float = field(default=-4.0, metadata={"doc": "`scaled_update`: a bad client sends this × its update."})


@dataclass(frozen=True)
class PersonalizationSection:
    """Per-client fine-tuning of the final global model on the client's own training split."""

    epochs: int = field(default=0, metadata={"min": 0, "max": 1000, "doc": (
        "Each client fine-tunes the final model for this many passes over its own training rows; the report "
        "gives each client's metric before and after (0 = off)."
    )})
    learning_rate: float = field(default=0.0, metadata={"min": 0.0, "doc": (
        "Fine-tuning SGD step (0 = `train.client_learning_rate`)."
    )})


SECTIONS: dict[str, type] = {
    "communication": CommunicationSection,
    "clients": ClientsSection,
    "robustness": RobustnessSection,
    "personalization": PersonalizationSection,
}


@dataclass(frozen=True)
class Federation:
    """The four sections of one job, as the engine's builders take them."""

    communication: CommunicationSection = CommunicationSection()
    clients: ClientsSection = ClientsSection()
    robustness: RobustnessSection = RobustnessSection()
    personalization: PersonalizationSection = PersonalizationSection()

    @property
    def is_default(self) -> bool:
        return self == Federation()


def of(cfg) -> Federation:
    """The job's federation settings (a `config.JobConfig`)."""
    return Federation(**{name: getattr(cfg, name) for name in SECTIONS})


def changed_keys(federation: Federation) -> list[str]:
    """`section.key` of every setting that differs from its default."""
    changed = []
    for name, cls in SECTIONS.items():
        given, default = getattr(federation, name), cls()
        changed += [f"{name}.{key}" for key in vars(default) if getattr(given, key) != getattr(default, key)]
    return changed


def check(cfg, client_rows: Mapping[str, int] | None) -> None:
    """Refuses (UserError, one line) settings that cannot run with this job.

    `client_rows`: the app's training rows per client (`App.client_rows`), None for an app
    that is not horizontal (finance): there every setting must stay at its default.
    """
    federation = of(cfg)
    if client_rows is None:
        if getattr(cfg.train, "engine", "tff") == "grouped":  # auto: the app's own engine
            raise UserError(f"config: train.engine = {cfg.train.engine!r} runs horizontal apps only; use train.engine = 'tff'")
        if not federation.is_default:
            key = changed_keys(federation)[0]
            raise UserError(
                f"config: {key} applies to horizontal apps (healthcare, traffic); remove it from this job"
            )
        return
    for part in (check_communication, check_clients, check_robustness, check_personalization):
        part(cfg, federation, dict(client_rows))


def check_communication(cfg, federation: Federation, client_rows: dict[str, int]) -> None:
    """Compression composes with the plain mean, clip_zero and record-level DP (DP-SGD noises
    the update at the client: quantizing it afterwards is post-processing). It is refused
    where the mechanism would no longer be the one accounted or the one that runs."""
    section, privacy = federation.communication, cfg.privacy
    if section.compression == "none":
        if section.bits != CommunicationSection().bits:
            raise UserError(
                f"communication.bits = {section.bits} has no effect with communication.compression = 'none'; "
                "set communication.compression = 'quantize' (or 'hadamard' / 'dft'), or remove communication.bits"
            )
        return
    key = f"communication.compression = {section.compression!r}"
    if privacy.secure_aggregation != "none":
        raise UserError(
            f"{key} cannot run with privacy.secure_aggregation = {privacy.secure_aggregation!r}: the secure sum "
            "already sends fixed-point integers in a fixed ring and TFF's quantizing sum would bypass it; "
            "set communication.compression = 'none' (privacy.secure_scale_bits sets the masked sum's precision)"
        )
    if privacy.level == "client":
        raise UserError(
            f"{key} cannot run with privacy.level = 'client': quantizing a clipped update can push its norm above "
            "privacy.clip_norm, so the accounted ε would not hold; set communication.compression = 'none' "
            "(or use privacy.level = 'record', whose noise is added before compression)"
        )


def check_clients(cfg, federation: Federation, client_rows: dict[str, int]) -> None:
    """[clients]: a quorum a round can reach, something to over-select, and no unreliable
    clients where the privacy mechanism assumes a fixed number of them."""
    from tff_apps.learning import participation
    from tff_apps.privacy.dp_config import examples_per_round

    clients, train, section = federation.clients, cfg.train, cfg.privacy
    m = participation.participants(len(client_rows), train.clients_per_round)
    if clients.quorum > m:
        raise UserError(
            f"clients.quorum = {clients.quorum}: a round has at most {m} reporting clients "
            f"(train.clients_per_round = {train.clients_per_round}, {len(client_rows)} clients); "
            f"set clients.quorum <= {m}"
        )
    if clients.over_selection > 0 and m == len(client_rows):
        raise UserError(
            f"clients.over_selection = {clients.over_selection:g}: train.clients_per_round = {train.clients_per_round} "
            f"already samples all {m} clients, nothing to over-select; set train.clients_per_round below {m} "
            "or clients.over_selection = 0"
        )
    if clients.over_selection > 0 and section.level != "none":
        raise UserError(
            f"clients.over_selection = {clients.over_selection:g}: it changes the client sampling the privacy "
            f"accountant assumes (privacy.level = {section.level!r}); set clients.over_selection = 0"
        )
    can_fail = clients.dropout > 0 or clients.deadline_seconds > 0
    if can_fail and section.level == "client" and section.secure_aggregation != "none":
        raise UserError(
            f"clients.dropout / clients.deadline_seconds: distributed DP (privacy.secure_aggregation = "
            f"{section.secure_aggregation!r}) splits the noise over {m} clients and a round with fewer adds too "
            "little; set clients.dropout = 0 and clients.deadline_seconds = 0, or privacy.secure_aggregation = 'none'"
        )
    if can_fail and section.secure_aggregation == "masked" and clients.quorum < 2:
        raise UserError(
            f"clients.quorum = {clients.quorum}: masked secure aggregation needs at least 2 reporting clients "
            "per round; set clients.quorum = 2 (or more)"
        )
    if clients.deadline_seconds > 0:
        fastest = min(examples_per_round(train, rows) for rows in client_rows.values())
        median = fastest * clients.seconds_per_example
        if clients.deadline_seconds < median:
            logging.getLogger(__name__).warning(
                "clients.deadline_seconds = %g is below the fastest client's median simulated time (%g s): "
                "most rounds will miss the quorum and be skipped", clients.deadline_seconds, median,
            )


def check_robustness(cfg, federation: Federation, client_rows: dict[str, int]) -> None:
    section = federation.robustness
    _check_python_aggregation(cfg, federation, client_rows)
    _check_clip_zero(cfg, federation)
    if section.bad_clients >= len(client_rows):
        raise UserError(
            f"robustness.bad_clients = {section.bad_clients}: this job has {len(client_rows)} clients; "
            f"make fewer than {len(client_rows)} of them bad"
        )
    if section.bad_clients > 0 and section.bad_client_mode == "scaled_update":
        if cfg.privacy.level != "none" or cfg.privacy.secure_aggregation != "none":
            raise UserError(
                "robustness.bad_client_mode = 'scaled_update' needs every update in the clear (no privacy.level "
                "and no privacy.secure_aggregation); use bad_client_mode = 'label_flip' or turn privacy off"
            )


def _check_clip_zero(cfg, federation: Federation) -> None:
    """clip_zero (TFF's robust aggregator, `aggregators.job_aggregator`) wraps the plain mean;
    client-level DP and the secure sums clip with their own bound and build their own mean."""
    if federation.robustness.aggregation != "clip_zero":
        return
    key = "robustness.aggregation = 'clip_zero'"
    if cfg.privacy.secure_aggregation != "none":
        raise UserError(
            f"{key} cannot run with privacy.secure_aggregation = {cfg.privacy.secure_aggregation!r} (the secure sum "
            "clips to privacy.secure_bound itself); use robustness.aggregation = 'mean' or secure_aggregation = 'none'"
        )
    if cfg.privacy.level == "client":
        raise UserError(
            f"{key} cannot run with privacy.level = 'client' (the DP aggregator clips to privacy.clip_norm and "
            "replaces the mean); use robustness.aggregation = 'mean' or privacy.level = 'none' / 'record'"
        )


def _check_python_aggregation(cfg, federation: Federation, client_rows: dict[str, int]) -> None:
    """median / trimmed_mean read every client's update in the clear, and DP's sensitivity
    assumes the mean: no DP, secure sum or compression; a trim that drops nothing is refused."""
    section = federation.robustness
    if section.aggregation not in ("median", "trimmed_mean"):
        return
    key = f"robustness.aggregation = {section.aggregation!r}"
    if cfg.privacy.level != "none":
        raise UserError(
            f"{key} cannot run with privacy.level = {cfg.privacy.level!r} (DP's sensitivity assumes the mean); "
            "use aggregation 'mean' or 'clip_zero', or privacy.level = 'none'"
        )
    if cfg.privacy.secure_aggregation != "none":
        raise UserError(
            f"{key} needs every client's update in the clear, privacy.secure_aggregation = "
            f"{cfg.privacy.secure_aggregation!r} hides them; use aggregation 'mean' or secure_aggregation = 'none'"
        )
    if federation.communication.compression != "none":
        raise UserError(
            f"{key} cannot run with communication.compression = {federation.communication.compression!r} "
            "(it needs each update uncompressed); set compression = 'none'"
        )
    from tff_apps.learning import participation

    m = participation.participants(len(client_rows), cfg.train.clients_per_round)
    if section.aggregation == "trimmed_mean" and trimmed_count(section.trim_fraction, m) == 0:
        raise UserError(
            f"robustness.trim_fraction = {section.trim_fraction}: with {m} clients per round it trims "
            f"floor({section.trim_fraction} x {m}) = 0 per side (the plain mean); use trim_fraction >= {1 / m:.3g} or aggregation 'median'"
        )


def trimmed_count(trim_fraction: float, n: int) -> int:
    """trimmed_mean drops floor(trim_fraction * n) values per side and coordinate (the 1e-9
    keeps 0.29 x 100 at 29 despite float rounding)."""
    return int(math.floor(trim_fraction * n + 1e-9))


def needs_split_rounds(federation: Federation) -> bool:
    """The aggregation step runs in Python (`split_rounds`): median / trimmed mean, or bad
    clients whose updates are scaled."""
    section = federation.robustness
    scaled = section.bad_clients > 0 and section.bad_client_mode == "scaled_update"
    return section.aggregation in ("median", "trimmed_mean") or scaled


def bad_client_names(federation: Federation, client_names: Sequence[str]) -> list[str]:
    """The bad clients of the evaluation mode: the first `bad_clients` in the federation's order."""
    return list(client_names)[: federation.robustness.bad_clients]


def flip_bad_labels(federation: Federation, clients: list, flip: Callable[[Any], Any]) -> list:
    """bad_client_mode "label_flip": the bad clients' TRAINING labels become `flip(y)` (the
    app says what flipping means for its targets); `clients` are `client_data.ClientTrainData`.
    Other modes, and the good clients, are returned as they are."""
    section = federation.robustness
    if section.bad_clients == 0 or section.bad_client_mode != "label_flip":
        return clients
    bad = set(bad_client_names(federation, [c.name for c in clients]))
    return [dataclasses.replace(c, y=flip(c.y)) if c.name in bad else c for c in clients]


def robustness_entry(federation: Federation, client_names: Sequence[str]) -> dict[str, Any]:
    """summary.json's "robustness" entry ({} when the section is at its defaults): the
    aggregation and the bad clients by name."""
    section = federation.robustness
    if section == RobustnessSection():
        return {}
    entry: dict[str, Any] = {"aggregation": section.aggregation}
    if section.aggregation == "trimmed_mean":
        entry["trim_fraction"] = section.trim_fraction
    entry["bad_clients"] = bad_client_names(federation, client_names)
    if section.bad_clients > 0:
        entry["bad_client_mode"] = section.bad_client_mode
        if section.bad_client_mode == "scaled_update":
            entry["bad_update_scale"] = section.bad_update_scale
    return {"robustness": entry}


def check_personalization(cfg, federation: Federation, client_rows: dict[str, int]) -> None:
    """Fine-tuning is refused with differential privacy: the fine-tuned model sees the client's
    training rows without clipping or noise and its test metrics are released, so they are
    outside the ε the accountant computes for the global model; a run that prints that ε
    must not release them too."""
    if federation.personalization.epochs > 0 and cfg.privacy.level != "none":
        raise UserError(
            f"config: personalization.epochs = {federation.personalization.epochs} with privacy.level = "
            f"'{cfg.privacy.level}': the fine-tuned models' metrics would be released without differential "
            "privacy; set personalization.epochs = 0 or privacy.level = 'none'"
        )


def describe(federation: Federation) -> dict[str, Any]:
    """The non-default settings, for summary.json and the model card."""
    return {key: getattr(getattr(federation, key.split(".")[0]), key.split(".")[1]) for key in changed_keys(federation)}
