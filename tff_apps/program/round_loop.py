"""The training program: rounds, seeded client sampling, evaluation cadence, metrics and
checkpoints.

Every round runs the learning process's `next` TFF computation on the sampled
clients' datasets. Progress goes to a tqdm bar, each round to `metrics.jsonl` and
TensorBoard event files. Every `train.checkpoint_every` rounds (and after the last) the
program state goes to `checkpoints/round_<N>` through `tff.program.FileProgramStateManager`:
the learning process's state, the round, the client sampler's generator state and the
clients of every round so far (for the privacy accountant). A run folder that already
has checkpoints (a resumed run) continues after the latest one, with the same sampling and
the same round inputs (`round_seed` depends on seed, round and client only), so it ends
where an uninterrupted run would.

Secret sampling under DP: ε is amplified by sampling only if nobody can tell who was
sampled. With `privacy` on, the client sampling and the round inputs (the Poisson batches
of DP-SGD) follow a 128-bit seed drawn from the OS (`sampling_seed`), not `job.seed`, which
the model card carries; the checkpoint stores it, so a resume replays the same draws. The
per-round client lists then go to the operator-only `operator/rounds.jsonl`, not to
metrics.jsonl (`MetricsLog`).

Unreliable clients ([clients], `tff_apps.participation`): of the sampled clients some drop
out, some miss the round's deadline and, with over-selection, some finish after the first m
and are not used; only the clients that report get a round dataset. A round with fewer than
`clients.quorum` reports is skipped (no `process.next`, the state and ε unchanged) and
recorded with `"skipped": true`. Those draws have their own seeded stream, so the sampler's
generator and the round inputs are the same as without [clients].
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow_federated as tff
from tqdm import tqdm

from tff_apps.config import TrainSection
from tff_apps.learning import participation
from tff_apps.learning.client_data import ClientTrainData, client_dataset, client_round_rows, round_seed
from tff_apps.learning.factory import engine_of
from tff_apps.learning.federation import ClientsSection
from tff_apps.privacy.dp_config import examples_per_round
from tff_apps.program.checkpoints import Checkpoints
from tff_apps.program.metrics_log import MetricsLog
from tff_apps.program.round_summary import bytes_per_client


@dataclass
class TrainingResult:
    weights: tff.learning.models.ModelWeights
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    privacy: Any = "none"  # the privacy statement of the mechanism that ran
    lineage: dict[str, Any] | None = None  # a warm start (`job.init_from`): where the weights came from
    engine: str = "tff"  # the engine that ran the rounds (`factory.engine_of`): "grouped" or "tff"


EvaluateFn = Callable[[tff.learning.models.ModelWeights], dict[str, float]]


def sample_clients(rng: np.random.Generator, n_clients: int, per_round: int) -> list[int]:
    """Uniform sampling without replacement; 0 or >= n means every client takes part."""
    if per_round <= 0 or per_round >= n_clients:
        return list(range(n_clients))
    return sorted(rng.choice(n_clients, size=per_round, replace=False).tolist())


def sampling_seed(seed: int, privacy) -> int:
    """The seed of the client sampling and round inputs: `job.seed`, or with DP a secret
    from the OS's random source (module docstring)."""
    return seed if privacy is None else secrets.randbits(128)


def warm_start(process, state, init_from, run_dir: Path):
    """`job.init_from`: the initial state's model weights become the parent export's
    (`weights.npz`). Returns (state, lineage); UserError when the shapes differ."""
    from shared.errors import UserError
    from tff_apps.program.export import WEIGHTS_FILE, load_weights, weights_digest

    trainable, non_trainable = load_weights(init_from.model_dir / WEIGHTS_FILE)
    current = process.get_model_weights(state)
    wanted = [tuple(np.shape(w)) for w in [*current.trainable, *current.non_trainable]]
    given = [tuple(w.shape) for w in [*trainable, *non_trainable]]
    if wanted != given:
        raise UserError(
            f"job.init_from = {init_from.source!r}: its model ({init_from.model_dir}) has weight shapes {given}, "
            f"run {Path(run_dir).name} needs {wanted}; warm-start from a run with the same features and model config"
        )
    weights = tff.learning.models.ModelWeights(
        trainable=[w.astype(np.float32) for w in trainable],
        non_trainable=[w.astype(np.float32) for w in non_trainable],
    )
    if hasattr(process, "set_model_weights"):
        state = process.set_model_weights(state, weights)
    else:  # secure_rounds.MaskedLearningProcess: state is a LearningAlgorithmState (NamedTuple)
        state = state._replace(global_model_weights=weights)
    start = process.get_model_weights(state)
    lineage = {**init_from.lineage(), "initial_weights_sha256": weights_digest(start.trainable, start.non_trainable)}
    return state, lineage


