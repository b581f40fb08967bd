"""Tests for finance.evaluate: metrics and the two baselines on the default German credit job."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from finance.alignment import align, aligned, split_aligned
from finance.data import DataConfig, load
from finance.evaluate import binary_metrics, centralized_baseline, lender_alone_baseline, vertical_metrics
from finance.model import ModelConfig, PartyEncoder

DEFAULT = tomllib.loads((Path(__file__).resolve().parents[2] / "finance" / "default.toml").read_text())


def test_binary_metrics_auc_ks_gini():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    m = binary_metrics(y, p)
    assert m["auc"] == pytest.approx(8 / 9)
    assert m["gini"] == pytest.approx(2 * 8 / 9 - 1)
    assert m["ks"] == pytest.approx(2 / 3)
    assert m["n"] == 6 and m["positives"] == 3


@pytest.fixture(scope="module")
def encoded():
    """The default job's aligned train/test customers, each party encoded by its own encoder."""
    seed, test_fraction = DEFAULT["job"]["seed"], DEFAULT["evaluate"]["test_fraction"]
    data = load(DataConfig(**DEFAULT["data"]), seed)
    lender, partner = aligned(data, align(data))
    train, test = split_aligned(lender.labels, test_fraction, seed)
    lender_enc = PartyEncoder.fit(lender.features.iloc[train], lender.categorical)
    partner_enc = PartyEncoder.fit(partner.features.iloc[train], partner.categorical)
    return {
        "xl": lender_enc.transform(lender.features.iloc[train]),
        "xp": partner_enc.transform(partner.features.iloc[train]),
        "y": lender.labels[train],
        "xlt": lender_enc.transform(lender.features.iloc[test]),
        "xpt": partner_enc.transform(partner.features.iloc[test]),
        "yt": lender.labels[test],
    }


def test_baselines_on_the_default_job_joined_beats_the_lender_alone(encoded):
    e, train = encoded, DEFAULT["train"]
    settings = dict(
        model_cfg=ModelConfig(**DEFAULT["model"]), epochs=train["rounds"], batch_size=train["batch_size"],
        learning_rate=train["client_learning_rate"], optimizer=train["client_optimizer"], seed=DEFAULT["job"]["seed"],
    )
    joined = centralized_baseline([e["xl"], e["xp"]], e["y"], [e["xlt"], e["xpt"]], e["yt"], **settings)
    alone = lender_alone_baseline(e["xl"], e["y"], e["xlt"], e["yt"], **settings)
    for report in (joined, alone):
        assert 0.55 < report["auc"] < 0.9
        assert 0.1 < report["ks"] < 0.7
        assert report["gini"] == pytest.approx(2 * report["auc"] - 1)
        assert report["n"] == 240
    assert alone["auc"] + 0.05 < joined["auc"]  # ANCHORS: lender-only ~0.69, joined ~0.78
    assert joined["auc"] > 0.72
    # Same settings, same numbers.
    again = lender_alone_baseline(e["xl"], e["y"], e["xlt"], e["yt"], **settings)
    assert again["auc"] == alone["auc"]


@pytest.fixture(scope="module")
def runtime():
    from tff_apps.runtime.context import Runtime

    with Runtime() as rt:
        yield rt


def test_vertical_metrics_from_the_secure_sum_match_the_plain_sum(runtime, encoded):
    """The lender's metrics from the securely summed test logits (all it receives) equal, to
    1e-4, the old evaluation that added both parties' partial scores in the clear."""
    from tff_apps.learning.vertical import SCORE_FRACTION_BITS, VerticalSettings
    from tff_apps.program.vertical_rounds import secure_logits

    e = encoded
    rng = np.random.default_rng(0)
    lender_w = [rng.normal(size=(e["xl"].shape[1], 1)).astype(np.float32) * 0.3, np.array([0.1], np.float32)]
    partner_w = [rng.normal(size=(e["xp"].shape[1], 1)).astype(np.float32) * 0.3, np.array([-0.3], np.float32)]
    z = secure_logits([lender_w, partner_w], [e["xlt"], e["xpt"]], VerticalSettings(score_bound=32.0))
    plain = (e["xlt"].astype(np.float64) @ lender_w[0] + e["xpt"].astype(np.float64) @ partner_w[0]).ravel() - 0.2
    assert np.abs(plain).max() < 32  # the clip does not act: the plain sum is the old evaluation
    assert 0 < np.abs(z - plain).max() <= 2 * 2.0 ** -(SCORE_FRACTION_BITS + 1) + 1e-5
    secure, old = vertical_metrics(z, e["yt"]), binary_metrics(e["yt"], 1 / (1 + np.exp(-plain)))
    for key in ("auc", "ks", "gini", "accuracy", "brier"):
        assert secure[key] == pytest.approx(old[key], abs=1e-4), key
    assert secure["n"] == 240 and 0.3 < secure["auc"] < 1.0
    with pytest.raises(ValueError, match="240 logits for 3 labels"):
        vertical_metrics(z, e["yt"][:3])
