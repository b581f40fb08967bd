"""Job configuration: TOML files validated once into typed, frozen sections.

Resolution order: the app's `default.toml`, then the user's job file (`--config`),
then `--set section.key=value` overrides. Every section is a frozen dataclass; a
field's type annotation and its `metadata` ("choices", "min", "max", "exclusive_min")
are the whole schema, so the rules live next to the defaults they constrain. Every field
also carries metadata "doc", what the key means: `tff_apps.config_docs` renders the
configuration reference (docs/configuration.md) from them; validation ignores it.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from shared.errors import UserError
from tff_apps.learning.federation import ClientsSection, CommunicationSection, PersonalizationSection, RobustnessSection
from tff_apps.learning.federation import SECTIONS as FEDERATION_SECTIONS
from tff_apps.privacy.dp_config import PrivacySection


@dataclass(frozen=True)
class JobSection:
    """Who runs, with which seed, and where the outputs go."""

    app: str = field(default="", metadata={"doc": "The app to run when none is named on the command line (`tff-apps run --config FILE`)."})
    seed: int = field(default=0, metadata={"min": 0, "doc": (
        "Seed of every random choice: splits, sampling, shuffling, initial weights. DP noise and secure-aggregation "
        "keys come from the operating system's secure random source instead."
    )})
    runs_dir: str = field(default="runs", metadata={"doc": (
        "Where run folders go (`<runs_dir>/<app>/<run_id>/`), with the run registry `runs.sqlite`."
    )})
    run_id: str = field(default="", metadata={"doc": (
        "The run folder's name (`--run-id`); empty = a timestamp. A run id that succeeded is not retrained; a failed "
        "or interrupted one resumes from its last checkpoint."
    )})
    description: str = field(default="", metadata={"doc": "Free text kept with the run; it may change when a run id is resumed."})
    init_from: str = field(default="", metadata={"doc": (
        "Warm start: empty = off; `latest` = the export of the latest succeeded run of this app in `runs_dir`; or an "
        "export path (a run's `export/` folder, a servable folder or a version folder). Finance refuses it."
    )})
    sites: str = field(default="", metadata={"doc": (
        "Train across sites: a sites.toml listing each site's name, address, data folder and certificates "
        "(`--sites`, docs/sites.md); the coordinator then never reads a row. Empty = simulation."
    )})


@dataclass(frozen=True)
class TrainSection:
    """The federated algorithm and its schedule (parameter names as in the papers)."""

    algorithm: str = field(default="fedavg", metadata={
        "choices": ("fedavg", "fedavg_unweighted", "fedprox"),
        "doc": "`fedavg` (mean weighted by examples), `fedavg_unweighted` (every client counts once) or `fedprox`.",
    })
    rounds: int = field(default=20, metadata={"min": 1, "max": 100_000, "doc": (
        "Federated rounds (finance: epochs over the aligned training customers)."
    )})
    clients_per_round: int = field(default=0, metadata={"min": 0, "doc": (
        "Clients sampled per round, uniformly without replacement, seeded; 0 = every client."
    )})
    local_epochs: int = field(default=1, metadata={"min": 1, "max": 1000, "doc": (
        "Passes over its training rows each client makes per round."
    )})
    local_steps: int = field(default=0, metadata={"min": 0, "doc": (
        "If > 0: that many batches per round instead of `local_epochs` (rows drawn without replacement, seeded)."
    )})
    batch_size: int = field(default=16, metadata={"min": 1, "doc": "Client batch size (finance: customers per step)."})
    client_optimizer: str = field(default="sgd", metadata={"choices": ("sgd", "adam"), "doc": (
        "The clients' optimizer, restarted every round (finance: every party's optimizer)."
    )})
    client_learning_rate: float = field(default=0.1, metadata={"exclusive_min": 0.0, "doc": (
        "Client step size (finance: every party's learning rate)."
    )})
    proximal_strength: float = field(default=0.01, metadata={"min": 0.0, "doc": "FedProx μ (`algorithm = \"fedprox\"` only)."})
    server_optimizer: str = field(default="sgd", metadata={"choices": ("sgd", "adam", "yogi"), "doc": (
        "The server's optimizer on the aggregated update: `sgd` (with `server_momentum`), `adam` or `yogi`."
    )})
    server_learning_rate: float = field(default=1.0, metadata={"exclusive_min": 0.0, "doc": (
        "Server step size (1.0 with SGD is plain FedAvg)."
    )})
    server_momentum: float = field(default=0.0, metadata={"min": 0.0, "max": 0.999, "doc": "Server SGD momentum."})
    eval_every: int = field(default=5, metadata={"min": 1, "doc": (
        "Evaluate the global model every N rounds and after the last (finance: epochs between evaluations)."
    )})
    checkpoint_every: int = field(default=5, metadata={"min": 0, "doc": (
        "Save a checkpoint every N rounds and after the last; 0 = none (a resumed run then starts over)."
    )})
    engine: str = field(default="auto", metadata={"choices": ("auto", "tff", "grouped"), "doc": (
        "`auto`: `grouped` wherever it runs the job, else `tff` (the reason is in run.log; summary.json's `engine` "
        "names the one that ran); `tff`: TFF's stock simulation, one runtime slot per client; `grouped`: a round's "
        "clients trained in one TFF call, the same mathematics (tff_apps/learning/grouped.py; docs/engine-speed.md)."
    )})


@dataclass(frozen=True)
class PreprocessSection:
    """How features are normalized: federated statistics, or each site's own (to compare)."""

    normalization: str = field(default="federated", metadata={"choices": ("federated", "per_site"), "doc": (
        "`federated`: statistics from every site's aggregates through secure sum; `per_site`: each site its own "
        "(to compare). Unused by finance, whose parties encode their own columns."
    )})
    bounds: dict[str, list[float]] = field(default_factory=dict, metadata={"doc": (
        "Public range `[low, high]` of each raw feature column (a categorical column: its lowest and highest "
        "code), known without reading the data, e.g. `{ age = [20, 90], cp = [1, 4] }`. Needed for every column "
        "by `privacy.preprocessing = \"dp\"` and `privacy.profiles = \"dp\"` (values are clipped to it); the "
        "`heart` source has its own (docs/privacy.md). Overrides the source's ranges column by column."
    )})