def next_round(process, state, datasets, names: list[str]):
    """One round of `process`; a process that needs to know which clients these are (the
    bad-client evaluation mode of `split_rounds`) says so with `wants_client_names`."""
    if getattr(process, "wants_client_names", False):
        return process.next(state, datasets, client_names=names)
    return process.next(state, datasets)


def train_metrics(output_metrics) -> dict[str, float]:
    """The clients' training loss and metrics as TFF aggregated them this round."""
    train = output_metrics["client_work"]["train"]
    return {f"train_{name}": float(value) for name, value in train.items()}


def run_rounds(
    process: tff.learning.templates.LearningProcess,
    clients: list[ClientTrainData],
    train: TrainSection,
    seed: int,
    run_dir: Path,
    evaluate: EvaluateFn,
    headline: str,
    label: str = "federated",
    privacy=None,
    init_from=None,
    federation=None,
    round_input=None,
) -> TrainingResult:
    """Runs `train.rounds` rounds; evaluates every `eval_every` rounds and after the last;
    checkpoints every `checkpoint_every` rounds and after the last. A run folder with a
    checkpoint continues from it (metrics.jsonl keeps the rounds up to the checkpoint).

    With `privacy` (the job's `run.privacy`, a `private_run.RunPrivacy`): the plan's rounds
    (fewer than `train.rounds` when the target ε would be passed), record-level round
    inputs from `dp_sgd.poisson_client_dataset`, and ε so far after each round (`epsilon`),
    accounted from the clients actually sampled.

    With `init_from` (the job's `run.init_from`, a `job.InitFrom`): round 1 starts from the
    parent export's weights (`warm_start`); `result.lineage` records it.

    With `federation` (a `federation.Federation`, None = all defaults): the job's [clients]
    section (dropout, stragglers, over-selection, quorum; module docstring). Each round's
    record has `sampled`, `dropped`, `stragglers`, `unused`, `reported`, `skipped` and
    `simulated_seconds`; `clients` names the clients that reported. ε is accounted with
    the clients that reported.

    `round_input(client, train, seed)`: a client's round input, by default its dataset
    (`client_data.client_dataset`; the grouped engine's: its rows, `client_round_rows`); across sites, the reference its site opens
    (`sites.site_training.round_reference`).
    """
    sampling = sampling_seed(seed, privacy)
    rounds = train.rounds
    # the grouped engine stacks the rows themselves: no tf.data pipeline built per client and round
    grouped = engine_of(process) == "grouped"
    make_dataset = round_input or (client_round_rows if grouped else client_dataset)
    if privacy is not None:
        privacy.check_clients({c.name: c.rows for c in clients})
        rounds = privacy.rounds
        if rounds < train.rounds:
            logging.getLogger(__name__).info(
                "privacy: stopping after %d of %d rounds (target ε %g)",
                rounds, train.rounds, privacy.section.target_epsilon,
            )
        if privacy.level == "record" and round_input is None:  # across sites: drawn at the site
            from tff_apps.learning import dp_sgd

            make_dataset = dp_sgd.poisson_round_steps if grouped else dp_sgd.poisson_client_dataset
    state = process.initialize()
    lineage = None
    if init_from is not None:
        state, lineage = warm_start(process, state, init_from, run_dir)
    checkpoints = Checkpoints(run_dir, train.checkpoint_every)
    resumed = checkpoints.load_latest(state)
    first_round = 1
    round_participants: list[list[str]] = []
    if resumed is not None and resumed.sampling_seed is not None:
        sampling = resumed.sampling_seed
    rng = np.random.default_rng(sampling)
    if resumed is not None:
        state, first_round = resumed.state, resumed.round + 1
        rng.bit_generator.state = resumed.rng_state
        round_participants = resumed.round_participants
        if privacy is not None:
            privacy.restore(round_participants)
        logging.getLogger(__name__).info(
            "resuming after round %d from %s", resumed.round, checkpoints.root
        )
    log = MetricsLog(run_dir, operator_only=("clients",) if privacy is not None else ())
    result = TrainingResult(weights=process.get_model_weights(state), lineage=lineage, engine=engine_of(process))
    result.history = log.keep_rounds_up_to(first_round - 1)
    started = time.perf_counter()
    per_client = bytes_per_client(result.weights, federation)  # shapes never change between rounds
    unreliable = federation.clients if federation is not None else ClientsSection()
    wanted = participation.participants(len(clients), train.clients_per_round)
    sample_size = participation.sample_size(len(clients), train.clients_per_round, unreliable.over_selection)
    examples = [examples_per_round(train, c.rows) for c in clients]
    progress = tqdm(total=rounds, initial=first_round - 1, desc=label, unit="round", dynamic_ncols=True)
    try:
        for round_number in range(first_round, rounds + 1):
            round_started = time.perf_counter()
            chosen = sample_clients(rng, len(clients), sample_size)
            came = participation.turnout(unreliable, seed, round_number, chosen, examples, wanted)
            names = [clients[i].name for i in came.reported]
            record: dict[str, Any] = {"round": round_number, "clients": names, **came.stats()}
            output = None  # a skipped round (quorum missed) leaves the state as it was
            if not came.skipped:
                datasets = [
                    make_dataset(clients[i], train, round_seed(sampling, round_number, i)) for i in came.reported
                ]
                output = next_round(process, state, datasets, names)
                state = output.state
                record.update(train_metrics(output.metrics))
                names = _without_lost_sites(process, record, names)
            # every sampled client downloaded the model; only those that reported uploaded
            record.update({
                key: count * len(came.sampled if key.startswith("bytes_down") else came.reported)
                for key, count in per_client.items()
            })
            if output is not None:
                record.update(output.metrics.get("secure_aggregation", {}))  # masked: protocol seconds, bytes
            if privacy is not None:  # a skipped round released nothing: no spend
                record["epsilon"] = privacy.epsilon_so_far if came.skipped else privacy.record_round(names)
            record["round_seconds"] = time.perf_counter() - round_started
            if round_number % train.eval_every == 0 or round_number == rounds:
                record.update(evaluate(process.get_model_weights(state)))
            log.write(record)
            result.history.append(record)
            if not came.skipped:  # the privacy accountant's rounds (restored on resume)
                round_participants.append(names)
            if checkpoints.due(round_number, rounds):
                checkpoints.save(round_number, state, rng, round_participants, sampling)
            progress.update(1)
            progress.set_postfix(_postfix(record, headline), refresh=False)
    finally:
        progress.close()
        log.close()
    result.weights = process.get_model_weights(state)
    result.seconds = time.perf_counter() - started
    if privacy is not None:
        result.privacy = privacy.statement()
    return result


def _without_lost_sites(process, record: dict[str, Any], names: list[str]) -> list[str]:
    """Across sites: the sites the round lost (`SiteProcess.last_dropped`) did not report."""
    lost = [name for name in getattr(process, "last_dropped", []) if name in names]
    if not lost:
        return names
    names = [name for name in names if name not in lost]
    record.update(clients=names, reported=len(names), dropped=record.get("dropped", 0) + len(lost), lost_sites=lost)
    return names


def _postfix(record: dict[str, Any], headline: str) -> dict[str, str]:
    shown = {"loss": f"{record.get('train_loss', float('nan')):.4f}"}
    if headline in record:
        shown[headline] = f"{record[headline]:.4f}"
    return shown
