"""Tests for tff_apps.vertical: split-model training against an independent numpy reference.

Synthetic data: 400 aligned rows, a lender with 3 columns and a partner with 5, labels drawn
from a logistic model of all 8 columns (seeded), and 150 held-out rows of the same model. The
reference is plain float64 numpy SGD on the joined table [x_lender, 1, x_partner, 1] (one bias
per party, as the vertical model has), trained on the same batches (`vertical.batch_indices`),
learning rate and epochs. Every TFF call of the main run is recorded with its inputs by
placement, so the tests can say what each party, the coordinator and the lender were given.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import tensorflow_federated as tff
from dp_accounting import dp_event as dpe
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from sklearn.metrics import roc_auc_score

from shared import split_model
from shared.errors import UserError
from tff_apps.learning import vertical
from tff_apps.program import vertical_rounds

ROWS, WIDTHS, HELD = 400, (3, 5), 150
U = 2.0**-24  # float32 unit roundoff
STEP = 2.0 ** -(vertical.SCORE_FRACTION_BITS + 1)  # the fixed-point rounding, per party and row
LOGISTIC = vertical.VerticalSettings(
    kind="logistic", epochs=6, batch_size=64, learning_rate=0.5, l2=1e-3, seed=11, score_bound=32.0
)


def make_data(seed: int = 3, held_out: bool = False):
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(ROWS, sum(WIDTHS)))
    scale = rng.uniform(0.5, 2.0, sum(WIDTHS))
    coef = rng.normal(size=sum(WIDTHS))

    def rows(x, y):
        return [x[:, : WIDTHS[0]].astype(np.float32), x[:, WIDTHS[0] :].astype(np.float32)], y

    x = noise * scale
    y = (rng.random(ROWS) < 1 / (1 + np.exp(-(x @ coef / 2 - 0.3)))).astype(np.float64)
    if not held_out:
        return rows(x, y)
    x = rng.normal(size=(HELD, sum(WIDTHS))) * scale  # drawn after the training rows: those stay as they were
    return rows(x, (rng.random(HELD) < 1 / (1 + np.exp(-(x @ coef / 2 - 0.3)))).astype(np.float64))


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def held_out():
    return make_data(held_out=True)


@dataclasses.dataclass
class Call:
    """One TFF call as made: the computation's name, each parameter's (placement, value)
    (placement "CLIENTS", "SERVER" or None for a computation run by one party) and its output."""

    name: str
    inputs: dict[str, tuple[str | None, object]]
    output: object


def recording(calls: list[Call]):
    """A replacement of `SecureScoreSum._get` (the one door to every computation of the engine)
    whose computations append a `Call` per invocation."""
    original = vertical.SecureScoreSum._get

    def _get(self, name, *shape):
        comp = original(self, name, *shape)
        parameter = comp.type_signature.parameter
        named = list(tff.structure.iter_elements(parameter)) if isinstance(parameter, tff.StructType) else [(name, parameter)]
        placements = [(n, str(t.placement) if isinstance(t, tff.FederatedType) else None) for n, t in named]

        def call(*args):
            out = comp(*args)
            calls.append(Call(name, {n: (where, a) for (n, where), a in zip(placements, args)}, out))
            return out

        return call

    return _get


@pytest.fixture(scope="module")
def logistic_run(runtime, data, held_out, tmp_path_factory):
    parties, y = data
    held_x, held_y = held_out
    run_dir = tmp_path_factory.mktemp("vertical_run")
    evaluated, calls = [], []

    def evaluate(z):  # the lender's code: the summed held-out logits and its own labels
        evaluated.append(z)
        return {"auc": float(roc_auc_score(held_y, z))}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vertical.SecureScoreSum, "_get", recording(calls))
        result = vertical_rounds.train_vertical(
            parties, y, LOGISTIC, evaluate=evaluate, eval_parties=held_x, run_dir=run_dir, progress=False
        )
    return result, run_dir, evaluated, calls


# -- the independent reference -------------------------------------------------------------


def joined(parties):
    """[x_lender, 1, x_partner, 1]: the vertical logistic model as one linear model."""
    blocks = []
    for x in parties:
        blocks += [np.asarray(x, np.float64), np.ones((len(x), 1))]
    return np.hstack(blocks)


def kernel_mask(parties):
    return np.concatenate([np.r_[np.ones(x.shape[1]), 0.0] for x in parties])


def reference_sgd(parties, y, s: vertical.VerticalSettings, noise=None):
    """Centralized float64 SGD on the joined table; returns the trajectory of weights and the
    per-step (batch rows, gradient) needed for the error bound. `noise[k]` is added to dL/dz
    of step k (replaying the noisy gradient the lender released)."""
    xc, mask = joined(parties), kernel_mask(parties)
    w = np.zeros(xc.shape[1])
    steps, k = [], 0
    for epoch in range(1, s.epochs + 1):
        for rows in vertical.batch_indices(len(y), s.batch_size, epoch, s.seed):
            xb = xc[rows]
            g = (1 / (1 + np.exp(-xb @ w)) - y[rows]) / len(rows)
            if noise is not None:
                g = g + noise[k]
            grad = xb.T @ g + s.l2 * mask * w
            new_w = w - s.learning_rate * grad
            steps.append((rows, w, g, grad, new_w))
            w, k = new_w, k + 1
    return w, steps


def error_bound(parties, s: vertical.VerticalSettings, steps):
    """Bound on ||w_vertical - w_reference||_2 from the fixed-point step and float32 rounding.

    Per step, the vertical gradient step is the reference's map G(w) = w - lr * grad f_batch(w)
    plus a perturbation. f_batch is convex and beta-smooth with beta = ||X_b||^2 / (4 n) + l2,
    so G is Lipschitz with L = max(1, lr * beta - 1) and the error obeys
    D_{t+1} <= L D_t + delta_t, where delta_t has
    * the logit error e <= P * 2^-(F+1) (fixed-point rounding, one per party) + float32 rounding
      of each partial score (gamma_{d+1} * sum |x_j w_j| + |b|), which moves sigmoid by <= e/4,
      plus float32 sigmoid/subtract/divide rounding (<= 4u): lr * ||X_b||_2 * sqrt(n) * (e/4 + 4u) / n;
    * float32 rounding of X_b^T g (gamma_n * |X_b|^T |g|) and of the update (2u * (lr |grad| + |w'|)).
    Returns (bound, fixed-point part alone).
    """
    n_parties, f = len(parties), vertical.SCORE_FRACTION_BITS
    d_max = max(x.shape[1] for x in parties)
    xc = joined(parties)
    e_fixed = n_parties * 2.0 ** -(f + 1)

    def gamma(k):
        return k * U / (1 - k * U)

    total = fixed = 0.0
    for rows, w, g, grad, new_w in steps:
        xb, n = xc[rows], len(rows)
        op = np.linalg.norm(xb, 2)
        lipschitz = max(1.0, s.learning_rate * (op**2 / (4 * n) + s.l2) - 1.0)
        e_float = gamma(d_max + 1) * (np.abs(xb) @ np.abs(w)).max()
        per_logit = s.learning_rate * op * math.sqrt(n) / n
        delta = (
            per_logit * ((e_fixed + e_float) / 4 + 4 * U)
            + s.learning_rate * np.linalg.norm(gamma(n) * (np.abs(xb).T @ np.abs(g)))
            + np.linalg.norm(2 * U * (s.learning_rate * np.abs(grad) + np.abs(new_w)))
        )
        total = lipschitz * total + delta
        fixed = lipschitz * fixed + per_logit * e_fixed / 4
    return total, fixed


def flat(party_weights):
    return np.concatenate([np.concatenate([k[:, 0], b]) for k, b in party_weights]).astype(np.float64)


def max_abs_partial_score(parties, steps):
    xc, worst = joined(parties), 0.0
    for rows, w, *_ in steps:
        start = 0
        for x in parties:
            width = x.shape[1] + 1
            worst = max(worst, np.abs(xc[rows, start : start + width] @ w[start : start + width]).max())
            start += width
    return worst


# -- vertical == centralized ---------------------------------------------------------------


def test_vertical_logistic_equals_centralized_up_to_fixed_point(logistic_run, data):
    parties, y = data
    result, *_ = logistic_run
    reference, steps = reference_sgd(parties, y, LOGISTIC)
    assert max_abs_partial_score(parties, steps) < LOGISTIC.score_bound / 2  # the clip never acts
    bound, fixed = error_bound(parties, LOGISTIC, steps)
    diff = np.abs(flat(result.party_weights) - reference).max()
    print(f"vertical vs centralized: max |dw| = {diff:.3e}, bound {bound:.3e} (fixed point {fixed:.3e})")
    assert diff <= bound
    assert fixed >= 0.5 * bound  # the bound is the secure sum's quantization, not slack
    assert bound < 1e-3 * np.abs(reference).max()  # and it is a tight statement
    # predictions: |dz_i| <= ||x_i|| * ||dw||, |dp| <= |dz| / 4
    p_vertical = split_model.predict_proba(result.party_weights, parties, "logistic")
    p_reference = 1 / (1 + np.exp(-joined(parties) @ reference))
    atol = np.linalg.norm(joined(parties), axis=1).max() * bound / 4
    np.testing.assert_allclose(p_vertical, p_reference, rtol=0, atol=atol)
    assert roc_auc_score(y, p_vertical) > 0.8


def test_returned_weights_are_unpadded_keras_order(logistic_run):
    result, *_ = logistic_run
    shapes = [[w.shape for w in party] for party in result.party_weights]
    assert shapes == [[(3, 1), (1,)], [(5, 1), (1,)]]
    assert all(w.dtype == np.float32 for party in result.party_weights for w in party)


def test_mlp_with_adam_trains(runtime, data):
    parties, y = data
    settings = vertical.VerticalSettings(
        kind="mlp", hidden_units=8, optimizer="adam", learning_rate=0.02, epochs=8, seed=5
    )
    result = vertical_rounds.train_vertical(parties, y, settings, progress=False)
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < 0.8 * losses[0]
    shapes = [[w.shape for w in party] for party in result.party_weights]
    assert shapes == [[(3, 8), (8,), (8, 1), (1,)], [(5, 8), (8,), (8, 1), (1,)]]
    assert roc_auc_score(y, split_model.predict_proba(result.party_weights, parties, "mlp")) > 0.8
    # numpy forward = the definition (relu MLP, Keras order)
    k1, b1, k2, b2 = result.party_weights[1]
    expected = np.maximum(parties[1].astype(np.float64) @ k1 + b1, 0) @ k2[:, 0] + b2[0]
    np.testing.assert_allclose(split_model.partial_scores(result.party_weights[1], parties[1], "mlp"), expected, rtol=1e-12)


# -- what each party, the coordinator and the lender are given -----------------------------


def same(given, expected) -> bool:
    """Equal values and shapes, nested lists of arrays compared leaf by leaf."""
    if isinstance(expected, (list, tuple)):
        return isinstance(given, (list, tuple)) and len(given) == len(expected) and all(
            same(g, e) for g, e in zip(given, expected)
        )
    given, expected = np.asarray(given), np.asarray(expected)
    return given.shape == expected.shape and np.array_equal(given, expected)


def padded(x, width):
    return np.pad(x, ((0, 0), (0, width - x.shape[1])))


def test_each_computation_gets_only_its_partys_inputs(logistic_run, data, held_out):
    """Replays every recorded TFF call of the run (training and evaluation). An epoch is one
    chunk here (7 batches). The lender's own computations get only its labels, its noise and
    the batch sizes (`lender_release`) and the z the coordinator decoded (`lender_loss`). In a
    chunk, party p's CLIENTS slots hold exactly party p's own weights, optimizer state, rows of
    the epoch's batches and (zero) noise; the only SERVER inputs are the u the lender released.
    Each evaluation gets each party's current weights and own held-out rows, and the lender's
    evaluate callback only the z that evaluation returned."""
    (parties, y), (held_x, _) = data, held_out
    result, _, evaluated, calls = logistic_run
    width, n_parties = max(WIDTHS), len(WIDTHS)
    train_x, eval_x = [padded(x, width) for x in parties], [padded(x, width) for x in held_x]
    weights = [
        vertical.pad_weights(vertical.initial_weights("logistic", d, 16, LOGISTIC.seed, p), width)
        for p, d in enumerate(WIDTHS)
    ]
    opts = [[np.zeros((), np.float32)] for _ in WIDTHS]
    epoch, u, z, evaluations = 0, None, None, 0
    for call in calls:
        where = {n: w for n, (w, _) in call.inputs.items()}
        given = {n: v for n, (_, v) in call.inputs.items()}
        if call.name in ("lender_release", "lender_loss"):  # run by the lender alone
            epoch += call.name == "lender_release"
            batches = vertical.batch_indices(ROWS, 64, epoch, LOGISTIC.seed)
            order = np.concatenate(batches)
            assert set(where.values()) == {None}
            assert same(given["y"], y[order].astype(np.float32))
            if call.name == "lender_release":
                assert not np.any(given["noise"])
                assert same(given["batch_rows"], np.repeat([len(r) for r in batches], [len(r) for r in batches]).astype(np.float32))
                u = np.asarray(call.output)
                assert same(u, -y[order].astype(np.float32) / given["batch_rows"])
            else:
                assert same(given["z"], z)  # what the coordinator decoded, nothing else
            continue
        clients = {n: v for n, v in given.items() if where[n] == "CLIENTS"}
        server = {n: v for n, v in given.items() if where[n] == "SERVER"}
        assert set(clients) | set(server) == set(given)
        if call.name == "evaluate":
            assert not server
            own = [{"w": weights[p], "x": eval_x[p]} for p in range(n_parties)]
        else:
            assert call.name == "chunk" and set(server) == {"u", "u_last"}
            assert same(server["u"], u[:-len(batches[-1])].reshape(len(batches) - 1, 64)) and same(server["u_last"], u[-len(batches[-1]):])
            own = [
                {
                    "w": weights[p], "opt": opts[p],
                    "x": np.stack([train_x[p][rows] for rows in batches[:-1]]), "x_last": train_x[p][batches[-1]],
                    "noise": np.zeros((len(batches) - 1, 64), np.float32), "noise_last": np.zeros(len(batches[-1]), np.float32),
                }
                for p in range(n_parties)
            ]
        for name, slots in clients.items():
            assert len(slots) == n_parties
            for p in range(n_parties):
                assert same(slots[p], own[p][name]), f"{call.name}: party {p}'s {name} slot holds another value"
        if call.name == "evaluate":
            assert same(evaluated[evaluations], call.output)  # the lender's code gets z only
            evaluations += 1
        else:  # each party's slot of the output is its new weights and state; then the chunk's z
            parties_out, (z_stacked, z_last, _) = call.output
            weights = [[np.asarray(a) for a in w] for w, _ in parties_out]
            opts = [[np.asarray(a) for a in o] for _, o in parties_out]
            z = np.concatenate([np.asarray(z_stacked).reshape(-1), np.asarray(z_last)])
    assert epoch == LOGISTIC.epochs and evaluations == len(evaluated) == LOGISTIC.epochs
    assert [c.name for c in calls].count("chunk") == LOGISTIC.epochs  # 7 batches: one chunk an epoch
    for p, d in enumerate(WIDTHS):
        assert same(vertical.unpad_weights(weights[p], d), result.party_weights[p])


def leaves(value):
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from leaves(getattr(value, f.name))
    elif isinstance(value, dict):
        for v in value.values():
            yield from leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from leaves(v)
    else:
        yield value


def test_coordinator_state_holds_no_party_weights(logistic_run):
    result, *_ = logistic_run
    state = result.coordinator
    assert isinstance(state, vertical.CoordinatorState)
    held = [np.asarray(v, np.float64).ravel() for v in leaves(state)]
    assert all(a.size <= 1 for a in held)  # scalars only: no vectors at all
    held_values = np.concatenate(held)
    for party in result.party_weights:
        for w in party:
            values = w.astype(np.float64).ravel()
            values = values[values != 0]
            assert values.size and not np.isin(values, held_values).any()
            assert not np.isin(w.astype(np.float32).ravel()[w.ravel() != 0], held_values.astype(np.float32)).any()
    assert state.epoch == LOGISTIC.epochs and state.step == LOGISTIC.epochs * 7
    assert len(state.loss_history) == LOGISTIC.epochs


# -- evaluation and scoring through the secure sum -----------------------------------------


def plain_logits(party_weights, matrices, bound=LOGISTIC.score_bound):
    """The old evaluation: each party's clipped partial scores added in the clear, float64."""
    return sum(np.clip(split_model.partial_scores(w, x, "logistic"), -bound, bound) for w, x in zip(party_weights, matrices))


def float32_slack(party_weights, matrices):
    """Float32 rounding of the parties' scores inside TFF: gamma_(d+1) * sum |x_j w_j| + |b| per party."""
    gamma = (max(WIDTHS) + 1) * U / (1 - (max(WIDTHS) + 1) * U)
    return sum(gamma * (np.abs(x) @ np.abs(w[0][:, 0]) + abs(w[1][0])) for w, x in zip(party_weights, matrices))


def test_evaluation_is_the_secure_sum_and_matches_the_plain_sum(logistic_run, held_out):
    """The lender's z is quantized to 2^-16 (it went through the fixed-point secure sum) and
    within the rounding of the plain sum the old evaluation computed; metrics agree to 1e-4."""
    result, _, evaluated, _ = logistic_run
    held_x, held_y = held_out
    z = result.eval_logits
    assert z.dtype == np.float32 and z.shape == (HELD,)
    assert same(evaluated[-1], z)  # the last evaluation is the final model's
    plain = plain_logits(result.party_weights, held_x)
    diff = np.abs(z - plain)
    assert np.all(diff <= len(WIDTHS) * STEP + float32_slack(result.party_weights, held_x))
    assert diff.max() > 0  # not the plain sum
    np.testing.assert_array_equal(z * 2.0**vertical.SCORE_FRACTION_BITS, np.round(z * 2.0**vertical.SCORE_FRACTION_BITS))
    assert abs(roc_auc_score(held_y, z) - roc_auc_score(held_y, plain)) <= 1e-4
    assert np.abs(split_model.sigmoid(z) - split_model.sigmoid(plain)).max() <= 1e-5
    assert result.eval_calls == LOGISTIC.epochs  # one call of 150 rows per evaluation
    assert result.eval_bytes_total == {
        "partial_scores_up": LOGISTIC.epochs * 2 * HELD * 8, "sum_to_lender": LOGISTIC.epochs * HELD * 4,
        "total": LOGISTIC.epochs * HELD * 20,
    }


def test_secure_logits_of_three_parties_in_chunks(runtime, monkeypatch):
    """n parties (a later issue adds partners), rows split over several calls, scores past the
    bound clipped before the sum."""
    rng = np.random.default_rng(7)
    widths, rows, bound = (2, 4, 3), 23, 4.0
    matrices = [rng.normal(size=(rows, d)).astype(np.float32) for d in widths]
    weights = [[rng.normal(size=(d, 1)).astype(np.float32) * 2, np.array([0.5], np.float32)] for d in widths]
    monkeypatch.setattr(vertical_rounds, "EVAL_ROWS", 10)
    calls = []
    monkeypatch.setattr(vertical.SecureScoreSum, "_get", recording(calls))
    settings = dataclasses.replace(LOGISTIC, score_bound=bound)
    z = vertical_rounds.secure_logits(weights, matrices, settings)
    plain = plain_logits(weights, matrices, bound)
    assert np.abs(np.abs(plain - sum(split_model.partial_scores(w, x, "logistic") for w, x in zip(weights, matrices)))).max() > 1
    assert np.all(np.abs(z - plain) <= 3 * STEP + float32_slack(weights, matrices))
    assert [len(c.inputs["x"][1][0]) for c in calls] == [10, 10, 3]
    for c, start in zip(calls, (0, 10, 20)):
        for p, d in enumerate(widths):
            assert same(c.inputs["x"][1][p], padded(matrices[p][start : start + 10], max(widths)))
            assert same(c.inputs["w"][1][p], vertical.pad_weights(weights[p], max(widths)))


def test_secure_score_sum_gives_each_party_its_own_scores(runtime, monkeypatch):
    scores = [np.array([0.25, -3.0, 40.0, 1e-6], np.float32), np.array([1.5, 2.0, -1.0, -50.0], np.float32)]
    calls = []
    monkeypatch.setattr(vertical.SecureScoreSum, "_get", recording(calls))
    z = vertical_rounds.secure_score_sum(scores, 32.0)
    np.testing.assert_allclose(z, [1.75, -1.0, 31.0, -32.0 + 1e-6], rtol=0, atol=2 * STEP)
    assert z[3] == -32.0  # 1e-6 is below the fixed-point step: the sum is quantized
    [call] = calls
    assert call.name == "score_sum" and call.inputs["score_sum"][0] == "CLIENTS"
    assert same(call.inputs["score_sum"][1], scores)
    with pytest.raises(UserError, match="needs 64-bit secure-sum inputs"):  # the engine's secure sum takes 62
        vertical_rounds.secure_score_sum(scores, 1e14)


# -- bytes, determinism, metrics -----------------------------------------------------------


def test_bytes_per_epoch_equal_the_payload_sizes(logistic_run):
    result, *_ = logistic_run
    n, parties = ROWS, 2  # every row is in exactly one batch per epoch
    expected = {
        "partial_scores_up": parties * n * 8,  # int64 fixed-point scores, every party
        "sum_to_lender": n * 4,  # float32 sum, coordinator -> lender
        "gradient_up": n * 4,  # float32 u (the label's part of g~), lender -> coordinator
        "gradient_down": parties * n * 4,  # float32 g~, coordinator -> every party (broadcast)
        "loss_up": 4,  # the lender's epoch loss
    }
    assert result.bytes_per_epoch == {**expected, "total": sum(expected.values())}
    assert result.bytes_total["total"] == LOGISTIC.epochs * sum(expected.values())
    assert all(r["bytes"] == sum(expected.values()) for r in result.history)
    assert result.tff_calls == 3 * LOGISTIC.epochs  # an epoch: the lender's release, one chunk, its loss


def test_same_seed_same_result(runtime, data, logistic_run):
    parties, y = data
    again = vertical_rounds.train_vertical(parties, y, LOGISTIC, progress=False)
    first = logistic_run[0]
    for a, b in zip(flat(first.party_weights), flat(again.party_weights)):
        assert a == b
    assert [r["loss"] for r in first.history] == [r["loss"] for r in again.history]


def test_metrics_jsonl_has_one_record_per_epoch(logistic_run):
    result, run_dir, evaluated, _ = logistic_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, LOGISTIC.epochs + 1))
    assert all({"loss", "bytes", "seconds", "auc"} <= set(r) for r in records)
    assert len(evaluated) == LOGISTIC.epochs  # eval_every = 1
    assert records[-1]["auc"] == roc_auc_score(make_data(held_out=True)[1], result.eval_logits) > 0.8
    assert records[-1]["loss"] < records[0]["loss"]


