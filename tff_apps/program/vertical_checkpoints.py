"""Checkpoints of vertical (split-model) training, one file per party and one for the coordinator.

Every `train.checkpoint_every` epochs (and after the last) each party writes what it holds
(`PartyState`: its own weights and optimizer state, unpadded, and the state of its DP noise
generator) to `checkpoints/<party>/epoch_<N>.npz`, and then the coordinator writes its
`CoordinatorState` (epoch, step, losses, byte counters; no weights) to
`checkpoints/coordinator/epoch_<N>.json`. The coordinator's file is written last and is the
commit point: a checkpoint exists when it does and every party's file of that epoch too.
Each file is written under a temporary name and renamed, so a process killed while saving
leaves the previous checkpoint as the latest; the two latest are kept. Across sites each
party's file would be written at its own site; the layout already keeps them apart.

Why the noise generators are saved: DP noise is drawn from the OS (not from the job seed), and
the killed attempt already released the noisy gradients of the epochs after the checkpoint.
The resumed run restores the generators and draws exactly the same noise again, so (with the
same weights, batches and labels) it re-sends exactly the same values: nothing new is
released, and the label-DP accounting counts each epoch once.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.files import write_text_atomic
from tff_apps.learning.vertical import PartyState, pad_weights, unpad_weights

CHECKPOINT_DIR = "checkpoints"
COORDINATOR = "coordinator"
KEPT = 2
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.(npz|json)$")


@dataclass
class PartyCheckpoint:
    """One party's saved state (unpadded, Keras order)."""

    weights: list[np.ndarray]
    optimizer_state: list[np.ndarray]
    noise_rng: dict[str, Any] | None  # numpy bit-generator state, or None (the party draws no noise)


def party_checkpoint(state: PartyState, noise_rng: dict[str, Any] | None) -> PartyCheckpoint:
    """What `state`'s party saves: its weights and optimizer moments at its own width (the
    common width's zero padding is the simulation's, not the party's) and its noise state."""
    k = len(state.weights)
    optimizer = [state.optimizer_state[0]]
    for moments in (state.optimizer_state[1 : 1 + k], state.optimizer_state[1 + k :]):
        optimizer += unpad_weights(moments, state.width) if moments else []
    return PartyCheckpoint(unpad_weights(state.weights, state.width), optimizer, noise_rng)


def restore_party(state: PartyState, saved: PartyCheckpoint) -> None:
    """`party_checkpoint` undone into `state` (padded back to the width of its features)."""
    width, k = state.features.shape[1], len(saved.weights)
    state.weights = pad_weights([np.asarray(a, np.float32) for a in saved.weights], width)
    optimizer = [np.asarray(saved.optimizer_state[0], np.float32)]
    for moments in (saved.optimizer_state[1 : 1 + k], saved.optimizer_state[1 + k :]):
        optimizer += pad_weights([np.asarray(a, np.float32) for a in moments], width) if moments else []
    state.optimizer_state = optimizer
    if saved.noise_rng is not None and state.noise_rng is not None:
        state.noise_rng.bit_generator.state = saved.noise_rng


class VerticalCheckpoints:
    """Saves and finds the checkpoints of one vertical run (module docstring)."""

    def __init__(self, run_dir: Path, every: int, parties: list[str]):
        self.root = Path(run_dir) / CHECKPOINT_DIR
        self.every = every
        self.parties = list(parties)

    def due(self, epoch: int, last_epoch: int) -> bool:
        return self.every > 0 and (epoch % self.every == 0 or epoch == last_epoch)

    def save(self, epoch: int, parties: dict[str, PartyCheckpoint], coordinator: dict[str, Any]) -> None:
        for name, state in parties.items():  # each party its own file, then the commit point
            folder = self.root / name
            folder.mkdir(parents=True, exist_ok=True)
            _save_npz(folder / f"epoch_{epoch}.npz", state)
            _prune(folder)
        folder = self.root / COORDINATOR
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / f"epoch_{epoch}.json", json.dumps({"epoch": epoch, **coordinator}))
        _prune(folder)

    def load_latest(self) -> tuple[int, dict[str, PartyCheckpoint], dict[str, Any]] | None:
        """(epoch, each party's state, the coordinator's state) of the newest complete
        checkpoint, or None. Leftovers of a save cut short by a kill are removed."""
        if self.every <= 0 or not self.root.is_dir():
            return None
        for leftover in self.root.glob("*/.epoch_*"):
            leftover.unlink(missing_ok=True)
        for epoch in sorted(_epochs(self.root / COORDINATOR, "json"), reverse=True):
            files = {name: self.root / name / f"epoch_{epoch}.npz" for name in self.parties}
            if all(path.is_file() for path in files.values()):
                coordinator = json.loads((self.root / COORDINATOR / f"epoch_{epoch}.json").read_text("utf-8"))
                return epoch, {name: _load_npz(path) for name, path in files.items()}, coordinator
        return None


def _save_npz(path: Path, state: PartyCheckpoint) -> None:
    arrays = {f"w{i}": np.asarray(a) for i, a in enumerate(state.weights)}
    arrays.update({f"o{i}": np.asarray(a) for i, a in enumerate(state.optimizer_state)})
    arrays["noise_rng"] = np.array(json.dumps(state.noise_rng))
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with temporary.open("wb") as out:
        np.savez(out, **arrays)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def _load_npz(path: Path) -> PartyCheckpoint:
    with np.load(path) as stored:
        weights = [stored[f"w{i}"] for i in range(sum(k.startswith("w") for k in stored.files))]
        optimizer = [stored[f"o{i}"] for i in range(sum(k.startswith("o") for k in stored.files))]
        noise = json.loads(str(stored["noise_rng"]))
    return PartyCheckpoint(weights, optimizer, noise)


def _epochs(folder: Path, extension: str) -> list[int]:
    found = []
    for path in folder.glob(f"epoch_*.{extension}"):
        match = _EPOCH_FILE.match(path.name)
        if match:
            found.append(int(match.group(1)))
    return found


def _prune(folder: Path) -> None:
    """Keeps the KEPT newest epochs of one folder."""
    for extension in ("npz", "json"):
        for epoch in sorted(_epochs(folder, extension))[:-KEPT]:
            (folder / f"epoch_{epoch}.{extension}").unlink(missing_ok=True)
