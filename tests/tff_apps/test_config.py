"""Tests for tff_apps.config and tff_apps.job.resolve_job (no TensorFlow needed).

Layers are written as TOML files under tmp_path; a small app schema (`ToyData`,
`ToyModel`) stands in for an app's own sections, and the real healthcare
`DataConfig` / `ModelConfig` are used where their fields matter.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from healthcare.data import DataConfig
from healthcare.model import ModelConfig
from shared.errors import UserError
from tff_apps import config as config_lib
from tff_apps.config import JobConfig, TrainSection, build, parse_override, resolve
from tff_apps.program.job import resolve_job


@dataclass(frozen=True)
class ToyData:
    source: str = field(default="a", metadata={"choices": ("a", "b")})
    n_clients: int = field(default=3, metadata={"min": 2, "max": 10})
    alpha: float = field(default=0.5, metadata={"exclusive_min": 0.0})
    columns: list[str] = field(default_factory=list)
    shuffle: bool = True


@dataclass(frozen=True)
class ToyModel:
    width: int = field(default=4, metadata={"min": 1})


TOY = {"data": ToyData, "model": ToyModel}
HEALTHCARE = {"data": DataConfig, "model": ModelConfig}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def default_file(tmp_path: Path) -> Path:
    return write(
        tmp_path / "default.toml",
        """
[data]
n_clients = 4
alpha = 0.25
[train]
rounds = 5
batch_size = 8
client_learning_rate = 0.5
""",
    )


def resolve_toy(default_file: Path, overrides=(), user_file=None) -> JobConfig:
    return resolve(default_file, TOY, user_file, overrides)


def user_error(fn, *args) -> str:
    """Runs fn, expects a UserError, returns its message (which must be one line)."""
    with pytest.raises(UserError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- resolution order -----------------------------------------------------------


def test_layers_resolve_default_then_job_file_then_overrides(default_file, tmp_path):
    job = write(
        tmp_path / "job.toml",
        """
