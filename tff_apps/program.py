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

Unreliable clients ([clients], `tff_apps.participation`): of the sampled clients some drop
out, some miss the round's deadline and, with over-selection, some finish after the first m
and are not used; only the clients that report get a round dataset. A round with fewer than
`clients.quorum` reports is skipped (no `process.next`, the state and ε unchanged) and
recorded with `"skipped": true`. Those draws have their own seeded stream, so the sampler's
generator and the round inputs are the same as without [clients].
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tqdm import tqdm

from shared.files import write_text_atomic
from tff_apps import participation
from tff_apps.config import TrainSection
from tff_apps.federation import ClientsSection

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "round_"
CHECKPOINTS_KEPT = 2


@dataclass
class ClientTrainData:
    """One client's preprocessed training arrays (they stay with the client's dataset)."""

    name: str
    x: np.ndarray
    y: np.ndarray


@dataclass
class TrainingResult:
    weights: tff.learning.models.ModelWeights
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    privacy: Any = "none"  # the privacy statement of the mechanism that ran
    lineage: dict[str, Any] | None = None  # a warm start (`job.init_from`): where the weights came from


EvaluateFn = Callable[[tff.learning.models.ModelWeights], dict[str, float]]


def bytes_per_client(weights: tff.learning.models.ModelWeights, federation=None) -> dict[str, int]:
    """One client's share of a round's exchange: it downloads the model weights (trainable and
    not) and uploads its update of the trainable ones plus its weight (a float32).

    `federation` (a `federation.Federation`, None = defaults): with [communication]
    compression the update goes up as TFF's encoder packs it (`compression.upload_bytes`, and
    the encoder's broadcast parameters come down), and "bytes_up_uncompressed" keeps the
    float32 figure; `robustness.aggregation = "clip_zero"` adds its bounds and norm records
    (`processes.clip_zero_bytes`).
    """
    from tff_apps import compression, processes

    down = sum(np.asarray(w).nbytes for w in (*weights.trainable, *weights.non_trainable))
    update = sum(np.asarray(w).nbytes for w in weights.trainable)
    weight = np.dtype(np.float32).itemsize
    sent = {"bytes_up": update + weight, "bytes_down": down}
    section = getattr(federation, "communication", None)
    if compression.is_compressed(section):
        encoded = compression.upload_bytes(section, sum(int(np.size(w)) for w in weights.trainable))
        sent = {"bytes_up": encoded["up"] + weight, "bytes_down": down + encoded["down"],
                "bytes_up_uncompressed": update + weight}
    if federation is not None and federation.robustness.aggregation == "clip_zero":
        extra = processes.clip_zero_bytes()
        sent = {key: value + extra["down" if key == "bytes_down" else "up"] for key, value in sent.items()}
    return {key: int(value) for key, value in sent.items()}


def communication(history: list[dict[str, Any]], federation=None) -> dict[str, Any]:
    """Total bytes up (clients to server) and down over the rounds of a run's history; with
    [communication] compression (`federation`) also the float32 upload it replaced, the ratio
    and the setting."""
    totals: dict[str, Any] = {
        key: sum(int(r.get(key, 0)) for r in history) for key in ("bytes_up", "bytes_down")
    }
    section = getattr(federation, "communication", None)
    if section is not None and section.compression != "none":
        uncompressed = sum(int(r.get("bytes_up_uncompressed", r.get("bytes_up", 0))) for r in history)
        totals.update(
            compression=section.compression,
            bits=int(section.bits),
            bytes_up_uncompressed=uncompressed,
            upload_ratio=round(uncompressed / totals["bytes_up"], 3) if totals["bytes_up"] else None,
        )
    return totals


def rounds_summary(history: list[dict[str, Any]], federation=None) -> dict[str, Any]:
    """summary.json's `communication` (bytes up and down, `communication`) and `participation`
    (rounds skipped, clients reporting, dropout, stragglers, unused: `participation.summary`)."""
    return {"communication": communication(history, federation), "participation": participation.summary(history)}