# -- label protection ----------------------------------------------------------------------


NOISY = dataclasses.replace(LOGISTIC, label_noise_multiplier=1.5)


def test_label_noise_replays_exactly_and_changes_the_partner(runtime, data, logistic_run, monkeypatch):
    """Every party updates with the released noisy gradient; replaying the drawn noise in the
    numpy reference reproduces all weights up to the fixed-point bound."""
    parties, y = data
    draws = []
    original = vertical_rounds.draw_noise

    def recording(rng, std, n):
        noise = original(rng, std, n)
        draws.append((std, n, noise.astype(np.float64)))
        return noise

    monkeypatch.setattr(vertical_rounds, "unseeded_generator", lambda: np.random.default_rng(99))
    monkeypatch.setattr(vertical_rounds, "draw_noise", recording)
    result = vertical_rounds.train_vertical(parties, y, NOISY, progress=False)

    sizes = [len(r) for e in range(1, NOISY.epochs + 1) for r in vertical.batch_indices(ROWS, 64, e, NOISY.seed)]
    assert [n for _, n, _ in draws] == sizes
    assert all(std == NOISY.label_noise_multiplier / n for std, n, _ in draws)  # sensitivity 1/n, exact
    reference, steps = reference_sgd(parties, y, NOISY, noise=[d for *_, d in draws])
    assert max_abs_partial_score(parties, steps) < NOISY.score_bound / 2
    bound, _ = error_bound(parties, NOISY, steps)
    assert np.abs(flat(result.party_weights) - reference).max() <= bound

    clean_partner = flat(logistic_run[0].party_weights[1:])
    assert np.abs(flat(result.party_weights[1:]) - clean_partner).max() > 100 * bound