[train]
rounds = 7
local_epochs = 3
[data]
alpha = 2
""",
    )
    cfg = resolve_toy(default_file, ["train.rounds=9", "model.width=6"], job)
    assert cfg.train.rounds == 9  # default 5 < job 7 < --set 9
    assert cfg.train.local_epochs == 3  # job file only
    assert cfg.train.batch_size == 8  # default.toml only: the job file did not wipe [train]
    assert cfg.train.client_learning_rate == 0.5
    assert cfg.train.eval_every == TrainSection().eval_every  # nowhere: dataclass default
    assert cfg.data == ToyData(n_clients=4, alpha=2.0)
    assert cfg.model == ToyModel(width=6)
    assert isinstance(cfg.data.alpha, float)


def test_later_override_of_same_key_wins(default_file):
    cfg = resolve_toy(default_file, ["train.rounds=3", "train.rounds=11"])
    assert cfg.train.rounds == 11


def test_default_layer_alone(default_file):
    cfg = resolve_toy(default_file)
    assert (cfg.train.rounds, cfg.train.batch_size, cfg.data.n_clients) == (5, 8, 4)
    assert cfg.job == config_lib.JobSection()


# -- unknown names ---------------------------------------------------------------


def test_unknown_section_in_job_file(default_file, tmp_path):
    job = write(tmp_path / "job.toml", "[trian]\nrounds = 3\n")
    message = user_error(resolve_toy, default_file, (), job)
    assert "trian" in message and "train" in message  # names it and lists the known ones


def test_unknown_section_in_override(default_file):
    message = user_error(resolve_toy, default_file, ["optim.lr=1"])
    assert "optim" in message


@pytest.mark.parametrize(
    "override, name",
    [("train.round=3", "train.round"), ("data.n_client=3", "data.n_client"), ("model.depth=2", "model.depth")],
)
def test_unknown_key_names_section_dot_key(default_file, override, name):
    message = user_error(resolve_toy, default_file, [override])
    assert f"'{name}'" in message


def test_section_that_is_a_value_not_a_table(default_file, tmp_path):
    job = write(tmp_path / "job.toml", 'train = "fast"\n')
    message = user_error(resolve_toy, default_file, (), job)
    assert "train" in message


# -- types -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, name",
    [
        ('train.rounds="10"', "train.rounds"),  # string for int
        ("train.rounds=true", "train.rounds"),  # bool for int
        ("train.rounds=2.5", "train.rounds"),  # float for int
        ("train.rounds=2.0", "train.rounds"),  # a whole float is still not an int
        ("train.client_learning_rate=fast", "train.client_learning_rate"),  # string for float
        ("train.client_learning_rate=true", "train.client_learning_rate"),  # bool for float
        ("export.enabled=1", "export.enabled"),  # int for bool
        ("data.shuffle=yes", "data.shuffle"),  # bare word for bool
    ],
)
def test_wrong_type_names_the_key(default_file, override, name):
    message = user_error(resolve_toy, default_file, [override])
    assert name in message


def test_int_accepted_for_float_and_converted(default_file):
    cfg = resolve_toy(default_file, ["train.client_learning_rate=1", "train.proximal_strength=0"])
    assert cfg.train.client_learning_rate == 1.0 and type(cfg.train.client_learning_rate) is float
    assert cfg.train.proximal_strength == 0.0 and type(cfg.train.proximal_strength) is float


def test_int_stays_int(default_file):
    cfg = resolve_toy(default_file, ["train.rounds=12"])
    assert cfg.train.rounds == 12 and type(cfg.train.rounds) is int


# -- ranges and choices ------------------------------------------------------------


@pytest.mark.parametrize(
    "override, name, bound",
    [
        ("train.rounds=0", "train.rounds", ">= 1"),  # min
        ("train.rounds=100001", "train.rounds", "<= 100000"),  # max
        ("train.client_learning_rate=0", "train.client_learning_rate", "> 0.0"),  # exclusive_min
        ("train.client_learning_rate=-0.5", "train.client_learning_rate", "> 0.0"),
        ("train.proximal_strength=-0.01", "train.proximal_strength", ">= 0.0"),
        ("train.server_momentum=0.9995", "train.server_momentum", "<= 0.999"),
        ("evaluate.test_fraction=0.95", "evaluate.test_fraction", "<= 0.9"),
        ("job.seed=-1", "job.seed", ">= 0"),
        ("data.n_clients=1", "data.n_clients", ">= 2"),  # app section rules too
        ("data.alpha=0", "data.alpha", "> 0.0"),
    ],
)
def test_out_of_range_names_key_and_bound(default_file, override, name, bound):
    message = user_error(resolve_toy, default_file, [override])
    assert name in message and bound in message


@pytest.mark.parametrize(
    "override, attr, value",
    [
        ("train.rounds=1", "rounds", 1),
        ("train.rounds=100000", "rounds", 100000),
        ("train.server_momentum=0.999", "server_momentum", 0.999),
        ("train.proximal_strength=0.0", "proximal_strength", 0.0),
        ("train.client_learning_rate=1e-9", "client_learning_rate", 1e-9),
    ],
)
def test_values_on_the_bound_are_accepted(default_file, override, attr, value):
    assert getattr(resolve_toy(default_file, [override]).train, attr) == value


@pytest.mark.parametrize(
    "override, name",
    [
        ("evaluate.test_fraction=nan", "evaluate.test_fraction"),
        ("train.client_learning_rate=nan", "train.client_learning_rate"),
        ("train.server_momentum=nan", "train.server_momentum"),
    ],
)
def test_nan_is_out_of_range(default_file, override, name):
    message = user_error(resolve_toy, default_file, [override])
    assert name in message


@pytest.mark.parametrize(
    "override, name",
    [
        ("train.algorithm=fedsgd", "train.algorithm"),
        ("train.server_optimizer=ADAM", "train.server_optimizer"),  # choices are case-sensitive
        ("data.source=c", "data.source"),
        ("preprocess.normalization=global", "preprocess.normalization"),
    ],
)
def test_choice_not_allowed_names_key(default_file, override, name):
    message = user_error(resolve_toy, default_file, [override])
    assert name in message


def test_choice_error_lists_allowed_values(default_file):
    message = user_error(resolve_toy, default_file, ["train.algorithm=fedsgd"])
    assert all(c in message for c in ("'fedavg'", "'fedavg_unweighted'", "'fedprox'"))


def test_allowed_choices_resolve(default_file):
    cfg = resolve_toy(default_file, ["train.algorithm=fedprox", "train.server_optimizer=yogi"])
    assert (cfg.train.algorithm, cfg.train.server_optimizer) == ("fedprox", "yogi")


# -- list[str] fields ------------------------------------------------------------


def test_list_of_str_field_accepts_list(tmp_path):
    default = write(tmp_path / "d.toml", "[data]\nsource = 'csv'\n")
    job = write(tmp_path / "job.toml", '[data]\nfeature_columns = ["age", "chol"]\n')
    cfg = resolve(default, HEALTHCARE, job, ['data.categorical_columns=["cp"]'])
    assert cfg.data.feature_columns == ["age", "chol"]
    assert cfg.data.categorical_columns == ["cp"]
    assert cfg.data.zero_means_missing == []


@pytest.mark.parametrize(
    "override, name",
    [
        ('data.feature_columns=["age", 3]', "data.feature_columns[1]"),  # bad item, with its index
        ("data.feature_columns=[true]", "data.feature_columns[0]"),
        ('data.feature_columns="age"', "data.feature_columns"),  # a string is not a list
        ("data.categorical_columns=age", "data.categorical_columns"),  # neither is a bare word
    ],
)
def test_list_of_str_items_are_validated(tmp_path, override, name):
    default = write(tmp_path / "d.toml", "")
    message = user_error(resolve, default, HEALTHCARE, None, [override])
    assert name in message


# -- parse_override --------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train.rounds=10", ("train", "rounds", 10)),
        ("train.algorithm=fedprox", ("train", "algorithm", "fedprox")),  # bare word -> str
        ('train.algorithm="fedprox"', ("train", "algorithm", "fedprox")),  # TOML string
        ("job.description='two words'", ("job", "description", "two words")),
        ('data.feature_columns=["a","b"]', ("data", "feature_columns", ["a", "b"])),
        ("train.client_learning_rate=0.05", ("train", "client_learning_rate", 0.05)),
        ("export.enabled=false", ("export", "enabled", False)),
        (" train.rounds = 10 ", ("train", "rounds", 10)),
        ("data.path=/tmp/a b.csv", ("data", "path", "/tmp/a b.csv")),
        ("job.description=a=b", ("job", "description", "a=b")),  # only the first '=' splits
    ],
)
def test_parse_override(text, expected):
    section, key, value = parse_override(text)
    assert (section, key, value) == expected
    assert type(value) is type(expected[2])


@pytest.mark.parametrize("text", ["rounds=10", "=3", "train.rounds", ".rounds=3", "train.=3", ""])
def test_parse_override_rejects_malformed(text):
    message = user_error(parse_override, text)
    assert "section.key=value" in message


# -- files -------------------------------------------------------------------------


def test_job_file_not_valid_toml(default_file, tmp_path):
    job = write(tmp_path / "broken.toml", "[train\nrounds = = 3\n")
    message = user_error(resolve_toy, default_file, (), job)
    assert str(job) in message and "TOML" in message


def test_job_file_missing(default_file, tmp_path):
    missing = tmp_path / "nope.toml"
    message = user_error(resolve_toy, default_file, (), missing)
    assert str(missing) in message and "not found" in message


def test_job_file_not_utf8(default_file, tmp_path):
    job = tmp_path / "latin1.toml"
    job.write_bytes(b'[job]\ndescription = "caf\xe9"\n')
    message = user_error(resolve_toy, default_file, (), job)
    assert str(job) in message


def test_job_file_that_is_a_folder(default_file, tmp_path):
    message = user_error(resolve_toy, default_file, (), tmp_path)
    assert str(tmp_path) in message


# -- round trip ----------------------------------------------------------------------


def test_to_toml_round_trips_through_build(tmp_path):
    default = write(tmp_path / "d.toml", "")
    cfg = resolve(
        default,
        HEALTHCARE,
        None,
        [
            "job.seed=42",
            "job.description='a \"quoted\" run'",
            "data.source=csv",
            'data.feature_columns=["age","chol","cp"]',
            'data.categorical_columns=["cp"]',
            "data.alpha=0.3",
            "model.kind=mlp",
            "model.l2=1e-4",
            "train.algorithm=fedprox",
            "train.client_learning_rate=0.1",
            "train.server_momentum=0.9",
            "evaluate.local_baseline=false",
            "export.enabled=false",
        ],
    )
    text = cfg.to_toml()
    again = build(tomllib.loads(text), HEALTHCARE)
    assert again == cfg
    assert again.to_toml() == text
    # and through a job file, on top of a default that says otherwise
    other_default = write(tmp_path / "other.toml", "[train]\nrounds = 99\n[model]\nkind = 'logistic'\n")
    job = write(tmp_path / "job.toml", text)
    assert resolve(other_default, HEALTHCARE, job) == cfg


def test_healthcare_default_round_trips():
    from healthcare.app import APP

    cfg = resolve(APP.default_config, APP.sections)
    assert cfg.train.rounds == 30 and cfg.data.n_clients == 5  # values from default.toml
    assert build(tomllib.loads(cfg.to_toml()), APP.sections) == cfg


def test_replace_changes_one_key():
    cfg = build({}, TOY)
    changed = cfg.replace("train", rounds=2)
    assert changed.train.rounds == 2 and cfg.train.rounds == TrainSection().rounds
    assert dataclasses.replace(changed.train, rounds=cfg.train.rounds) == cfg.train


# -- resolve_job ------------------------------------------------------------------------


def test_resolve_job_takes_app_from_job_file(tmp_path):
    job = write(tmp_path / "job.toml", '[job]\napp = "healthcare"\n[train]\nrounds = 3\n')
    app, cfg = resolve_job(None, str(job), ["train.local_epochs=4"])
    assert app.name == "healthcare"
    assert cfg.job.app == "healthcare"
    assert (cfg.train.rounds, cfg.train.local_epochs) == (3, 4)
    assert cfg.train.batch_size == 16  # from healthcare/default.toml
    assert isinstance(cfg.data, DataConfig) and isinstance(cfg.model, ModelConfig)


def test_resolve_job_named_app_fills_job_app(tmp_path):
    app, cfg = resolve_job("healthcare", None, ["train.rounds=2"])
    assert app.name == "healthcare" and cfg.job.app == "healthcare" and cfg.train.rounds == 2


def test_resolve_job_without_job_app_fails_clearly(tmp_path):
    job = write(tmp_path / "job.toml", "[train]\nrounds = 3\n")
    message = user_error(resolve_job, None, str(job), [])
    assert str(job) in message and "job.app" in message


def test_resolve_job_with_empty_job_app_fails_clearly(tmp_path):
    job = write(tmp_path / "job.toml", '[job]\napp = ""\n')
    message = user_error(resolve_job, None, str(job), [])
    assert "job.app" in message


def test_resolve_job_without_app_or_file():
    message = user_error(resolve_job, None, None, [])
    assert "--config" in message


def test_resolve_job_missing_file(tmp_path):
    missing = tmp_path / "none.toml"
    message = user_error(resolve_job, None, str(missing), [])
    assert str(missing) in message


def test_resolve_job_unknown_app(tmp_path):
    job = write(tmp_path / "job.toml", '[job]\napp = "astronomy"\n')
    message = user_error(resolve_job, None, str(job), [])
    assert "astronomy" in message and "healthcare" in message


def test_resolve_job_app_mismatch(tmp_path):
    job = write(tmp_path / "job.toml", '[job]\napp = "finance"\n')
    message = user_error(resolve_job, "healthcare", str(job), [])
    assert "finance" in message and "healthcare" in message


def test_resolve_job_job_not_a_table(tmp_path):
    job = write(tmp_path / "job.toml", 'job = "healthcare"\n')
    message = user_error(resolve_job, None, str(job), [])
    assert "job" in message


def test_nan_literal_parses_as_float():
    # guards the NaN xfail above: the override really delivers a float NaN
    _, _, value = parse_override("evaluate.test_fraction=nan")
    assert isinstance(value, float) and math.isnan(value)


@pytest.mark.parametrize(
    "override, section, key, expected",
    [
        ("data.positive_label=1", "data", "positive_label", "1"),
        ("data.positive_label=yes", "data", "positive_label", "yes"),
        ('data.positive_label="M"', "data", "positive_label", "M"),
        ("job.run_id=2026-11-24", "job", "run_id", "2026-11-24"),
        ("job.runs_dir=/tmp/runs", "job", "runs_dir", "/tmp/runs"),
    ],
)
def test_string_fields_take_the_override_text_as_typed(override, section, key, expected):
    from healthcare.app import APP

    cfg = resolve(APP.default_config, APP.sections, None, [override])
    assert getattr(getattr(cfg, section), key) == expected


def test_job_file_values_keep_their_toml_type(default_file, tmp_path):
    # Only command-line overrides are text typed by a person; a job file's 5 is an integer.
    job = write(tmp_path / "job.toml", "[job]\nrun_id = 5\n")
    assert "job.run_id" in user_error(resolve_toy, default_file, (), job)