@dataclass(frozen=True)
class EvaluateSection:
    """Held-out split and the baselines computed in the same run."""

    test_fraction: float = field(default=0.25, metadata={"exclusive_min": 0.0, "max": 0.9, "doc": (
        "Held-out share: healthcare, stratified and seeded at each site; finance, of the aligned customers "
        "(stratified on the label). Traffic splits time 70 / 10 / 20 instead."
    )})
    centralized_baseline: bool = field(default=True, metadata={"doc": (
        "Also train the same model on the pooled training rows (the only code that pools them)."
    )})
    local_baseline: bool = field(default=True, metadata={"doc": (
        "Also train one model per site on its own rows (finance: the lender alone on its own columns)."
    )})
    baseline_epochs: int = field(default=0, metadata={"min": 0, "doc": (
        "Baseline training epochs; 0 = `train.rounds` × `train.local_epochs` (finance: `train.rounds`). Traffic "
        "baselines take as many steps as federated training instead."
    )})


@dataclass(frozen=True)
class ExportSection:
    """Whether to write a SavedModel for serving."""

    enabled: bool = field(default=True, metadata={"doc": (
        "Write the export: a SavedModel as TF Serving reads it, its model card and weights."
    )})


ENGINE_SECTIONS: dict[str, type] = {
    "job": JobSection,
    "train": TrainSection,
    "preprocess": PreprocessSection,
    "evaluate": EvaluateSection,
    "export": ExportSection,
    "privacy": PrivacySection,  # level "none" by default: a job without [privacy] is unchanged
    **FEDERATION_SECTIONS,  # off by default too (tff_apps/learning/federation.py)
}