def client_dataset(client: ClientTrainData, train: TrainSection, seed: int) -> tf.data.Dataset:
    """One client's round input: `local_epochs` seeded shuffles of its rows, batched; or, with
    `local_steps`, that many batches of rows drawn without replacement (seeded).

    The rows are chosen here, at the client, so only this round's rows are handed to the
    TFF runtime, not the client's whole table.
    """
    rng = np.random.default_rng(seed)
    if train.local_steps > 0:
        wanted = train.local_steps * train.batch_size
        passes = -(-wanted // len(client.x))  # ceil: a small client cycles through its rows
        order = np.concatenate([rng.permutation(len(client.x)) for _ in range(passes)])[:wanted]
    else:
        order = np.concatenate([rng.permutation(len(client.x)) for _ in range(train.local_epochs)])
    data = collections.OrderedDict(
        x=client.x[order].astype(np.float32), y=client.y[order].astype(np.float32)
    )
    return tf.data.Dataset.from_tensor_slices(data).batch(train.batch_size)


def sample_clients(rng: np.random.Generator, n_clients: int, per_round: int) -> list[int]:
    """Uniform sampling without replacement; 0 or >= n means every client takes part."""
    if per_round <= 0 or per_round >= n_clients:
        return list(range(n_clients))
    return sorted(rng.choice(n_clients, size=per_round, replace=False).tolist())


def round_seed(seed: int, round_number: int, client_index: int) -> int:
    return int(np.random.SeedSequence([seed, round_number, client_index]).generate_state(1)[0])


class MetricsLog:
    """Appends one JSON line per round and mirrors numbers to TensorBoard."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self.writer = tf.summary.create_file_writer(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record, default=float) + "\n")
        with self.writer.as_default(step=record["round"]):
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "round" and math.isfinite(value):
                    tf.summary.scalar(key, value)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def keep_rounds_up_to(self, last_round: int) -> list[dict[str, Any]]:
        """A resumed run: keeps the lines of rounds <= `last_round` (the checkpoint's), drops
        the later ones (they run again) and a line cut short by a kill; returns those kept."""
        if not self.path.exists():
            return []
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("round"), int) and record["round"] <= last_round:
                kept.append(record)
        write_text_atomic(self.path, "".join(json.dumps(r, default=float) + "\n" for r in kept))
        return kept


@dataclass
class Resumed:
    """What a checkpoint gives back: the loop continues at `round + 1`."""

    round: int
    state: Any
    rng_state: dict[str, Any]
    round_participants: list[list[str]]


class Checkpoints:
    """The program state every `every` rounds, through TFF's FileProgramStateManager.

    Each version is written to a temporary folder and renamed into place
    (`file_utils.write_saved_model`), and a temporary name is not a version, so a process
    killed while saving leaves the previous checkpoint as the latest one; leftovers of such
    a save are removed on resume.
    """

    def __init__(self, run_dir: Path, every: int):
        self.every = every
        self.root = Path(run_dir) / CHECKPOINT_DIR
        self._manager = None

    @property
    def manager(self) -> tff.program.FileProgramStateManager:
        if self._manager is None:
            self._manager = tff.program.FileProgramStateManager(
                root_dir=self.root, prefix=CHECKPOINT_PREFIX, keep_total=CHECKPOINTS_KEPT, keep_first=False
            )
        return self._manager

    def due(self, round_number: int, last_round: int) -> bool:
        return self.every > 0 and (round_number % self.every == 0 or round_number == last_round)

    def save(self, round_number: int, state, rng: np.random.Generator, round_participants) -> None:
        program_state = {
            "state": state,
            "round": np.int64(round_number),
            "rng": json.dumps(rng.bit_generator.state),
            "participants": json.dumps(round_participants),
        }
        asyncio.run(self.manager.save(program_state, round_number))

    def load_latest(self, initial_state) -> Resumed | None:
        if self.every <= 0 or not self.root.is_dir():
            return None
        for leftover in self.root.glob(f"{CHECKPOINT_PREFIX}*_temp*"):
            shutil.rmtree(leftover, ignore_errors=True)  # a save cut short by a kill
        structure = {"state": initial_state, "round": 0, "rng": "", "participants": ""}
        loaded, version = asyncio.run(self.manager.load_latest(structure))
        if loaded is None:
            return None
        round_number = int(loaded["round"])
        if round_number != version:
            raise RuntimeError(f"checkpoint {self.root}/{CHECKPOINT_PREFIX}{version} holds round {round_number}")
        return Resumed(
            round_number,
            loaded["state"],
            json.loads(_text(loaded["rng"])),
            json.loads(_text(loaded["participants"])),
        )


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run (`checkpoints/round_<N>`), or None."""
    versions = []
    for path in (Path(run_dir) / CHECKPOINT_DIR).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX):]
        if suffix.isdigit():
            versions.append((int(suffix), path))
    return max(versions)[1] if versions else None


