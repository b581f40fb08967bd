"""Per-client fine-tuning through TFF's personalization evaluation, on a tiny federation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.errors import UserError
from shared.metrics import roc_auc

N_INPUTS = 2


def logistic_model_fn():
    import tensorflow as tf
    import tensorflow_federated as tff

    from healthcare.model import ModelConfig, build_keras_model, input_spec

    return tff.learning.models.from_keras_model(
        build_keras_model(ModelConfig(), N_INPUTS, seed=0),
        loss=tf.keras.losses.BinaryCrossentropy(),
        input_spec=input_spec(N_INPUTS),
    )


def client(name: str, flipped: bool, seed: int):
    """Label = (x0 > 0), or its opposite at the client whose data differs from the rest."""
    from tff_apps.learning.personalization import ClientSplit

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(120, N_INPUTS)).astype(np.float32)
    y = ((x[:, 0] > 0) != flipped).astype(np.float32).reshape(-1, 1)
    return ClientSplit(name, x[:80], y[:80], x[80:], y[80:])


@pytest.fixture(scope="module")
def outcome(runtime):
    """The 'global' model fits the majority (label = x0 > 0); client c is the odd one out."""
    import tensorflow_federated as tff

    from tff_apps.config import TrainSection
    from tff_apps.learning.federation import PersonalizationSection
    from tff_apps.learning.personalization import binary_metrics, personalize

    from healthcare.model import ModelConfig, build_keras_model

    kernel, bias = np.array([[4.0], [0.0]], np.float32), np.zeros(1, np.float32)
    weights = tff.learning.models.ModelWeights(trainable=[kernel, bias], non_trainable=[])
    clients = [client("a", False, 1), client("b", False, 2), client("c", True, 3)]
    section = PersonalizationSection(epochs=5, learning_rate=0.5)
    eager_model = build_keras_model(ModelConfig(), N_INPUTS, seed=0)  # the app's global model, made before
    results = personalize(logistic_model_fn, weights, clients, binary_metrics, section, TrainSection(batch_size=16), 0)
    # ... is still usable afterwards (Keras swaps layer classes when TFF builds in graph mode)
    assert eager_model(clients[0].test_x, training=False).shape == (40, 1)
    return clients, kernel, bias, results


def test_before_is_the_global_models_metric_computed_directly(outcome):
    clients, kernel, bias, results = outcome
    for c in clients:
        probabilities = 1 / (1 + np.exp(-(c.test_x @ kernel + bias)))
        assert results[c.name]["before"]["auc"] == pytest.approx(roc_auc(c.test_y, probabilities), abs=1e-12)
        accuracy = np.mean((probabilities >= 0.5) == (c.test_y > 0.5))
        assert results[c.name]["before"]["accuracy"] == pytest.approx(accuracy)
        assert results[c.name]["before"]["n"] == 40


def test_fine_tuning_helps_the_client_whose_data_differs(outcome):
    _, _, _, results = outcome
    odd = results["c"]
    assert odd["before"]["auc"] < 0.1 and odd["after"]["auc"] > 0.9
    assert odd["after"]["accuracy"] > odd["before"]["accuracy"] + 0.5
    for name in ("a", "b"):  # already well served: fine-tuning keeps them there
        assert results[name]["after"]["auc"] > 0.9


def test_exact_auc_handles_ties_as_scikit_learn_does(runtime):
    import tensorflow as tf

    from tff_apps.learning.personalization import exact_auc

    labels = np.array([0, 1, 1, 0, 1, 0, 1], np.float32)
    scores = np.array([0.2, 0.2, 0.7, 0.7, 0.9, 0.1, 0.5], np.float32)
    assert float(exact_auc(tf.constant(labels), tf.constant(scores))) == pytest.approx(roc_auc(labels, scores))
    assert math.isnan(float(exact_auc(tf.constant(np.ones(3, np.float32)), tf.constant(scores[:3]))))


def test_masked_mae_skips_missing_targets(runtime):
    import tensorflow as tf

    from tff_apps.learning.personalization import masked_mae_at

    class Constant:
        def predict_on_batch(self, x, training=False):
            return tf.ones([tf.shape(x)[0], 2])

    y = np.array([[0.0, 3.0], [0.0, np.nan], [0.0, -1.0]], np.float32)
    data = tf.data.Dataset.from_tensor_slices({"x": np.zeros((3, 1), np.float32), "y": y})
    metrics = masked_mae_at(1)(Constant(), data)
    assert float(metrics["mae"]) == pytest.approx((2.0 + 2.0) / 2) and float(metrics["observed"]) == 2


def test_personalization_refused_with_differential_privacy():
    from tff_apps.learning import federation
    from tff_apps.program.job import resolve_job

    _, cfg = resolve_job("healthcare", None, ["personalization.epochs=2", "privacy.level=client",
                                              "privacy.noise_multiplier=1.0"])
    with pytest.raises(UserError, match="personalization.epochs"):
        federation.check_personalization(cfg, federation.of(cfg), {"a": 10, "b": 10})
    _, plain = resolve_job("healthcare", None, ["personalization.epochs=2"])
    federation.check_personalization(plain, federation.of(plain), {"a": 10, "b": 10})
