"""Tests for finance.model: per-party encoders, bottom models, party export and vertical scoring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from finance.model import PARTY_EXPORT_KIND, PartyEncoder, build_bottom_model, export_party, partial_score, sigmoid
from finance.scoring import load_party, score_vertical
from shared.errors import UserError
from tff_apps.program.predict import predict_csv


def score_two(lender_export, partner_export, lender_csv, partner_csv, id_column, output):
    """`score_vertical` for a lender and one partner."""
    return score_vertical(
        {"lender": lender_export, "partner": partner_export}, {"lender": lender_csv, "partner": partner_csv},
        id_column, output,
    )


def _weights(kind: str, d: int, h: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(d, 1), (1,)] if kind == "logistic" else [(d, h), (h,), (h, 1), (1,)]
    return [rng.normal(size=shape).astype(np.float32) for shape in shapes]


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": [30.0, 45.0, np.nan, 52.0, 33.0, 61.0],
            "region": ["north", "south", "north", "", "east", "NA"],
            "amount": [1000.0, 2500.0, 1800.0, 900.0, 4000.0, 1200.0],
        }
    )


# --------------------------------------------------------------------------- encoder


def test_encoder_fits_only_the_given_rows():
    frame = _frame()
    encoder = PartyEncoder.fit(frame.iloc[:3], ["region"])
    assert encoder.vocabulary == {"region": ["north", "south"]}  # rows 3.. ("", east, NA) unseen
    assert encoder.mean["age"] == pytest.approx(37.5)  # NaN ignored
    assert encoder.std["age"] == pytest.approx(7.5)
    assert encoder.mean["amount"] == pytest.approx(np.mean([1000, 2500, 1800]))
    assert encoder.feature_names == ["age", "region=north", "region=south", "amount"]
    x = encoder.transform(frame)
    assert x.dtype == np.float32 and x.shape == (6, 4)
    assert x[2, 0] == 0.0  # missing -> mean -> 0
    assert np.array_equal(x[3:, 1:3], np.zeros((3, 2)))  # "", unseen "east", "NA" -> all zeros
    assert np.array_equal(x[:3, 1:3], [[1, 0], [0, 1], [1, 0]])
    assert x[0, 0] == pytest.approx((30 - 37.5) / 7.5)
    # Missing tokens never enter the vocabulary; a constant column gets std 1.
    other = PartyEncoder.fit(pd.DataFrame({"c": ["NA", "x", ""], "k": [2.0, 2.0, 2.0]}), ["c"])
    assert other.vocabulary == {"c": ["x"]} and other.std == {"k": 1.0}
    assert PartyEncoder.from_json(encoder.to_json()) == encoder


def test_encoder_numpy_and_tensorflow_transforms_agree():
    frame = _frame()
    encoder = PartyEncoder.fit(frame.iloc[:4], ["region"])
    columns = {
        "age": tf.constant(frame["age"].to_numpy(np.float32)),
        "region": tf.constant(frame["region"].to_numpy(dtype=str)),
        "amount": tf.constant(frame["amount"].to_numpy(np.float32)),
    }
    tf_x = tf.function(encoder.tf_transform)(columns).numpy()
    np.testing.assert_allclose(tf_x, encoder.transform(frame), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- bottom models


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_partial_score_matches_the_keras_bottom_model(kind):
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    weights = _weights(kind, 5, 3, seed=1)
    model = build_bottom_model(kind, 5, 3, weights=weights)
    assert [w.shape for w in model.get_weights()] == [w.shape for w in weights]
    np.testing.assert_allclose(model(x).numpy()[:, 0], partial_score(weights, x), atol=1e-5)
    with pytest.raises(ValueError, match="shapes"):
        build_bottom_model(kind, 4, 3, weights=weights)


# --------------------------------------------------------------------------- export and scoring


LENDER_CSV = "id,age,region,extra\nA1,30,north,x\nA2,45,south,y\nA3,,north,z\nA4,52,west,w\n"
PARTNER_CSV = "id,balance,housing\n a2 ,100.5,own\nA1,20,rent\nZ9,7,own\nA4,,free\n"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    lender_train = pd.DataFrame({"age": [30.0, 45.0, 28.0, 60.0], "region": ["north", "south", "north", "east"]})
    partner_train = pd.DataFrame({"balance": [10.0, 200.0, 50.0, 0.0], "housing": ["own", "rent", "own", "free"]})
    lender_enc = PartyEncoder.fit(lender_train, ["region"])
    partner_enc = PartyEncoder.fit(partner_train, ["housing"])
    lender_w = _weights("logistic", lender_enc.n_outputs, 1, seed=0)
    partner_w = _weights("mlp", partner_enc.n_outputs, 4, seed=1)
    lender_model = build_bottom_model("logistic", lender_enc.n_outputs, 1, lender_w)
    partner_model = build_bottom_model("mlp", partner_enc.n_outputs, 4, partner_w)
    lender_dir = export_party(root / "lender", "lender", lender_enc, lender_model, {"run_id": "r1"})
    partner_dir = export_party(root / "partner", "partner", partner_enc, partner_model, {"run_id": "r1"})
    return {
        "root": root, "lender": (lender_dir, lender_enc, lender_w), "partner": (partner_dir, partner_enc, partner_w),
    }


def test_party_export_round_trip_gives_the_partial_scores(exports):
    export_dir, encoder, weights = exports["lender"]
    card = json.loads((export_dir / "model_card.json").read_text())
    assert card["export_kind"] == PARTY_EXPORT_KIND and card["party"] == "lender" and card["run_id"] == "r1"
    assert card["input_types"] == {"age": "float", "region": "string"} and card["output"] == "partial_score"
    rows = pd.DataFrame({"age": [30.0, np.nan, 70.0], "region": ["north", "south", "mars"]})
    serving = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    out = serving(age=tf.constant(rows["age"].to_numpy(np.float32)), region=tf.constant(rows["region"].to_numpy(str)))
    expected = partial_score(weights, encoder.transform(rows))
    np.testing.assert_allclose(out["partial_score"].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(load_party(export_dir)(rows), expected, atol=1e-5)


def running_worker(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_score_vertical_writes_sigmoid_of_the_secure_sum_for_exactly_the_shared_ids(exports, tmp_path, monkeypatch):
    """Each party's CLIENTS value is its own export's scores of its own shared rows; the
    probabilities are sigmoid of the decoded secure sum only (within the fixed-point step of
    the plain sum); the command's TFF worker is gone when it returns."""
    from tff_apps.learning import vertical
    from tff_apps.runtime.context import Runtime

    lender_csv, partner_csv = tmp_path / "l.csv", tmp_path / "p.csv"
    lender_csv.write_text(LENDER_CSV)
    partner_csv.write_text(PARTNER_CSV)
    out = tmp_path / "scores.csv"
    (lender_dir, lender_enc, lender_w), (partner_dir, partner_enc, partner_w) = exports["lender"], exports["partner"]
    sums, workers = [], []
    original_get, original_enter = vertical.SecureScoreSum._get, Runtime.__enter__

    def recording_get(self, name, *shape):
        comp = original_get(self, name, *shape)

        def call(scores):
            sums.append((name, self.bound, [np.array(s) for s in scores], np.asarray(comp(scores))))
            return sums[-1][-1]

        return call

    def recording_enter(self):
        entered = original_enter(self)
        workers.append(self.worker_pid)
        return entered

    monkeypatch.setattr(vertical.SecureScoreSum, "_get", recording_get)
    monkeypatch.setattr(Runtime, "__enter__", recording_enter)
    summary = score_two(lender_dir, partner_dir, lender_csv, partner_csv, "id", out)
    assert summary["match_count"] == 3 and summary["rows_written"] == 3
    scored = pd.read_csv(out)
    assert list(scored.columns) == ["id", "probability"]
    assert scored["id"].tolist() == ["A1", "A2", "A4"]  # the lender's spelling, no Z9 / A3
    lender_rows = pd.DataFrame({"age": [30.0, 45.0, 52.0], "region": ["north", "south", "west"]})
    partner_rows = pd.DataFrame({"balance": [20.0, 100.5, np.nan], "housing": ["rent", "own", "free"]})
    own = [partial_score(lender_w, lender_enc.transform(lender_rows)), partial_score(partner_w, partner_enc.transform(partner_rows))]
    [(name, bound, given, z)] = sums
    assert name == "score_sum" and bound == 32.0  # these exports have no clip: the default bound
    for party in (0, 1):  # party p's slot: its own model's scores of its own rows, nothing else
        np.testing.assert_allclose(given[party], own[party], rtol=0, atol=1e-5)
    np.testing.assert_allclose(scored["probability"].to_numpy(), sigmoid(z.astype(np.float64)), rtol=1e-12)  # (CSV)
    step = 2.0**-17  # fixed-point rounding per party; a probability moves by at most a quarter of z's error
    assert 0 < np.abs(z - (given[0] + given[1])).max() <= 2 * step
    np.testing.assert_allclose(scored["probability"].to_numpy(), sigmoid(own[0] + own[1]), rtol=0, atol=2 * step / 4 + 1e-6)
    assert len(workers) == 1 and workers[0] is not None and not running_worker(workers[0])
    # The engine's predict command also scores a party export (string inputs).
    assert predict_csv(lender_dir, lender_csv, tmp_path / "partial.csv") == 4


