"""Each sensor's typical speed by time of day (traffic/typical.py): weekdays and weekends apart,
smoothed over neighbouring slots, only training readings, and the fallbacks for empty slots."""

from __future__ import annotations

import numpy as np
import pandas as pd

from traffic import typical
from traffic.windows import epoch_seconds


def _week(interval_minutes: int) -> tuple[pd.DatetimeIndex, np.ndarray]:
    """Monday 2012-03-05 00:00 on, two weeks at the interval."""
    timestamps = pd.date_range("2012-03-05", periods=14 * 1440 // interval_minutes, freq=f"{interval_minutes}min")
    return timestamps, epoch_seconds(timestamps)


def test_weekdays_and_weekends_have_their_own_profile_from_training_readings_only():
    timestamps, seconds = _week(60)  # one slot an hour: no smoothing (SMOOTHING_MINUTES < 60)
    weekend = timestamps.dayofweek >= 5
    speeds = np.where(weekend, 2.0, 1.0)[:, None] + np.array([[0.0, 10.0]])  # two sensors
    speeds[timestamps.hour == 8, 0] = np.where(weekend[timestamps.hour == 8], 2.0, -3.0)  # a weekday dip at 8
    train_end = 7 * 24  # the first week; the second one (changed below) must not count
    speeds[train_end:] = 99.0
    table = typical.typical_table(speeds, seconds, train_end, 60)
    assert table.shape == (typical.DAY_TYPES, 24, 2)
    np.testing.assert_allclose(table[0, :, 1], 11.0)
    np.testing.assert_allclose(table[1, :, 1], 12.0)
    assert table[0, 8, 0] == -3.0 and table[0, 9, 0] == 1.0 and table[1, 8, 0] == 2.0
    # a window's typical speeds are the table at its steps: Tuesday 07:00-09:00 of week two
    steps = np.array([[7 * 24 + 24 + 7, 7 * 24 + 24 + 8, 7 * 24 + 24 + 9]])
    np.testing.assert_allclose(typical.typical_at(table, seconds, steps, np.array([0]), 60), [[1.0, -3.0, 1.0]])


def test_slots_are_smoothed_over_their_neighbours_and_empty_slots_fall_back():
    timestamps, seconds = _week(5)
    speeds = np.zeros((len(timestamps), 2))
    at_noon = (timestamps.hour == 12) & (timestamps.minute == 0)
    speeds[at_noon, 0] = 3.0  # one reading of 3 a day at 12:00, 0 at 11:55 and 12:05
    weekend = timestamps.dayofweek >= 5
    speeds[weekend, 1] = np.nan  # sensor 1 never reads on weekends ...
    speeds[~weekend, 1] = 4.0
    speeds[(~weekend) & (timestamps.hour == 3), 1] = np.nan  # ... nor on weekdays from 03:00 to 04:00
    table = typical.typical_table(speeds, seconds, len(seconds), 5)
    noon = 12 * 12
    np.testing.assert_allclose(table[:, noon - 1 : noon + 2, 0], [[1.0, 1.0, 1.0]] * 2)  # (0 + 3 + 0) / 3
    np.testing.assert_allclose(table[:, noon + 2, 0], 0.0)
    np.testing.assert_allclose(table[1, :, 1][np.arange(288) // 12 != 3], 4.0)  # weekends take weekdays'
    np.testing.assert_allclose(table[:, 3 * 12 + 2 : 3 * 12 + 10, 1], 0.0)  # neither: the sensor's mean (0)
    assert table[0, 3 * 12, 1] == 4.0  # 03:00 still sees 02:55 within its window
