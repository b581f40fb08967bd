"""The graph models' [train] defaults (traffic/splits.py `with_kind_defaults`, docs/traffic.md
"Graph models"): batch 8 and client learning rate 0.005 when the job leaves the key at the default
file's (the MLP's) value; a value the user set otherwise stays; the MLP's job is unchanged."""

from __future__ import annotations

import pytest

from tff_apps.program.job import resolve_job
from traffic.app import APP
from traffic.splits import GRAPH_TRAIN_DEFAULTS, with_kind_defaults


def _cfg(*overrides: str):
    return resolve_job("traffic", None, list(overrides))[1]


@pytest.mark.parametrize("kind", ["gcn_gru", "dcrnn"])
def test_a_graph_model_takes_its_training_defaults(kind):
    cfg = with_kind_defaults(_cfg(f"model.kind={kind}"), APP.default_config)
    assert (cfg.train.batch_size, cfg.train.client_learning_rate) == (8, 0.005) == tuple(GRAPH_TRAIN_DEFAULTS.values())
    # everything else is the default job's
    assert (cfg.train.rounds, cfg.train.local_steps, cfg.train.client_optimizer) == (30, 50, "adam")
    assert (cfg.train.server_optimizer, cfg.train.server_learning_rate) == ("sgd", 1.0)
    # summary.json's config shows what the job trained with
    assert APP.public_config(_cfg(f"model.kind={kind}"))["train"]["batch_size"] == 8


def test_a_value_the_user_set_stays():
    cfg = with_kind_defaults(
        _cfg("model.kind=dcrnn", "train.batch_size=16", "train.client_learning_rate=0.01"), APP.default_config
    )
    assert (cfg.train.batch_size, cfg.train.client_learning_rate) == (16, 0.01)
    cfg = with_kind_defaults(_cfg("model.kind=gcn_gru", "train.batch_size=4"), APP.default_config)
    assert (cfg.train.batch_size, cfg.train.client_learning_rate) == (4, 0.005)


@pytest.mark.parametrize("kind", ["mlp", "gru"])
def test_the_sensor_models_keep_the_default_job(kind):
    raw = _cfg(f"model.kind={kind}")
    assert with_kind_defaults(raw, APP.default_config) is raw
    assert (raw.train.batch_size, raw.train.client_learning_rate) == (64, 0.002)
    assert APP.public_config(raw) == raw.to_dict()
