"""Split-model training with every party at its own site: `vertical_rounds.train_vertical`'s
loop (epochs, checkpoints, resume, metrics log) over `learning.vertical_sites`' computations.

The coordinator holds what it holds in a simulation, minus the parties' weights: the seeded
batch order, u and z, the coordinator state. Each party's weights and optimizer state stay in
its run folder at its site, under one tag per epoch (`e<epoch>`, chunks in between
`e<epoch>c<k>`); a checkpoint of the coordinator names the epoch, and a resumed run reads
each party's `e<epoch>` state at its site. Each party's DP noise comes from its own secret
seed at its site, folded with (epoch, chunk) counters, so the epochs a resumed run replays
release the very values the killed attempt released (label-DP ε counts each epoch once).

Before an epoch's batches (and before each evaluation) the coordinator asks every party's
gateway for its pairwise masks of that purpose (`masks(purpose, rows, bits)`, the app's gateway
calls; `tff_apps.sites.vertical_masks`): each party's values enter the secure sum masked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from tff_apps.learning.vertical import (
    CoordinatorState, VerticalResult, VerticalSettings, initial_weights, pad_weights,
)
from tff_apps.learning.vertical_sites import SiteEpochComputations, ring_bits
from tff_apps.program import vertical_rounds
from tff_apps.program.vertical_rounds import EVAL_MESSAGE_KINDS, MESSAGE_KINDS, _checked_bitwidth


@dataclass(frozen=True)
class SiteParty:
    """A party as the coordinator knows it: its site's run folder (a path at the site), its
    encoded width and whether it is the lender (party 0)."""

    name: str
    folder: str
    width: int


def train_vertical_at_sites(
    parties: list[SiteParty], n_train: int, n_test: int, settings: VerticalSettings,
    metrics: Callable[[np.ndarray, np.ndarray], dict[str, Any]], masks: Callable[[str, int, int], str], *,
    run_dir=None, progress: bool = True, checkpoint_every: int = 0,
) -> tuple[VerticalResult, dict[str, Any]]:
    """Trains inside a Runtime over the parties' sites (client i = party i, the lender first);
    returns the result and the lender's metrics of the final model. `metrics(labels, scores)`
    is the lender's metrics code: it gets the lender's held-out labels and scores rebuilt from
    the histograms its site computed from z (exact to 1/4096 of a score). `masks(purpose, rows, bits)`
    has every party write its masks of that purpose in Z_{2^bits} and returns the file's name."""
    started = time.perf_counter()
    training = _SiteTraining(parties, n_train, n_test, settings, masks)

    def evaluate(z: np.ndarray) -> dict[str, Any]:
        report = training.lender_report(z, metrics)
        return {"auc": report["auc"], "ks": report["ks"]}

    result = vertical_rounds.drive(training, [], evaluate, run_dir, progress, checkpoint_every, started)
    return result, training.lender_report(result.eval_logits, metrics)


