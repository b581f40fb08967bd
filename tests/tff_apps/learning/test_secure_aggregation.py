"""Secure aggregation in app jobs (`privacy.secure_aggregation`).

* config: the new keys, their defaults and the combinations refused before a run folder;
* "simulated" (TFF SecureSumFactory) and "masked" (Bonawitz et al., shared/secagg.py) give
  the same model within the SUM of both modes' quantization bounds, derived here from the
  two quantizers as documented (TFF's `secure_quantized_sum`: 32-bit over +-B*W, float32
  in and out; secagg: fixed point 2^-s) - per round in lockstep at the process level, and
  over a 3-round healthcare job with 10 hospitals;
* masked: dropouts up to n - t are survived, more fail the round with SecAggError and no
  update (process and job);
* distributed DP ("simulated" at client level): the effective noise multiplier read from
  TFF's own aggregator measurements is the planned one, and the job's ε matches an
  independent dp_accounting computation.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from healthcare.model import ModelConfig, tff_model_fn
from shared import secagg_ring
from shared.errors import UserError
from tests.cli import tff_apps_in_process
from tff_apps.privacy import secure_settings
from tff_apps.learning import factory
from tff_apps.program import round_loop
from tff_apps.learning import client_data
from tff_apps.config import TrainSection
from tff_apps.program.job import resolve_job, run_job
from tff_apps.privacy.dp_config import PrivacySection
from tff_apps.privacy.secure_settings import SecureAggregation
from tff_apps.learning.client_data import ClientTrainData, client_dataset

F32 = 2.0**-24  # float32 unit roundoff
SECAGG_MAX = 2**32 - 1  # TFF's secure_quantized_sum levels
FAST = [
    "evaluate.centralized_baseline=false",
    "evaluate.local_baseline=false",
    "export.enabled=false",
    "train.eval_every=100",
    "train.checkpoint_every=0",
]


# -- the two quantizers' error on the mean --------------------------------------------------------


def ratio_error(e_num: float, e_den: float, num_max: float, den: float) -> float:
    """max |N'/D' - N/D| given |N' - N| <= e_num, |D' - D| <= e_den < D, |N| <= num_max."""
    return (e_num + num_max / den * e_den) / (den - e_den)


def masked_mean_bound(secure: SecureAggregation, n: int, weight_sum: float) -> float:
    """Masked: the value coordinates w*u/W are quantized with step 2^-s (secagg's
    quantization_error_bound, times W), the weight coordinate to round(w/W * floor(B 2^s))
    (half a level, times W / floor(B 2^s)); float64 encoding and decoding; the mean is cast to
    float32 for the finalizer."""
    cfg = secure.secagg_config(n)
    level = math.floor(secure.bound * 2.0**secure.scale_bits)
    num_max = secure.value_bound * n
    e_num = secure.max_weight * (secagg_ring.quantization_error_bound(cfg, n) + n * secure.bound * 2.0**-50)
    e_den = secure.max_weight * n * (0.5 / level + 2.0**-50)
    return ratio_error(e_num, e_den, num_max, weight_sum) + num_max / weight_sum * F32 * 1.01


def simulated_mean_bound(secure: SecureAggregation, n: int, weight_sum: float) -> float:
    """Simulated (TFF 0.87 `secure_quantized_sum`): per client w*u rounded to float32 and its
    clip threshold B*W held in float32 (4 * B*W * 2^-24 covers both), half a level of
    2*B*W / (2^32 - 1); the dequantized sum is cast to float32; the weight sum likewise
    (unweighted: an exact integer count); the mean divided in float32."""
    bound = secure.value_bound
    num_max = bound * n
    e_num = n * (0.5 * 2 * bound / SECAGG_MAX + 4 * bound * F32) + num_max * F32 * 1.01
    e_den = n * (0.5 * secure.max_weight / SECAGG_MAX) + n * secure.max_weight * F32 if secure.weighted else 0.0
    return ratio_error(e_num, e_den, num_max, weight_sum) + num_max / weight_sum * F32 * 1.01


def finalizer_rounding(weights: np.ndarray) -> float:
    """Server SGD (learning rate 1) rounds w - mean to float32 in both modes."""
    return 2.0 * F32 * (float(np.max(np.abs(weights))) + 1.0)


def flat(weights) -> np.ndarray:
    return np.concatenate([np.asarray(t, np.float64).ravel() for t in weights.trainable])


# -- config ---------------------------------------------------------------------------------------


def test_secure_aggregation_keys_defaults_and_refusals():
    _, cfg = resolve_job("healthcare", None, [])
    section = cfg.privacy
    assert (section.secure_aggregation, section.secure_bound, section.secure_scale_bits, section.secure_threshold) == (
        "none", 1.0, 20, 0.67,
    )
    _, cfg = resolve_job(
        "healthcare", None,
        ["privacy.secure_aggregation=masked", "privacy.secure_bound=0.5", "privacy.secure_scale_bits=16"],
    )
    assert cfg.privacy.secure_aggregation == "masked" and cfg.privacy.secure_bound == 0.5
    for bad, words in [
        ("privacy.secure_aggregation=secret", "'none', 'simulated', 'masked'"),
        ("privacy.secure_threshold=0.5", "must be > 0.5"),
        ("privacy.secure_bound=0", "must be > 0"),
        ("privacy.secure_scale_bits=63", "<= 62"),
    ]:
        with pytest.raises(UserError, match=words.replace("(", r"\(").replace(".", r"\.")):
            resolve_job("healthcare", None, [bad])

    train = TrainSection(algorithm="fedavg", local_epochs=2, clients_per_round=0)
    rows = {f"c{i}": 20 + i for i in range(10)}
    masked = secure_settings.secure_aggregation(PrivacySection(secure_aggregation="masked"), train, rows)
    assert masked.weighted and masked.max_weight == 2 * 29 and masked.value_bound == 58.0
    assert masked.participants == 10 and masked.threshold(10) == 7 and masked.ring_bits(10) == 32
    assert masked.secagg_config(10).threshold == 7
    wide = secure_settings.secure_aggregation(PrivacySection(secure_aggregation="masked", secure_scale_bits=40), train, rows)
    assert wide.ring_bits(10) == 64
    unweighted = secure_settings.secure_aggregation(
        PrivacySection(secure_aggregation="simulated"), TrainSection(algorithm="fedavg_unweighted"), rows
    )
    assert not unweighted.weighted and unweighted.max_weight == 1.0
    record = secure_settings.secure_aggregation(
        PrivacySection(level="record", noise_multiplier=1.0, secure_aggregation="masked"), train, rows
    )
    assert not record.weighted and record.max_weight == 1.0  # DP-SGD reports weight 1
    assert secure_settings.secure_aggregation(PrivacySection(), train, rows) is None

    refused = [
        (dict(level="client", clipping="adaptive", noise_multiplier=1.0, secure_aggregation="masked"), train,
         "privacy.clipping = 'fixed'"),
        (dict(level="client", clipping="adaptive", noise_multiplier=1.0, secure_aggregation="simulated"), train,
         "privacy.clipping = 'fixed'"),
        (dict(secure_aggregation="masked"), TrainSection(clients_per_round=1), "at least 2 clients"),
        (dict(secure_aggregation="masked", secure_bound=1e6, secure_scale_bits=62), train, "64-bit"),
        (dict(secure_aggregation="masked", secure_bound=0.1, secure_scale_bits=1), train, "rounds to 0"),
    ]
    for fields, train_section, words in refused:
        with pytest.raises(UserError, match=words) as error:
            secure_settings.secure_aggregation(PrivacySection(**fields), train_section, rows)
        assert "\n" not in str(error.value)


def test_a_refused_combination_exits_2_with_one_line_and_no_run_folder(tmp_path):
    result = tff_apps_in_process(
        "run", "healthcare", "--set", f'job.runs_dir="{tmp_path}"', "--run-id", "bad",
        "--set", "privacy.level=client", "--set", "privacy.clipping=adaptive", "--set", "privacy.noise_multiplier=1",
        "--set", "privacy.secure_aggregation=masked",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "privacy.secure_aggregation" in message and "'fixed'" in message
    assert not (tmp_path / "healthcare" / "bad").exists()


# -- processes: lockstep rounds and dropouts --------------------------------------------------------

D = 3
N = 10
LOCAL = TrainSection(algorithm="fedavg", batch_size=8, local_epochs=2, client_learning_rate=0.1)


def synthetic_clients() -> list[ClientTrainData]:
    clients = []
    for i in range(N):
        rng = np.random.default_rng(100 + i)
        n = 5 + 2 * i  # 5 .. 23 rows: weights differ
        x = rng.standard_normal((n, D)) + 0.3 * i / N
        logits = x @ np.array([1.5, -1.0, 0.5]) - 0.2
        y = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(np.float32).reshape(-1, 1)
        clients.append(ClientTrainData(f"c{i}", x.astype(np.float32), y))
    return clients


@pytest.fixture(scope="module")
def lockstep(runtime):
    clients = synthetic_clients()
    rows = {c.name: len(c.x) for c in clients}
    model_fn = tff_model_fn(ModelConfig(kind="logistic"), D, 0)
    built = {}
    for mode, engine in (("simulated", "tff"), ("masked", "tff"), ("masked", "grouped")):
        # 12 fractional bits: the masked quantization is visible (~1e-4), float32 noise is not
        section = PrivacySection(secure_aggregation=mode, secure_bound=0.5, secure_scale_bits=12)
        spec = secure_settings.secure_aggregation(section, LOCAL, rows)
        train = dataclasses.replace(LOCAL, engine=engine)
        built[mode if engine == "tff" else f"{mode}_{engine}"] = (spec, factory.build_learning_process(train, model_fn, secure=spec))
    weight_sum = float(sum(LOCAL.local_epochs * n for n in rows.values()))
    return clients, built, weight_sum


def datasets(clients, round_number: int):
    return [client_dataset(c, LOCAL, client_data.round_seed(0, round_number, i)) for i, c in enumerate(clients)]


def test_masked_and_simulated_rounds_agree_within_both_quantization_bounds(lockstep):
    clients, built, weight_sum = lockstep
    (spec, simulated), (masked_spec, masked) = built["simulated"], built["masked"]
    assert masked_spec.max_weight == 2 * 23 and masked_spec.secagg_config(N).threshold == 7
    assert type(masked).__name__ == "MaskedLearningProcess"
    state = masked.initialize()
    sim_state = simulated.initialize()
    bound = masked_mean_bound(masked_spec, N, weight_sum) + simulated_mean_bound(spec, N, weight_sum)
    differences = []
    for round_number in (1, 2, 3):
        # both rounds start from the masked model: each round's difference is aggregation only
        sim_state = simulated.set_model_weights(sim_state, masked.get_model_weights(state))
        data = datasets(clients, round_number)
        sim_out = simulated.next(sim_state, data)
        out = masked.next(state, data)
        new_masked = flat(masked.get_model_weights(out.state))
        new_simulated = flat(simulated.get_model_weights(sim_out.state))
        assert not np.array_equal(new_masked, flat(masked.get_model_weights(state)))  # it trains
        difference = float(np.max(np.abs(new_masked - new_simulated)))
        assert difference <= bound + finalizer_rounding(new_masked), (round_number, difference, bound)
        differences.append(difference)
        report = out.metrics["secure_aggregation"]
        assert report["secagg_survivors"] == N and report["secagg_dropped"] == 0
        assert report["secagg_seconds"] > 0 and report["secagg_bytes"] > 0
        assert out.metrics["client_work"]["train"]["num_examples"] == weight_sum
        state, sim_state = out.state, sim_out.state
    assert max(differences) > 0  # the two quantizers really differ


@pytest.mark.parametrize("process", ["masked", "masked_grouped"])
def test_masked_round_survives_n_minus_t_dropouts_and_fails_beyond_without_an_update(lockstep, process):
    clients, built, _ = lockstep
    spec, masked = built[process]
    state = masked.initialize()
    before = flat(masked.get_model_weights(state))
    data = datasets(clients, 1)
    t = spec.threshold(N)
    dropped = list(range(N - t))  # 3 of 10 vanish after sharing keys
    out = masked.next(state, data, dropouts_after_sharing=dropped)
    assert out.metrics["secure_aggregation"]["secagg_dropped"] == len(dropped)
    # their updates are not in the mean: the same as a round of the survivors alone
    survivors_only = masked.next(state, data[len(dropped):])
    survivors_weight = float(sum(LOCAL.local_epochs * len(c.x) for c in clients[len(dropped):]))
    difference = np.max(np.abs(flat(out.state.global_model_weights) - flat(survivors_only.state.global_model_weights)))
    two_bounds = 2 * masked_mean_bound(spec, N, survivors_weight)
    assert difference <= two_bounds + finalizer_rounding(flat(out.state.global_model_weights))

    with pytest.raises(secagg_ring.SecAggError, match=f"the threshold is {t}; no sum is returned"):
        masked.next(state, data, dropouts_after_sharing=list(range(N - t + 1)))
    assert np.array_equal(flat(masked.get_model_weights(state)), before)  # no update applied
    again = masked.next(state, data)  # the state is intact and usable
    assert again.metrics["secure_aggregation"]["secagg_survivors"] == N


# -- healthcare jobs ----------------------------------------------------------------------------------


def run_in_process(monkeypatch, runs: Path, run_id: str, overrides: list[str]):
    """A healthcare job in this process (no second TensorFlow import); returns the summary,
    the final model weights and the learning process's outputs of every round."""
    captured: dict = {"outputs": []}
    original = round_loop.run_rounds

    def capture(process, *args, **kwargs):
        result = original(_Recorder(process, captured["outputs"]), *args, **kwargs)
        captured["weights"] = flat(result.weights)
        return result

    monkeypatch.setattr(round_loop, "run_rounds", capture)
    app, cfg = resolve_job("healthcare", None, [*FAST, f'job.runs_dir="{runs}"', *overrides])
    _, summary = run_job(app, cfg.replace("job", run_id=run_id))
    monkeypatch.setattr(round_loop, "run_rounds", original)
    return summary, captured