def _text(value: Any) -> str:
    if hasattr(value, "item"):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def warm_start(process, state, init_from, run_dir: Path):
    """`job.init_from`: the initial state's model weights become the parent export's
    (`weights.npz`). Returns (state, lineage); UserError when the shapes differ."""
    from shared.errors import UserError
    from tff_apps.export import WEIGHTS_FILE, load_weights, weights_digest

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
    """
    rng = np.random.default_rng(seed)
    rounds = train.rounds
    make_dataset = client_dataset
    if privacy is not None:
        privacy.check_clients({c.name: len(c.x) for c in clients})
        rounds = privacy.rounds
        if rounds < train.rounds:
            logging.getLogger(__name__).info(
                "privacy: stopping after %d of %d rounds (target ε %g)",
                rounds, train.rounds, privacy.section.target_epsilon,
            )
        if privacy.level == "record":
            from tff_apps import dp_sgd

            make_dataset = dp_sgd.poisson_client_dataset
    state = process.initialize()
    lineage = None
    if init_from is not None:
        state, lineage = warm_start(process, state, init_from, run_dir)
    checkpoints = Checkpoints(run_dir, train.checkpoint_every)
    resumed = checkpoints.load_latest(state)
    first_round = 1
    round_participants: list[list[str]] = []
    if resumed is not None:
        state, first_round = resumed.state, resumed.round + 1
        rng.bit_generator.state = resumed.rng_state
        round_participants = resumed.round_participants
        if privacy is not None:
            privacy.restore(round_participants)
        logging.getLogger(__name__).info(
            "resuming after round %d from %s", resumed.round, checkpoints.root
        )
    log = MetricsLog(run_dir)
    result = TrainingResult(weights=process.get_model_weights(state), lineage=lineage)
    result.history = log.keep_rounds_up_to(first_round - 1)
    started = time.perf_counter()
    per_client = bytes_per_client(result.weights, federation)  # shapes never change between rounds
    unreliable = federation.clients if federation is not None else ClientsSection()
    wanted = participation.participants(len(clients), train.clients_per_round)
    sample_size = participation.sample_size(len(clients), train.clients_per_round, unreliable.over_selection)
    examples = [participation.examples_per_round(train, len(c.x)) for c in clients]
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
                    make_dataset(clients[i], train, round_seed(seed, round_number, i)) for i in came.reported
                ]
                output = next_round(process, state, datasets, names)
                state = output.state
                record.update(train_metrics(output.metrics))
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
                checkpoints.save(round_number, state, rng, round_participants)
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


def _postfix(record: dict[str, Any], headline: str) -> dict[str, str]:
    shown = {"loss": f"{record.get('train_loss', float('nan')):.4f}"}
    if headline in record:
        shown[headline] = f"{record[headline]:.4f}"
    return shown