@dataclass(frozen=True)
class JobConfig:
    """A resolved, validated job: engine sections plus the app's own `data` and `model`."""

    job: JobSection
    data: Any
    model: Any
    train: TrainSection
    preprocess: PreprocessSection
    evaluate: EvaluateSection
    export: ExportSection
    privacy: PrivacySection = PrivacySection()
    communication: CommunicationSection = CommunicationSection()
    clients: ClientsSection = ClientsSection()
    robustness: RobustnessSection = RobustnessSection()
    personalization: PersonalizationSection = PersonalizationSection()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def replace(self, section: str, **changes: Any) -> "JobConfig":
        """A copy with some keys of one section changed (used for baselines and tests)."""
        updated = dataclasses.replace(getattr(self, section), **changes)
        return dataclasses.replace(self, **{section: updated})


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """Reads a TOML file, turning every failure into one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{what} {path}: not valid TOML ({err})") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path}: not a UTF-8 text file") from None


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value); values are TOML, bare words are strings."""
    name, sep, raw_value = text.partition("=")
    section, dot, key = (part.strip() for part in name.strip().partition("."))
    if not sep or not dot or not section or not key:
        raise UserError(f"--set {text!r}: expected section.key=value, e.g. --set train.rounds=10")
    raw_value = raw_value.strip()
    try:
        value = tomllib.loads(f"v = {raw_value}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value  # a bare word such as fedprox is meant as a string
    return section, key.strip(), value


def merge_layers(*layers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Later layers win key by key within a section."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            if not isinstance(values, dict):
                raise UserError(f"config: '{section}' must be a [section] table, got a value")
            merged.setdefault(section, {}).update(values)
    return merged


def resolve(
    default_file: Path,
    app_sections: dict[str, type],
    user_file: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
) -> JobConfig:
    """Default file, then the user's job file, then overrides -> a validated JobConfig."""
    layers = [read_toml(default_file, "app default config")]
    if user_file is not None:
        layers.append(read_toml(user_file, "job file"))
    schema = {**ENGINE_SECTIONS, **app_sections}
    override_layer: dict[str, dict[str, Any]] = {}
    for text in overrides:
        section, key, value = parse_override(text)
        if _is_string_field(schema, section, key) and not isinstance(value, str):
            value = text.partition("=")[2].strip()  # `--set data.positive_label=1` means "1"
        override_layer.setdefault(section, {})[key] = value
    layers.append(override_layer)
    return build(merge_layers(*layers), app_sections)


def _is_string_field(schema: dict[str, type], section: str, key: str) -> bool:
    if section not in schema:
        return False
    return typing.get_type_hints(schema[section]).get(key) is str


def build(raw: dict[str, dict[str, Any]], app_sections: dict[str, type]) -> JobConfig:
    schema = {**ENGINE_SECTIONS, **app_sections}
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise UserError(
            f"config: unknown section [{unknown[0]}]; known sections: {', '.join(sorted(schema))}"
        )
    sections = {name: build_section(name, cls, raw.get(name, {})) for name, cls in schema.items()}
    return JobConfig(**sections)


def build_section(section: str, cls: type, values: dict[str, Any]):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            raise UserError(
                f"config: unknown key '{section}.{key}'; [{section}] takes: {', '.join(fields)}"
            )
    checked = {
        key: check_value(f"{section}.{key}", values[key], hints[key], fields[key].metadata)
        for key in values
    }
    return cls(**checked)


def check_value(name: str, value: Any, expected: Any, rules: typing.Mapping[str, Any]) -> Any:
    value = check_type(name, value, expected)
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"config: {name} = {value!r} must be a finite number")
    if "choices" in rules and value not in rules["choices"]:
        allowed = ", ".join(repr(c) for c in rules["choices"])
        raise UserError(f"config: {name} = {value!r} is not allowed; choose one of {allowed}")
    if "min" in rules and value < rules["min"]:
        raise UserError(f"config: {name} = {value!r} is too small; it must be >= {rules['min']}")
    if "exclusive_min" in rules and value <= rules["exclusive_min"]:
        raise UserError(f"config: {name} = {value!r} must be > {rules['exclusive_min']}")
    if "max" in rules and value > rules["max"]:
        raise UserError(f"config: {name} = {value!r} is too large; it must be <= {rules['max']}")
    return value


def check_type(name: str, value: Any, expected: Any) -> Any:
    """Accepts exactly the TOML type a field needs (an int where a float is wanted too)."""
    origin = typing.get_origin(expected)
    if origin is dict:
        _, value_type = typing.get_args(expected)
        if not isinstance(value, dict):
            raise UserError(f"config: {name} must be a table (e.g. {{ age = [20, 90] }}), got {value!r}")
        return {str(key): check_type(f"{name}.{key}", item, value_type) for key, item in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list):
            raise UserError(f"config: {name} must be a list of {item_type.__name__}, got {value!r}")
        return [check_type(f"{name}[{i}]", item, item_type) for i, item in enumerate(value)]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool):
        raise UserError(f"config: {name} must be an integer, got {value!r}")
    if not isinstance(value, expected):
        raise UserError(
            f"config: {name} must be {_type_word(expected)}, got {type(value).__name__} {value!r}"
        )
    return value


def _type_word(expected: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        expected, expected.__name__
    )