class _Recorder:
    """The process as the program sees it, keeping each round's output."""

    def __init__(self, process, outputs: list):
        self._process, self._outputs = process, outputs

    def initialize(self):
        return self._process.initialize()

    def next(self, state, data):
        output = self._process.next(state, data)
        self._outputs.append(output)
        return output

    def get_model_weights(self, state):
        return self._process.get_model_weights(state)


def test_masked_healthcare_job_gives_the_simulated_model_within_quantization_error(tmp_path, monkeypatch):
    rounds, n = 3, 10
    job = [f"data.n_clients={n}", f"train.rounds={rounds}", "privacy.secure_scale_bits=12"]
    simulated, sim = run_in_process(monkeypatch, tmp_path, "sim", [*job, "privacy.secure_aggregation=simulated"])
    masked, mask = run_in_process(
        monkeypatch, tmp_path, "mask", [*job, "privacy.secure_aggregation=masked", "export.enabled=true"]
    )
    assert simulated["secure_sum"] == "simulated (TFF SecureSumFactory)"
    assert masked["secure_sum"].startswith("masked (Bonawitz et al.")
    assert masked["status"] == simulated["status"] == "succeeded" and masked["rounds"] == rounds

    app, cfg = resolve_job("healthcare", None, [*job, "privacy.secure_aggregation=masked"])
    rows = app.client_rows(cfg, app.prepare(cfg))
    spec = secure_settings.secure_aggregation(cfg.privacy, cfg.train, rows)
    weight_sum = float(sum(cfg.train.local_epochs * r for r in rows.values()))
    # Each round adds at most both quantization bounds (and float32 rounding of the update);
    # a round does not amplify a difference in its starting model (a few small SGD steps on
    # the convex logistic loss, per-coordinate clipping and averaging are non-expansive).
    per_round = masked_mean_bound(spec, n, weight_sum) + simulated_mean_bound(
        dataclasses.replace(spec, mode="simulated"), n, weight_sum
    ) + finalizer_rounding(mask["weights"])
    difference = float(np.max(np.abs(mask["weights"] - sim["weights"])))
    assert 0 < difference <= rounds * per_round, (difference, rounds * per_round)

    metrics = [json.loads(line) for line in (tmp_path / "healthcare" / "mask" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["secagg_survivors"] == n and r["secagg_bytes"] > 0 and r["secagg_seconds"] > 0 for r in metrics)
    card = json.loads((tmp_path / "healthcare" / "mask" / "export" / "healthcare" / "1" / "model_card.json").read_text())
    statement = card["privacy"]["secure_aggregation"]
    assert statement["mode"] == "masked" and statement["scale_bits"] == 12 and "7 of 10" in statement["threshold"]
    assert "Bonawitz" in statement["protocol"]


def test_a_masked_round_with_too_many_dropouts_fails_the_job_cleanly(tmp_path, monkeypatch):
    from tff_apps.learning.grouped_process import GroupedProcess

    original = GroupedProcess.next  # the default engine ("auto") runs masked rounds grouped
    calls = []

    def drop_in_round_2(self, state, data, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # 5 hospitals, t = 4: two vanish
            kwargs["dropouts_after_sharing"] = (0, 3)
        return original(self, state, data, **kwargs)

    monkeypatch.setattr(GroupedProcess, "next", drop_in_round_2)
    with pytest.raises(secagg_ring.SecAggError, match="3 of 5 clients responded, the threshold is 4"):
        run_in_process(monkeypatch, tmp_path, "drop", ["train.rounds=3", "privacy.secure_aggregation=masked"])
    run_dir = tmp_path / "healthcare" / "drop"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("SecAggError: secure aggregation failed")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in metrics] == [1]  # round 2 applied nothing and was not recorded
    assert not (run_dir / "export").exists()


def test_distributed_dp_job_runs_the_planned_noise_and_reports_its_epsilon(tmp_path, monkeypatch):
    z, n, m, rounds, delta = 1.0, 5, 3, 3, 1e-5
    summary, captured = run_in_process(
        monkeypatch, tmp_path, "ddp",
        [f"train.rounds={rounds}", f"train.clients_per_round={m}", "train.local_epochs=1",
         "privacy.level=client", "privacy.clipping=fixed", f"privacy.noise_multiplier={z}",
         "privacy.secure_aggregation=simulated"],
    )
    assert summary["status"] == "succeeded"
    assert summary["secure_sum"].startswith("simulated (TFF DistributedDpSumFactory")
    # The mechanism that ran, from TFF's own aggregator measurements: every client adds
    # discrete Gaussian noise of integer scale ceil(scaled_local_stddev); the sum of m has
    # stddev sqrt(m) * that (Gaussian approximation), over the sensitivity after rounding.
    effective = []
    for output in captured["outputs"]:
        ddp = output.metrics["aggregator"]["mean_value"]
        assert ddp["actual_num_clients"] == m and ddp["l2_clip"] == pytest.approx(1.0)
        effective.append(math.sqrt(m) * math.ceil(ddp["scaled_local_stddev"]) / ddp["scaled_inflated_l2"])
    assert len(effective) == rounds and all(z <= e <= z * 1.001 for e in effective)
    statement = summary["privacy"]
    assert statement["secure_aggregation"]["effective_noise_multiplier"] == pytest.approx(effective[0], rel=1e-6)
    assert "Gaussian approximation" in statement["noise_accounting"]

    def independent(noise: float) -> float:  # replace-one: sensitivity 2C, noise over 2C
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(noise / 2)), rounds
        )
        relation = dp_accounting.NeighboringRelation.REPLACE_ONE
        return rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation).compose(event).get_epsilon(delta)

    assert statement["epsilon"] == pytest.approx(independent(z), rel=0.01)
    # the planned z is what was accounted; the mechanism that ran is at least as private
    assert statement["epsilon"] == pytest.approx(independent(max(effective)), rel=0.01)
    assert independent(max(effective)) <= statement["epsilon"] * (1 + 1e-9)
