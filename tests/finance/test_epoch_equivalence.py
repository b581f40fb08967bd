"""Many mini-batches per TFF call (`tff_apps.learning.vertical_epoch`) against the per-batch
protocol it replaced (`per_batch_reference`): a small job trained both ways ends with the
same weights, within the bound the fixed-point secure sum allows.

Both paths send the same fixed-point scores through the same secure sum and draw the same
noise (seeded generators here), so their only difference is float32 association: the chunk
forms g~ = sigmoid(z)/n + (noise - y/n) at the coordinator, the per-batch lender
(sigmoid(z) - y)/n + noise. Each path is within `error_bound` (test_vertical's derivation:
the fixed-point step of every party's score plus float32 rounding, propagated through SGD) of
the float64 centralized reference, so they are within twice that of each other.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.finance.per_batch_reference import train_per_batch
from tests.tff_apps.learning.test_vertical import error_bound, flat, make_data, reference_sgd
from tff_apps.learning import vertical
from tff_apps.program import vertical_rounds



@pytest.fixture(scope="module")
def runtime():
    from tff_apps.runtime.context import Runtime

    with Runtime() as rt:
        yield rt


SGD = vertical.VerticalSettings(kind="logistic", epochs=2, batch_size=48, learning_rate=0.5, l2=1e-3, seed=4)


def both_paths(monkeypatch, parties, y, settings, chunk: int):
    """(chunked result, per-batch result); the label and partial noise come from the same seeded
    generators in both, and the chunk holds at most `chunk` batches."""
    monkeypatch.setattr(vertical_rounds, "unseeded_generator", lambda: np.random.default_rng(1234))
    monkeypatch.setattr(vertical_rounds, "CHUNK_BATCHES", chunk)
    fast = vertical_rounds.train_vertical(parties, y, settings, progress=False)
    slow = train_per_batch(monkeypatch, parties, y, settings, progress=False)
    return fast, slow


def test_chunked_sgd_equals_the_per_batch_path_within_the_fixed_point_bound(runtime, monkeypatch):
    """400 rows, 48 a batch: 9 batches an epoch (the last of 16 rows), 4 to a chunk, so an epoch
    is chunks of 4, 4 and 1; label noise on (every batch's noise drawn as before)."""
    parties, y = make_data()
    settings = dataclasses.replace(SGD, label_noise_multiplier=0.5)
    fast, slow = both_paths(monkeypatch, parties, y, settings, chunk=4)
    draws = np.random.default_rng(1234)  # the lender's noise, as both paths drew it
    noise = [
        draws.standard_normal(len(rows)) * settings.label_noise_multiplier / len(rows)
        for e in range(1, settings.epochs + 1) for rows in vertical.batch_indices(len(y), 48, e, settings.seed)
    ]
    _, steps = reference_sgd(parties, y, settings, noise=[n.astype(np.float32).astype(np.float64) for n in noise])
    bound, fixed = error_bound(parties, settings, steps)
    diff = np.abs(flat(fast.party_weights) - flat(slow.party_weights)).max()
    print(f"chunked vs per-batch (logistic, SGD, label noise): max |dw| = {diff:.3e}, bound {2 * bound:.3e}")
    assert diff <= 2 * bound
    assert fast.coordinator.step == slow.coordinator.step == 2 * 9
    np.testing.assert_allclose([r["loss"] for r in fast.history], [r["loss"] for r in slow.history], rtol=1e-5)
    assert fast.tff_calls == 2 * (1 + 3 + 1)  # per epoch: the lender's release, 3 chunks, the lender's loss


def test_chunked_adam_mlp_with_partial_noise_equals_the_per_batch_path(runtime, monkeypatch):
    """The other model and optimizer, a partner adding noise to its scores, one chunk an epoch
    (4 batches: 100 rows each). Differences are float32 association in g, propagated through
    Adam: held to one fixed-point step of a score."""
    parties, y = make_data()
    settings = dataclasses.replace(
        SGD, kind="mlp", hidden_units=4, optimizer="adam", learning_rate=0.02, partial_noise_std=0.1, batch_size=100
    )
    fast, slow = both_paths(monkeypatch, parties, y, settings, chunk=512)
    diff = np.abs(np.concatenate([a.ravel() - b.ravel() for p, q in zip(fast.party_weights, slow.party_weights) for a, b in zip(p, q)]))
    print(f"chunked vs per-batch (mlp, Adam, partial noise): max |dw| = {diff.max():.3e}")
    assert diff.max() <= 2.0**-vertical.SCORE_FRACTION_BITS
    assert fast.tff_calls == 2 * 3 and slow.tff_calls == 2 * 2 * 4 + 1