def test_dp_noise_is_not_seeded_and_partial_noise_is_reported(runtime, data):
    parties, y = data
    settings = dataclasses.replace(NOISY, partial_noise_std=0.5, epochs=2)
    first = vertical_rounds.train_vertical(parties, y, settings, progress=False)
    second = vertical_rounds.train_vertical(parties, y, settings, progress=False)
    assert np.abs(flat(first.party_weights) - flat(second.party_weights)).max() > 1e-4
    assert first.partial_noise["std"] == 0.5 and first.partial_noise["epsilon"] is None
    assert first.partial_noise["reason"]
    assert first.label_dp["adjacency"] == "one customer's label"
    assert [r["label_epsilon"] for r in first.history] == [
        vertical_rounds.label_dp_epsilon(1.5, e, settings.delta, "rdp") for e in (1, 2)
    ]


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_label_epsilon_equals_dp_accounting(accountant):
    sigma, epochs, delta = 1.5, 30, 1e-5
    event = dpe.SelfComposedDpEvent(dpe.GaussianDpEvent(sigma), epochs)
    if accountant == "rdp":
        independent = rdp_privacy_accountant.RdpAccountant().compose(event).get_epsilon(delta)
    else:
        independent = pld_privacy_accountant.PLDAccountant().compose(event).get_epsilon(delta)
    ours = vertical_rounds.label_dp_epsilon(sigma, epochs, delta, accountant)
    assert ours == pytest.approx(independent, rel=0.01)
    assert vertical_rounds.label_dp_epsilon(sigma, epochs + 10, delta, accountant) > ours


