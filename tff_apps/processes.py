"""FedAvg-family learning processes, composed from four small parts with typed seams.

As `tff.learning.templates.compose_learning_process` does it: a distributor
(broadcast), a client work (local training: FedAvg or FedProx's proximal term), an
aggregator (weighted or unweighted mean; the privacy stacks plug in here), and a
finalizer (the server optimizer applied to the aggregated update).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow_federated as tff

from tff_apps.client_works import build_fedprox_client_work
from tff_apps.config import TrainSection

ModelFn = Callable[[], tff.learning.models.VariableModel]

WEIGHTED_ALGORITHMS = ("fedavg", "fedprox")


def is_weighted(train: TrainSection) -> bool:
    """FedAvg and FedProx weight each client by its number of examples (McMahan et al.)."""
    return train.algorithm in WEIGHTED_ALGORITHMS


def client_optimizer(train: TrainSection) -> tff.learning.optimizers.Optimizer:
    if train.client_optimizer == "adam":  # state restarts every round: each round is a fresh local run
        return tff.learning.optimizers.build_adam(learning_rate=train.client_learning_rate)
    return tff.learning.optimizers.build_sgdm(learning_rate=train.client_learning_rate)


def server_optimizer(train: TrainSection) -> tff.learning.optimizers.Optimizer:
    """Server optimizers of the adaptive federated optimization paper (Reddi et al. 2021)."""
    if train.server_optimizer == "adam":
        return tff.learning.optimizers.build_adam(learning_rate=train.server_learning_rate)
    if train.server_optimizer == "yogi":
        return tff.learning.optimizers.build_yogi(learning_rate=train.server_learning_rate)
    momentum = train.server_momentum or None  # build_sgdm treats 0 momentum as "no momentum slot"
    return tff.learning.optimizers.build_sgdm(
        learning_rate=train.server_learning_rate, momentum=momentum
    )


def client_work(train: TrainSection, model_fn: ModelFn):
    weighting = (
        tff.learning.ClientWeighting.NUM_EXAMPLES
        if is_weighted(train)
        else tff.learning.ClientWeighting.UNIFORM
    )
    if train.algorithm == "fedprox":
        # Not TFF's proximal_client_work: its proximal term has the wrong sign (client_works.py).
        return build_fedprox_client_work(
            model_fn, client_optimizer(train), weighting, float(train.proximal_strength)
        )
    return tff.learning.templates.build_model_delta_client_work(
        model_fn, client_optimizer(train), weighting
    )


def default_aggregator(train: TrainSection):
    """A weighted factory, as the composer requires; unweighted FedAvg wraps the uniform mean
    the way TFF's own `build_unweighted_fed_avg` does."""
    if is_weighted(train):
        return tff.aggregators.MeanFactory()
    return tff.aggregators.as_weighted_aggregator(tff.aggregators.UnweightedMeanFactory())


def build_learning_process(
    train: TrainSection, model_fn: ModelFn, aggregator_factory=None, privacy=None
) -> tff.learning.templates.LearningProcess:
    """The job's learning process; `aggregator_factory` defaults to the plain (un)weighted mean.

    `privacy` (the job's `run.privacy`, a `private_run.RunPrivacy`, or a `privacy.PrivacyPlan`)
    switches in the DP mechanism the plan accounted for: at client level TFF's DP aggregator
    with the plan's noise multiplier (uniform client weighting); at record level DP-SGD
    client work (`dp_sgd`), whose round input is `dp_sgd.poisson_client_dataset`.
    """
    plan = getattr(privacy, "plan", privacy)
    if plan is not None and plan.level == "record":
        from tff_apps import dp_sgd

        if aggregator_factory is not None:
            raise ValueError("record-level DP builds its own (uniform mean) aggregator")
        return dp_sgd.build_learning_process(
            train, model_fn, plan.section.clip_norm, plan.noise_multiplier
        )
    if plan is not None and plan.level == "client":
        from tff_apps import privacy as privacy_lib

        if aggregator_factory is not None:
            raise ValueError("client-level DP replaces the aggregator; pass one or the other")
        aggregator_factory = privacy_lib.client_dp_aggregator(
            plan.section, plan.sampling.participants, plan.noise_multiplier
        )

    @tff.tensorflow.computation
    def initial_model_weights():
        return tff.learning.models.ModelWeights.from_model(model_fn())

    weights_type = initial_model_weights.type_signature.result
    factory = aggregator_factory or default_aggregator(train)
    aggregator = factory.create(weights_type.trainable, tff.TensorType(np.float32))
    return tff.learning.templates.compose_learning_process(
        initial_model_weights,
        tff.learning.templates.build_broadcast_process(weights_type),
        client_work(train, model_fn),
        aggregator,
        tff.learning.templates.build_apply_optimizer_finalizer(server_optimizer(train), weights_type),
    )