def test_score_vertical_errors_are_user_errors(exports, tmp_path):
    lender_csv, partner_csv, renamed = tmp_path / "l.csv", tmp_path / "p.csv", tmp_path / "p2.csv"
    lender_csv.write_text(LENDER_CSV)
    partner_csv.write_text(PARTNER_CSV)
    renamed.write_text(PARTNER_CSV.replace("balance", "bal"))
    lender_dir, partner_dir = exports["lender"][0], exports["partner"][0]
    out = tmp_path / "o.csv"
    with pytest.raises(UserError, match=r"nope\.csv: file not found"):
        score_two(lender_dir, partner_dir, tmp_path / "nope.csv", partner_csv, "id", out)
    with pytest.raises(UserError, match=r"l\.csv: the customer-ID column 'cid' \(data\.id_column\) is missing"):
        score_two(lender_dir, partner_dir, lender_csv, partner_csv, "cid", out)
    with pytest.raises(UserError, match=r"p2\.csv: column 'balance' is missing; the file has columns id, bal, housing"):
        score_two(lender_dir, partner_dir, lender_csv, renamed, "id", out)
    with pytest.raises(UserError, match=r"is the partner's model, given for the lender; .*\(swap the two\)"):
        score_two(partner_dir, lender_dir, lender_csv, partner_csv, "id", out)
    _, partner_enc, partner_w = exports["partner"]
    bounded = export_party(  # the same partner model, exported with a clip the lender's export lacks
        tmp_path / "bounded", "partner", partner_enc, build_bottom_model("mlp", partner_enc.n_outputs, 4, partner_w),
        {"run_id": "r1"}, score_bound=8.0,
    )
    with pytest.raises(UserError, match=r"\(score_bound 0\.0\) and .*bounded \(score_bound 8\.0\) were exported with different"):
        score_two(lender_dir, bounded, lender_csv, partner_csv, "id", out)
    with pytest.raises(UserError, match="not an exported model"):
        score_two(tmp_path, partner_dir, lender_csv, partner_csv, "id", out)
    with pytest.raises(UserError, match=r"missing\.csv: folder .* does not exist"):
        score_two(lender_dir, partner_dir, lender_csv, partner_csv, "id", tmp_path / "no" / "missing.csv")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_card.json").write_text(json.dumps({"inputs": {}, "output": "probability"}))
    with pytest.raises(UserError, match="is not a party's bottom model"):
        load_party(other)
    assert not out.exists()
