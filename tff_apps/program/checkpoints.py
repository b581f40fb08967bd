"""Checkpoints of the program state through `tff.program.FileProgramStateManager`, written to a
temporary folder and renamed, so a kill during a save leaves the previous one as the latest.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_federated as tff

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "round_"
CHECKPOINTS_KEPT = 2


@dataclass
class Resumed:
    """What a checkpoint gives back: the loop continues at `round + 1`."""

    round: int
    state: Any
    rng_state: dict[str, Any]
    round_participants: list[list[str]]
    sampling_seed: int | None = None  # None: a checkpoint from before the seed was stored


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

    def save(self, round_number: int, state, rng: np.random.Generator, round_participants, sampling_seed: int) -> None:
        """`sampling_seed`: the seed of the client sampling and round inputs (with DP a secret
        drawn from the OS; `round_loop.sampling_seed`), so a resume replays the same draws."""
        program_state = {
            "state": state,
            "round": np.int64(round_number),
            # the sampler's state and its seed in one text field (an older checkpoint holds
            # the bare bit-generator state: `_sampler`)
            "rng": json.dumps({"sampler": rng.bit_generator.state, "sampling_seed": str(sampling_seed)}),
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
        rng_state, sampling_seed = _sampler(json.loads(_text(loaded["rng"])))
        return Resumed(
            round_number, loaded["state"], rng_state, json.loads(_text(loaded["participants"])), sampling_seed
        )


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run (`checkpoints/round_<N>`), or None."""
    versions = []
    for path in (Path(run_dir) / CHECKPOINT_DIR).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX):]
        if suffix.isdigit():
            versions.append((int(suffix), path))
    return max(versions)[1] if versions else None


def _sampler(stored: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    if "sampler" in stored:
        return stored["sampler"], int(stored["sampling_seed"])
    return stored, None


def _text(value: Any) -> str:
    if hasattr(value, "item"):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
