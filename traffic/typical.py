"""Each sensor's typical speed by time of day, an input of the graph models.

A graph model's weights are shared by every sensor of every district, so by itself it cannot
know that one sensor slows every weekday at 17:10 and its neighbour does not: a district's own
model learns its sensors' habits from their histories, one set of weights for all districts
cannot (docs/traffic.md, "Typical speed"). So each district gives the model, beside each
sensor's hour, the sensor's typical speed at every step of that hour and of the hour to
forecast: the mean of its training readings (on its own scale) at that time of day, on
weekdays or on weekends, over a window of `SMOOTHING_MINUTES` around it (a few weeks hold a
few readings per slot; one week, one).

The table is computed by the district from its own training split, as its scale is; nothing
leaves it (the same arithmetic runs at the sites in TF ops, traffic/site_computations.py).
No reading after the training split enters a table, so test windows see only the past.
"""

from __future__ import annotations

import numpy as np

from traffic.windows import EPOCH_WEEKDAY_SHIFT, SECONDS_PER_DAY

DAY_TYPES = 2  # weekday, weekend
# readings within this many minutes either side of a slot count for it (3 slots at 5 minutes)
SMOOTHING_MINUTES = 5


def day_slots(seconds: np.ndarray, interval_minutes: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(day type [T]: 0 weekday, 1 weekend; slot of the day [T]; slots a day) of each timestamp."""
    interval = interval_minutes * 60.0
    slots_per_day = int(round(SECONDS_PER_DAY / interval))
    weekday = ((seconds + EPOCH_WEEKDAY_SHIFT) // SECONDS_PER_DAY) % 7  # 0 = Monday
    slot = np.floor((seconds % SECONDS_PER_DAY) / interval).astype(int) % slots_per_day
    return (weekday >= 5).astype(int), slot, slots_per_day


def typical_table(normalized: np.ndarray, seconds: np.ndarray, train_end: int, interval_minutes: int) -> np.ndarray:
    """[DAY_TYPES, slots a day, sensors]: each sensor's mean normalized training speed at each
    slot (NaN readings skipped). A slot without readings takes the other day type's value at it,
    and 0 (the sensor's training mean) where neither has one."""
    day_type, slot, slots_per_day = day_slots(seconds[:train_end], interval_minutes)
    train = normalized[:train_end]
    observed = ~np.isnan(train)
    sums = np.zeros((DAY_TYPES, slots_per_day, train.shape[1]))
    counts = np.zeros_like(sums)
    np.add.at(sums, (day_type, slot), np.where(observed, train, 0.0))
    np.add.at(counts, (day_type, slot), observed)
    reach = int(SMOOTHING_MINUTES // interval_minutes)
    sums = sum(np.roll(sums, k, axis=1) for k in range(-reach, reach + 1))  # the day wraps around
    counts = sum(np.roll(counts, k, axis=1) for k in range(-reach, reach + 1))
    mean = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    other = mean[::-1]  # weekday <-> weekend
    other_counts = counts[::-1]
    return np.where(counts > 0, mean, np.where(other_counts > 0, other, 0.0)).astype(np.float32)


def typical_at(table: np.ndarray, seconds: np.ndarray, steps: np.ndarray, sensors: np.ndarray, interval_minutes: int) -> np.ndarray:
    """The table's value for sensor `sensors[i]` at time step `steps[i, k]` (same shape as steps)."""
    day_type, slot, _ = day_slots(seconds, interval_minutes)
    return table[day_type[steps], slot[steps], sensors[:, None]]
