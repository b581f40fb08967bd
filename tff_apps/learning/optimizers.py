"""Client and server optimizers of the [train] section (TFF's optimizers), and the weighting
of the algorithm (FedAvg and FedProx weight clients by examples).
"""

from __future__ import annotations

from typing import Callable

import tensorflow_federated as tff

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
