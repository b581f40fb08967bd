"""The pairwise masks of the vertical secure sum across sites (`tff_apps.sites.vertical_masks`),
as each party's gateway writes them, and as its TensorFlow adds them (`vertical_sites._masked`)."""

from __future__ import annotations

import stat

import numpy as np
import pytest

from shared import secagg_wire as wire
from tff_apps.sites import vertical_masks

BITS = 24


@pytest.fixture
def folders(tmp_path):
    """Three parties' run folders (each would be at its own site)."""
    made = [tmp_path / name for name in ("lender", "partner1", "partner2")]
    for folder in made:
        folder.mkdir()
    return made


def _write(folders, purpose: str, length: int, bits: int = BITS) -> list[np.ndarray]:
    keys = [wire.b64(vertical_masks.public_key(folder)) for folder in folders]
    masks = []
    for index, folder in enumerate(folders):
        body = {"keys": keys, "index": index, "purpose": purpose, "length": length, "bits": bits}
        name = vertical_masks.write_masks(folder, body)["file"]
        masks.append(np.fromfile(folder / name, "<i8"))
    return masks


def test_the_parties_masks_cancel_in_the_ring_and_each_one_looks_uniform(folders):
    masks = _write(folders, "train-e1", 20_000)
    assert np.all(np.sum(masks, axis=0) % 2**BITS == 0)
    for mask in masks:
        assert mask.min() >= 0 and mask.max() < 2**BITS
        # chi-square over 16 equal bins of the ring: 15 degrees of freedom, p = 1e-6 at 50.3
        counts = np.bincount(mask >> (BITS - 4), minlength=16)
        expected = len(mask) / 16
        assert np.sum((counts - expected) ** 2 / expected) < 50.3


def test_a_masked_vector_sums_exactly_and_hides_the_party_values(folders):
    """What the coordinator sees: each party's q + m mod 2^bits; only their sum decodes."""
    rng = np.random.default_rng(0)
    q = [rng.integers(0, 2**20, 5_000) for _ in folders]
    masks = _write(folders, "test-e3", 5_000)
    seen = [(v + m) % 2**BITS for v, m in zip(q, masks)]
    assert np.array_equal(np.sum(seen, axis=0) % 2**BITS, np.sum(q, axis=0))
    # a party's values (all below 2^20) would sit in the ring's lowest 16th; masked, they spread over it
    assert all(np.mean(s >= 2**20) > 0.9 for s in seen)


def test_masks_differ_by_purpose_and_by_run_and_repeat_for_the_same_purpose(folders, tmp_path):
    first, again, other = (_write(folders, p, 1_000)[0] for p in ("train-e1", "train-e1", "train-e2"))
    assert np.array_equal(first, again)  # a resumed epoch replays the same values under the same masks
    assert np.mean(first == other) < 0.01
    new_run = [tmp_path / f"run2-{i}" for i in range(3)]
    for folder in new_run:
        folder.mkdir()
    assert np.mean(_write(new_run, "train-e1", 1_000)[0] == first) < 0.01


def test_the_private_key_stays_in_a_file_only_its_owner_reads(folders):
    key = vertical_masks.public_key(folders[0])
    assert vertical_masks.public_key(folders[0]) == key
    mode = (folders[0] / vertical_masks.KEY_FILE).stat().st_mode
    assert stat.S_IMODE(mode) == 0o600


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"index": 1}, "not this party's key"),
        ({"purpose": "train-w0"}, "purpose must be"),
        ({"purpose": "../x"}, "purpose must be"),
        ({"bits": 60}, "bits must be"),
        ({"length": 0}, "length must be"),
        ({"keys": "dup"}, "distinct"),
        ({"keys": "one"}, "at least 2"),
    ],
)
def test_a_bad_write_request_is_refused_in_one_line(folders, change, message):
    keys = [wire.b64(vertical_masks.public_key(folder)) for folder in folders]
    body = {"keys": keys, "index": 0, "purpose": "train-e1", "length": 10, "bits": BITS, **change}
    if change.get("keys") == "dup":
        body["keys"] = [keys[0], keys[0], keys[1]]
    if change.get("keys") == "one":
        body["keys"] = keys[:1]
    with pytest.raises(wire.WireError, match=message):
        vertical_masks.write_masks(folders[0], body)
    assert not list(folders[0].glob("masks-*"))


def test_the_party_tensorflow_adds_its_mask_and_the_coordinator_decodes_the_sum(folders):
    """`vertical_sites._masked` at each party, `_ring_decoder` at the coordinator (plain TF here)."""
    import tensorflow as tf

    from tff_apps.learning.vertical import SCORE_FRACTION_BITS, SecureScoreSum
    from tff_apps.learning.vertical_sites import _masked, ring_bits

    summer = SecureScoreSum(3, 32.0)
    bits = ring_bits(summer)
    assert 3 * 2 * summer.offset < 2**bits
    scores = np.random.default_rng(1).normal(size=(3, 40)) * 4
    masks = _write(folders, "score", 50, bits)
    name = vertical_masks.mask_file("score")
    seen = [_masked(summer._fixed_point(tf.constant(s)), str(f), name, 7, 40, bits).numpy()
            for s, f in zip(scores, folders)]
    assert np.array_equal(seen[0], (summer._fixed_point(tf.constant(scores[0])).numpy() + masks[0][7:47]) % 2**bits)
    total = np.sum(seen, axis=0) % 2**bits - 3 * summer.offset
    assert np.max(np.abs(total * 2.0**-SCORE_FRACTION_BITS - scores.sum(axis=0))) <= 3 * 2.0 ** -(SCORE_FRACTION_BITS + 1)