def test_label_dp_report_of_a_run(logistic_run):
    assert logistic_run[0].label_dp is None and logistic_run[0].partial_noise is None


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p, y: (p, y, {"batch_size": 500}), "batch_size = 500"),
        (lambda p, y: ([p[0], p[1][:-1]], y, {}), "different row counts"),
        (lambda p, y: ([p[0], np.where(np.arange(5) == 2, np.nan, p[1])], y, {}), "non-finite"),
        (lambda p, y: (p, np.where(np.arange(ROWS) == 0, 2.0, y), {}), "0 or 1"),
        (lambda p, y: (p, y, {"kind": "tree"}), "kind"),
        (lambda p, y: (p, y, {"accountant": "moments"}), "accountant"),
    ],
)
def test_user_errors(data, change, message):
    parties, y, overrides = change(*data)
    with pytest.raises(UserError, match=message):
        vertical_rounds.train_vertical(parties, y, dataclasses.replace(LOGISTIC, **overrides), progress=False)


def test_programming_errors_are_value_errors(data):
    parties, y = data
    with pytest.raises(ValueError, match="2-D"):
        vertical_rounds.train_vertical([parties[0][:, 0], parties[1]], y, LOGISTIC, progress=False)
    with pytest.raises(ValueError, match="shapes"):
        split_model.partial_scores([np.zeros((4, 1), np.float32), np.zeros(1, np.float32)], parties[0], "logistic")
    with pytest.raises(ValueError, match="shapes"):
        split_model.partial_scores([], parties[0], "mlp")