class _SiteTraining(vertical_rounds._Training):
    """`_Training` whose parties' values live at their sites (module docstring)."""

    def __init__(self, parties: list[SiteParty], n_train: int, n_test: int, settings: VerticalSettings,
                 masks: Callable[[str, int, int], str]):
        self.s, self.parties, self.masks = settings, parties, masks
        self.mask_name, self.mask_offset = "", 0  # the epoch's mask file, the next batch's first row in it
        self.rows, self.n_test, self.n_parties = n_train, n_test, len(parties)
        width = max(party.width for party in parties)
        self.comps = _checked_bitwidth(SiteEpochComputations(settings, self.n_parties, width))
        self.coordinator = CoordinatorState(self.n_parties, self.rows, settings.batch_size, ring_bits(self.comps))
        self.eval_bytes = dict.fromkeys(EVAL_MESSAGE_KINDS, 0)
        self.last_epoch_bytes = dict.fromkeys(MESSAGE_KINDS, 0)
        self.eval_logits: np.ndarray | None = None
        self.resumed_after_epoch = 0
        self.states = []  # nothing of a party's here
        self.tag, self._flip = "e0", 0  # the state the next call reads; working tags alternate w0, w1
        self.pending = (np.zeros(0, np.int32), np.zeros(0, np.float32))  # the last batch's rows and g~
        self._initialize(width)

    def _initialize(self, width: int) -> None:
        """Each party's initial weights (public: from the job's seed) written at its site."""
        s = self.s
        weights = [pad_weights(initial_weights(s.kind, p.width, s.hidden_units, s.seed, i), width)
                   for i, p in enumerate(self.parties)]
        optimizer = [self.comps.initial_optimizer_state() for _ in self.parties]
        self.comps.site_init([p.folder for p in self.parties], ["e0"] * self.n_parties, weights, optimizer)

    def _is_lender(self) -> list[bool]:
        return [i == 0 for i in range(self.n_parties)]

    def _release(self, batches, order, batch_rows, epoch: int) -> np.ndarray:
        """The lender's u of the epoch (as `_Training._release`); first every party writes the
        epoch's masks."""
        self.mask_name, self.mask_offset = self.masks(f"train-e{epoch}", self.rows, ring_bits(self.comps)), 0
        sigma = np.float32(self.s.label_noise_multiplier)
        return self.comps.site_release([
            (p.folder, lender, order.astype(np.int32), batch_rows, sigma, np.array([epoch, 0], np.int64))
            for p, lender in zip(self.parties, self._is_lender())
        ])

    def _losses(self, z, order, batch_of_row, batches: int) -> np.ndarray:
        zeros = np.zeros_like(z)
        return self.comps.site_loss([
            (p.folder, lender, z if lender else zeros, order.astype(np.int32), batch_of_row)
            for p, lender in zip(self.parties, self._is_lender())
        ], batches)

    def _chunk(self, chunk: list[np.ndarray], u: np.ndarray, where: tuple[int, int, int]) -> np.ndarray:
        """The chunk's batches one TFF call each (a site computation has one aggregation), the
        previous batch's update riding with the next batch's encoding; the epoch's last batch
        is followed by its update alone, which writes the party's `e<epoch>` state."""
        epoch, start, batches = where
        z, done = [], 0
        for k, rows in enumerate(chunk):
            batch = start + k
            z.append(self._step(rows, np.array([epoch, 1 + batch], np.int64)))
            self.pending = rows, self.comps.gradient(z[-1], u[done : done + len(rows)])
            done += len(rows)
        if start + len(chunk) >= batches:
            self._call_parties(np.zeros(0, np.int32), np.zeros(2, np.int64), f"e{epoch}")
        self.coordinator.step += len(chunk)
        return np.concatenate(z)

    def _step(self, rows: np.ndarray, stream: np.ndarray) -> np.ndarray:
        z = self._call_parties(rows.astype(np.int32), stream, f"w{self._flip}")
        self.mask_offset += len(rows)
        return z

    def _call_parties(self, rows: np.ndarray, stream: np.ndarray, tag_out: str):
        prev_rows, g_prev = self.pending
        sites = [
            (p.folder, self.tag, tag_out, np.int32(p.width), prev_rows.astype(np.int32), rows,
             np.float32(self.s.partial_noise_std if i > 0 else 0.0), stream, self.mask_name,
             np.int32(self.mask_offset))
            for i, p in enumerate(self.parties)
        ]
        if len(rows):
            result = self.comps.site_step(sites, g_prev)
        else:
            result = self.comps.site_flush(sites, g_prev)
        self.tag, self.pending = tag_out, (np.zeros(0, np.int32), np.zeros(0, np.float32))
        self._flip = 1 - self._flip
        return result

    def evaluate_now(self) -> np.ndarray:
        """z of the held-out customers, each party scoring its own rows with its weights at its site."""
        masks = self.masks(f"test-{self.tag}", self.n_test, ring_bits(self.comps))
        sites = [(p.folder, self.tag, np.int32(p.width), masks) for p in self.parties]
        self.eval_logits = self.comps.site_evaluate(sites, self.n_test)
        vertical_rounds._count_evaluation(self.eval_bytes, self.n_test, self.n_parties)
        return self.eval_logits

    def lender_report(self, z: np.ndarray, metrics: Callable) -> dict[str, Any]:
        """The lender's metrics of z: z goes to the lender's site only, which returns its histograms."""
        from tff_apps.sites.site_computations import scores_from_histogram

        zeros = np.zeros_like(z)
        histogram = self.comps.site_histograms([
            (p.folder, lender, z if lender else zeros) for p, lender in zip(self.parties, self._is_lender())
        ])
        return metrics(*scores_from_histogram(histogram))

    # -- checkpoints: the coordinator's only; each party's state is its `e<epoch>` at its site --

    def _noise_states(self) -> list:
        return []

    def party_checkpoints(self) -> dict:
        return {}

    def restore(self, latest) -> int:
        epoch = super().restore(latest)
        self.tag = f"e{epoch}"
        return epoch
