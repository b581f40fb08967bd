"""A party's noise at its site (`vertical_sites.SiteEpochComputations._noise`): keyed by the
party's secret seed file and public (epoch, batch) counters, so a resumed run replays it."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from tests.tff_apps.learning.test_vertical import LOGISTIC
from tff_apps.learning.vertical_sites import SiteEpochComputations


def noise(comps, folder, std, epoch, batch, n=20000):
    return comps._noise(tf.constant(str(folder)), tf.constant(std), tf.constant([epoch, batch], tf.int64), [n]).numpy()


def test_the_same_seed_and_counters_give_the_same_noise_and_other_counters_fresh_noise(tmp_path):
    comps = SiteEpochComputations(LOGISTIC, 2, 3)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for party in ("a", "b"):
        (tmp_path / party / "noise_seed").write_bytes(os.urandom(16))
    first = noise(comps, tmp_path / "a", 0.5, 3, 7)
    np.testing.assert_array_equal(first, noise(comps, tmp_path / "a", 0.5, 3, 7))  # a resumed epoch
    for other in (noise(comps, tmp_path / "a", 0.5, 3, 8), noise(comps, tmp_path / "a", 0.5, 4, 7),
                  noise(comps, tmp_path / "b", 0.5, 3, 7)):
        assert abs(np.corrcoef(first, other)[0, 1]) < 0.05
    assert abs(first.std() / 0.5 - 1) < 0.03 and abs(first.mean()) < 0.02
