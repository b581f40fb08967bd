"""FedAvg-family learning processes, composed from four small parts with typed seams.

As `tff.learning.templates.compose_learning_process` does it: a distributor
(broadcast), a client work (local training: FedAvg or FedProx's proximal term), an
aggregator (weighted or unweighted mean; the privacy stacks plug in here), and a
finalizer (the server optimizer applied to the aggregated update).
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow_federated as tff

from shared.errors import UserError
from tff_apps.config import TrainSection
from tff_apps.learning import dp_aggregators
from tff_apps.learning import federation as federation_lib
from tff_apps.learning.aggregators import job_aggregator, secure_mean_factory
from tff_apps.learning.client_works import client_work
from tff_apps.learning.dp_aggregators import ddp_aggregator, model_dimension
from tff_apps.learning.optimizers import ModelFn, client_optimizer, server_optimizer
from tff_apps.privacy import secure_settings

_log = logging.getLogger(__name__)


def secure_aggregation(cfg, clients) -> secure_settings.SecureAggregation | None:
    """The job's `privacy.secure_aggregation` resolved for the program's clients (None for
    "none"); `private_run.start` already checked it (UserError) before the run folder."""
    return secure_settings.secure_aggregation(cfg.privacy, cfg.train, {c.name: c.rows for c in clients})


def build_learning_process(
    train: TrainSection, model_fn: ModelFn, aggregator_factory=None, privacy=None, secure=None, federation=None,
    client_names=None,
) -> tff.learning.templates.LearningProcess:
    """The job's learning process; `aggregator_factory` defaults to `job_aggregator(train, federation)`.

    `privacy` (the job's `run.privacy`, a `private_run.RunPrivacy`, or a `calibration.PrivacyPlan`)
    switches in the DP mechanism the plan accounted for: at client level TFF's DP aggregator
    with the plan's noise multiplier (uniform client weighting); at record level DP-SGD
    client work (`dp_sgd`), whose round input is `dp_sgd.poisson_client_dataset`.

    `secure` (a `secure_settings.SecureAggregation`, see `secure_aggregation(cfg, clients)`; a job
    without DP has no `run.privacy`, so the apps pass it) switches in secure aggregation:
    "simulated" composes TFF's SecureSumFactory into the mean (distributed DP at client
    level, `ddp_aggregator`); "masked" returns a `secure_rounds.MaskedLearningProcess`.

    `federation` (a `federation.Federation`, None = all defaults): compression and robust
    aggregation of the job's [communication] and [robustness] sections. A median, trimmed
    mean or scaled bad updates need the updates in Python: a `split_rounds.RobustLearningProcess`,
    whose bad clients are the first of `client_names` (the federation's clients in order).

    `train.engine = "grouped"`: the same mathematics with a round's clients trained in one
    TFF call (`grouped_process.GroupedProcess`; `grouped.build_grouped_process` refuses the models it does not run).
    `"auto"`: grouped where it runs the job, else the stock process (the reason logged).
    """
    grouped_process = _grouped_or_none(train, model_fn, aggregator_factory, privacy, secure, federation, client_names)
    if grouped_process is not None:
        return grouped_process
    if federation is not None and federation_lib.needs_split_rounds(federation):
        if privacy is not None or secure is not None:  # federation.check_robustness refuses it first
            raise ValueError("robust aggregation in Python runs without DP and secure aggregation")
        from tff_apps.learning import split_rounds

        return split_rounds.build(train, model_fn, federation, client_names or (), aggregator_factory)
    plan = getattr(privacy, "plan", privacy)
    if secure is None:
        secure = getattr(privacy, "secure", None)
    if secure is not None:
        if aggregator_factory is not None:
            raise ValueError("secure aggregation builds its own aggregator; pass one or the other")
        return _build_secure_process(train, model_fn, privacy, plan, secure)
    if plan is not None and plan.level == "record":
        from tff_apps.learning import dp_sgd

        if aggregator_factory is not None:
            raise ValueError("record-level DP builds its own (uniform mean) aggregator")
        return dp_sgd.build_learning_process(
            train, model_fn, plan.section.clip_norm, plan.noise_multiplier,
            aggregator_factory=job_aggregator(train, federation, weighted=False),
        )
    if plan is not None and plan.level == "client":

        if aggregator_factory is not None:
            raise ValueError("client-level DP replaces the aggregator; pass one or the other")
        aggregator_factory = dp_aggregators.client_dp_aggregator(
            plan.section, plan.sampling.participants, plan.noise_multiplier
        )

    @tff.tensorflow.computation
    def initial_model_weights():
        return tff.learning.models.ModelWeights.from_model(model_fn())

    weights_type = initial_model_weights.type_signature.result
    factory = aggregator_factory or job_aggregator(train, federation)
    aggregator = factory.create(weights_type.trainable, tff.TensorType(np.float32))
    return tff.learning.templates.compose_learning_process(
        initial_model_weights,
        tff.learning.templates.build_broadcast_process(weights_type),
        client_work(train, model_fn),
        aggregator,
        tff.learning.templates.build_apply_optimizer_finalizer(server_optimizer(train), weights_type),
    )


def _grouped_or_none(train, model_fn, aggregator_factory, privacy, secure, federation, client_names=None):
    """The grouped engine's process for `engine = "grouped"`, and for `"auto"` when it runs the
    job (its refusal, a UserError, names why not: logged, and the stock process runs)."""
    engine = getattr(train, "engine", "tff")
    if engine == "tff" or aggregator_factory is not None:  # a caller's own aggregator: stock only
        return None
    from tff_apps.learning import grouped

    try:
        return grouped.build_grouped_process(train, model_fn, None, privacy, secure, federation, client_names)
    except UserError as refusal:
        if engine == "grouped":
            raise
        _log.info("train.engine = 'auto': TFF's stock engine (%s)", refusal)
        return None


def engine_of(process) -> str:
    """Which engine a process of `build_learning_process` runs: "grouped" or "tff"."""
    from tff_apps.learning.grouped_process import GroupedProcess

    return "grouped" if isinstance(process, GroupedProcess) else "tff"


def _build_secure_process(train: TrainSection, model_fn: ModelFn, privacy, plan, secure):
    level = plan.level if plan is not None else "none"

    @tff.tensorflow.computation
    def initial_model_weights():
        return tff.learning.models.ModelWeights.from_model(model_fn())

    weights_type = initial_model_weights.type_signature.result
    if level == "record":
        from tff_apps.learning import dp_sgd

        # DP-SGD noise is added at each client (local DP on records): it composes with any
        # secure sum; the mean is uniform (weight 1 per client, as in dp_sgd).
        work = dp_sgd.build_dp_sgd_client_work(
            model_fn, client_optimizer(train), plan.section.clip_norm, plan.noise_multiplier
        )
    else:
        work = client_work(train, model_fn)
    distributor = tff.learning.templates.build_broadcast_process(weights_type)
    finalizer = tff.learning.templates.build_apply_optimizer_finalizer(server_optimizer(train), weights_type)
    if secure.mode == "masked":
        if level == "client":  # distributed DP, its secure sums masked (`ddp_rounds`)
            from tff_apps.learning import ddp_rounds

            return ddp_rounds.build(initial_model_weights, distributor, work, finalizer, secure, plan, privacy)
        from tff_apps.learning.secure_rounds import MaskedLearningProcess

        return MaskedLearningProcess(initial_model_weights, distributor, work, finalizer, secure)
    if level == "client":
        if plan.section.clipping != "fixed":
            raise UserError(
                "privacy.clipping = 'adaptive' is not supported with privacy.secure_aggregation = "
                "'simulated' (distributed DP): use privacy.clipping = 'fixed'"
            )
        factory, details = ddp_aggregator(
            plan.section.clip_norm, plan.sampling.participants, plan.noise_multiplier, model_dimension(weights_type)
        )
        if hasattr(privacy, "mechanism_details"):
            privacy.mechanism_details.update(details)
    else:
        factory = secure_mean_factory(secure)
    aggregator = factory.create(weights_type.trainable, tff.TensorType(np.float32))
    return tff.learning.templates.compose_learning_process(
        initial_model_weights, distributor, work, aggregator, finalizer
    )
