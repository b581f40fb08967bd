"""The ``generator`` source: 5-minute loop-detector speeds calibrated to METR-LA.

A seeded, vectorized generator of 5-minute loop-detector speeds (mph) on a road
network, calibrated to the statistics of one real METR-LA week
(``../shared/ANCHORS.md``, "Traffic"; ``METR_LA_TARGETS`` and ``statistics`` in
``traffic/calibration.py``; ``benchmarks/traffic_stats.py`` prints both). Each
district has a few freeway corridors (4-6 sensors each, 0.5-1.5 miles apart,
sensors ordered upstream to downstream; consecutive sensors are the graph
neighbours).

Demand (flow / capacity) per corridor: weekday morning and evening peaks
(alternate corridors are inbound, heavier in the morning, or outbound, heavier in
the evening; peak times vary a little by corridor and day), a weekend pattern with
a midday hump and no sharp peaks, a day-to-day factor and a slow AR(1) factor.
Speeds use free flow about 65 mph (per district speed limits and per sensor) and
capacity 2000 veh/h/lane. Below capacity: the HCM basic-freeway speed-flow curve
(free flow up to 60 % of capacity, then a small fall), plus a recurrent weekday
slowdown of a few mph at a sensor-specific hour (merges, weaving). In a queue: the
congested branch of the triangular fundamental diagram (jam density 190
veh/mi/lane, backward wave speed w about 12.6 mph), so a queue discharging
q veh/h/lane moves at q / (k_jam - q / w): 0.83 x capacity -> 28 mph,
0.49 -> 9 mph, 0.17 -> 2 mph.

Queues (``traffic/queues.py``): recurrent bottlenecks at about half the sensors
(capacity 66-92 % of the upstream section; their own morning/evening mix of on-ramp
demand, with weekday peak demand 1.15-1.55 x capacity; a discharge rate that
fluctuates), and incidents (start weighted by demand, log-normal duration with
median 35 minutes, capacity left per HCM for 3 lanes: shoulder 0.83, one lane 0.49,
two lanes 0.17; districts differ in incident rate). Every queue is a point queue
(Lindley recursion, vectorized with a cumulative minimum) whose vehicles are laid
out upstream at the queue's density (times a storage factor: drivers leave long
queues for parallel streets), so the tail reaches upstream sensors with a lag;
inside a queue, changes of the discharge rate travel upstream at the wave speed, and
after an incident is cleared the recovery wave travels upstream from the incident
site. Moving jams (stop-and-go waves, ``queues.add_moving_jams``) are born in queues and
travel upstream at 9-12 mph for a few miles while the traffic they meet is dense, so a
sensor's readings tell what its upstream neighbours will read minutes later. They draw
from their own random stream: with ``jam_rate_per_hour = 0`` the readings are exactly
those of the generator before they were added.

The road graph is written as DCRNN's distance list (``distances``: from each sensor to
every sensor downstream on its corridor, metres along the road); ``traffic.data`` builds
the districts' graphs from it with the recipe used for users' files (``traffic/graph.py``).

Measurement: per-sensor gain (bias, sd 3 %) x true speed + AR(1) noise of
1.5-2 mph (phi 0.7; up to twice that at night, when a 5-minute average covers few
vehicles) + nearly white stop-and-go noise in congestion (up to 6 mph, growing with
the speed deficit, smaller at crawling speeds), clipped to 3-85 mph. Readings go
missing in blocks (sensor outages of minutes to hours, rare 1-4 day outages,
district-wide outages; about 8 % overall; every sensor keeps most readings).
Districts differ in demand level, speed limits and incident rates (stratified
over their ranges, so a few districts cover them). The default (6 districts x
12 sensors x 28 days) takes about 0.2 s after imports.

`simulate` returns plain arrays per district; ``traffic.data`` wraps them into the
source's ``TrafficData`` (and checks the job's config). Every random choice comes
from ``seed``. No TensorFlow here: this runs before the job's input is validated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from traffic.queues import (
    CAPACITY, STEPS_PER_DAY, STEPS_PER_HOUR, WAVE_SPEED, add_incidents, add_moving_jams, coverage, lindley,
    queue_density_gap, queue_speed,
)

__all__ = ["GeneratorParams", "simulate"]

METRES_PER_MILE = 1609.344


@dataclass(frozen=True)
class GeneratorParams:
    """Knobs of the generator (the defaults are the calibrated ones; tests vary a few)."""

    corridor_size: tuple[float, float] = (4.0, 6.0)  # sensors per corridor (uniform range)
    spacing_miles: tuple[float, float] = (0.5, 1.5)
    bottleneck_p: float = 0.5  # share of sensors at the front of a recurrent bottleneck
    bottleneck_capacity: tuple[float, float] = (0.66, 0.92)  # relative to the upstream section
    bottleneck_peak_excess: tuple[float, float] = (1.15, 1.55)  # weekday peak demand / bottleneck capacity
    demand_level: tuple[float, float] = (0.90, 1.04)  # per district
    section_load: tuple[float, float] = (0.75, 1.0)  # demand / capacity of a sensor's section vs the corridor's
    capacity_speed_drop: float = 0.03  # HCM: share of free-flow speed lost at capacity
    free_flow_district: tuple[float, float] = (60.5, 66.5)  # per district speed limit effect, mph
    free_flow_sensor_sd: float = 2.5
    gain_sd: float = 0.03  # per-sensor multiplicative bias
    day_sd: float = 0.035  # day-to-day demand factor (log scale), per corridor
    district_day_sd: float = 0.03
    slow_sd: float = 0.05  # within-day AR(1) demand fluctuation (log scale)
    slow_minutes: float = 45.0
    weekday_plateau: float = 0.45  # daytime demand between the peaks
    peak_major: tuple[float, float] = (0.42, 0.5)  # peak added on top: the corridor's main direction
    peak_minor: tuple[float, float] = (0.20, 0.28)  # ... and the other peak
    am_centre: tuple[float, float] = (7.3, 7.9)  # hour of a corridor's morning peak demand
    am_width: float = 0.9  # hours (sd of the bump)
    pm_width: float = 1.05
    evening_end: float = 20.5  # hour when the weekday daytime demand has half gone
    weekend_plateau: float = 0.48
    weekend_hump: float = 0.15
    peak_jitter_hours: float = 0.15  # day-to-day shift of a corridor's peak times (sd)
    bottleneck_tilt: float = 0.8  # a bottleneck's demand is up to this share more morning (or evening) than its corridor's
    bottleneck_day_sd: float = 0.03  # a bottleneck's own day-to-day demand factor (log scale)
    incidents_per_corridor_day: tuple[float, float] = (0.3, 1.0)  # per district (uniform range)
    incident_median_minutes: float = 35.0
    incident_sigma: float = 0.7
    # Vehicles per mile a queue stores beyond the arriving traffic, as a multiple of the
    # triangular diagram's (queue density - arrival density). Above 1 because drivers
    # leave a growing queue for parallel streets, so it grows shorter than a point queue.
    queue_storage: float = 10.0  # recurrent bottlenecks
    incident_queue_storage: float = 2.0  # incidents
    noise_sd: tuple[float, float] = (1.5, 2.0)  # free-flow noise, mph
    noise_phi: float = 0.7  # AR(1) coefficient of the sensor noise
    noise_per_deficit: float = 0.45  # extra noise sd per mph below free flow
    noise_congested_max: float = 6.0  # cap on the extra noise sd, mph
    noise_crawl_mph: float = 35.0  # below this true speed the extra noise shrinks in proportion
    congested_noise_phi: float = 0.1  # AR(1) coefficient of the stop-and-go noise
    discharge_sd: float = 0.1  # fluctuation of a queue's discharge rate (log scale)
    discharge_minutes: float = 20.0
    noise_night_boost: float = 1.0  # extra share of noise sd when demand is near zero
    local_dip_mph: tuple[float, float] = (2.0, 5.0)  # depth of a sensor's recurrent weekday dip
    missing_outages_per_sensor_day: float = 0.55
    missing_outage_median_steps: float = 12.0
    missing_outage_sigma: float = 1.2
    missing_long_outage_p: float = 0.15  # chance per sensor of one outage of 1-4 days (per 28 days)
    missing_district_outages_per_day: float = 0.15
    missing_district_median_steps: float = 18.0
    missing_single_p: float = 0.01
    incidents: bool = True
    # moving jams (stop-and-go waves) born in queues, travelling upstream (queues.add_moving_jams)
    jam_onset: float = 0.7  # a sensor below this share of its free-flow speed is in a queue
    jam_rate_per_hour: float = 1.0  # jams born per congested sensor-hour
    jam_speed_mph: tuple[float, float] = (9.0, 12.0)  # upstream travel speed (about the backward wave speed)
    jam_reach_miles: float = 3.0  # mean distance a jam travels before it dissolves
    jam_drop_mph: tuple[float, float] = (8.0, 20.0)  # speed lost while a jam passes a sensor


def simulate(
    start: pd.Timestamp, days: int, n_districts: int, sensors_per_district: int, seed: int, params: GeneratorParams
) -> tuple[pd.DatetimeIndex, list[dict]]:
    """(timestamps every 5 minutes from `start`, one dict per district).

    Each district's dict holds its sensor ids (``ids``), the measured ``speeds`` [T, S]
    (NaN = missing) and the ground truth behind them: ``clean`` true speeds [T, S],
    ``bottlenecks`` (sensor id at the queue front, capacity), ``incidents``,
    ``corridors`` (sensor ids upstream -> downstream), graph ``neighbours`` and the road graph as
    ``distances`` rows (from, to, metres along the road), DCRNN's distance-list format.
    """
    n_steps = days * STEPS_PER_DAY
    timestamps = pd.date_range(start, periods=n_steps, freq="5min")
    hours = np.asarray(timestamps.hour + timestamps.minute / 60.0, dtype=np.float64)
    weekend = np.asarray(timestamps.dayofweek >= 5)
    day_index = np.asarray((timestamps - timestamps[0].normalize()).days)
    root = np.random.SeedSequence([seed, 0x7261FF1C])
    district_seeds = root.spawn(n_districts + 1)
    # Districts differ in demand, speed limits and incident rates; their quantiles are
    # stratified (one per n-th of the range, shuffled) so that a handful of districts
    # covers the range instead of clustering by chance.
    strata_rng = np.random.default_rng(district_seeds.pop())
    strata = (
        np.stack([strata_rng.permutation(n_districts) for _ in range(3)], axis=1)
        + strata_rng.random((n_districts, 3))
    ) / n_districts
    districts = []
    for d, district_seed in enumerate(district_seeds):
        rng = np.random.default_rng(district_seed)
        districts.append(_generate_district(rng, d, strata[d], sensors_per_district, params, hours, weekend, day_index))
    return timestamps, districts


def _bump(hours: np.ndarray, centre: float, width: float) -> np.ndarray:
    """A Gaussian bump of height 1 on the 24-hour circle."""
    delta = (hours - centre + 12.0) % 24.0 - 12.0
    return np.exp(-0.5 * (delta / width) ** 2)


def _logistic(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _ar1(rng: np.random.Generator, n_steps: int, n_series: int, phi: float) -> np.ndarray:
    """Unit-variance AR(1) series [n_steps, n_series] with coefficient phi."""
    from scipy.signal import lfilter

    shocks = rng.standard_normal((n_steps, n_series)) * math.sqrt(1.0 - phi * phi)
    shocks[0] /= math.sqrt(1.0 - phi * phi)  # start in the stationary distribution
    return lfilter([1.0], [1.0, -phi], shocks, axis=0)


def _demand_profiles(rng, n_corridors, hours, weekend, day_index, params, level):
    """Demand relative to capacity, [T, n_corridors]."""
    n_steps = len(hours)
    n_days = int(day_index[-1]) + 1
    inbound = (np.arange(n_corridors) + rng.integers(2)) % 2 == 0  # alternate directions
    major, minor = params.peak_major, params.peak_minor
    am = np.where(inbound, rng.uniform(*major, n_corridors), rng.uniform(*minor, n_corridors))
    pm = np.where(inbound, rng.uniform(*minor, n_corridors), rng.uniform(*major, n_corridors))
    # peak times differ by corridor and, by a little, from day to day
    am_centre = rng.uniform(*params.am_centre, n_corridors) + params.peak_jitter_hours * rng.standard_normal((n_days, n_corridors))
    pm_centre = rng.uniform(16.6, 17.3, n_corridors) + params.peak_jitter_hours * rng.standard_normal((n_days, n_corridors))
    am_centre, pm_centre = am_centre[day_index], pm_centre[day_index]
    h = hours[:, None]
    plateau = params.weekday_plateau * _logistic((h - 5.8) / 0.5) * _logistic((params.evening_end - h) / 1.0)
    weekday = (
        0.10
        + plateau
        + am * _bump(h, am_centre, params.am_width)
        + pm * _bump(h, pm_centre, params.pm_width)
    )
    weekend_profile = (
        0.10
        + params.weekend_plateau * _logistic((h - 8.0) / 0.8) * _logistic((22.5 - h) / 1.0)
        + params.weekend_hump * _bump(h, 14.0, 2.8)
    )
    profile = np.where(weekend[:, None], weekend_profile, weekday)
    day_factor = np.exp(
        rng.normal(0.0, params.day_sd, (n_days, n_corridors))
        + rng.normal(0.0, params.district_day_sd, (n_days, 1))
    )
    phi = math.exp(-5.0 / params.slow_minutes)
    slow = np.exp(params.slow_sd * _ar1(rng, n_steps, n_corridors, phi))
    return level * profile * day_factor[day_index] * slow, profile


def _generate_district(rng, d, quantiles, n_sensors, params, hours, weekend, day_index):
    n_steps = len(hours)
    dt_hours = 1.0 / STEPS_PER_HOUR

    # ---- network: corridors of sensors, upstream -> downstream
    lo, hi = params.corridor_size
    n_corridors = int(min(max(1, n_sensors // 2), max(1, round(n_sensors / rng.uniform(lo, hi)))))
    sizes = np.full(n_corridors, n_sensors // n_corridors)
    sizes[: n_sensors % n_corridors] += 1
    corridor_of = np.repeat(np.arange(n_corridors), sizes)
    position = np.zeros(n_sensors)  # miles along the corridor
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    gaps = rng.uniform(*params.spacing_miles, n_sensors)
    for c in range(n_corridors):
        idx = np.arange(first[c], first[c] + sizes[c])
        position[idx] = np.concatenate([[0.0], np.cumsum(gaps[idx[1:]])])
    letters = "abcdefghijklmnopqrstuvwxyz"
    ids = [
        f"d{d + 1}-{_corridor_name(c, letters)}{j - first[c] + 1:02d}"
        for j, c in enumerate(corridor_of)
    ]
    neighbours = [
        (ids[j], ids[j + 1]) for j in range(n_sensors - 1) if corridor_of[j] == corridor_of[j + 1]
    ]
    corridors = [[ids[j] for j in range(first[c], first[c] + sizes[c])] for c in range(n_corridors)]
    # the road graph as DCRNN's distance list: from each sensor to every sensor downstream on its
    # corridor, in metres along the road (traffic can drive from `from` to `to`)
    distances = [
        (ids[a], ids[b], round(float(position[b] - position[a]) * METRES_PER_MILE, 1))
        for a in range(n_sensors) for b in range(a + 1, n_sensors) if corridor_of[a] == corridor_of[b]
    ]

    # ---- district character
    def within(bounds, q):
        return bounds[0] + (bounds[1] - bounds[0]) * q

    level = within(params.demand_level, quantiles[0])
    free_flow = np.clip(
        within(params.free_flow_district, quantiles[1]) + rng.normal(0.0, params.free_flow_sensor_sd, n_sensors),
        50.0,
        75.0,
    )
    incident_rate = within(params.incidents_per_corridor_day, quantiles[2])

    demand, profile = _demand_profiles(rng, n_corridors, hours, weekend, day_index, params, level)  # [T, C]
    # Spare capacity differs along a corridor: demand / capacity at each sensor's section.
    local_factor = rng.uniform(*params.section_load, n_sensors)
    local_demand = demand[:, corridor_of] * local_factor  # [T, S]

    # ---- free-flow branch: HCM speed-flow curve
    x = np.clip(local_demand, 0.0, 1.0)
    deficit_share = np.clip((x - 0.6) / 0.4, 0.0, 1.0) ** 2
    speed = free_flow * (1.0 - params.capacity_speed_drop * deficit_share)  # [T, S]

    # ---- recurrent local slowdowns (merges and weaving sections): a weekday dip at a
    # sensor-specific hour whose depth varies from day to day
    n_days = int(day_index[-1]) + 1
    dip_depth = rng.uniform(*params.local_dip_mph, n_sensors)
    dip_hour = rng.uniform(6.0, 20.0, n_sensors)
    dip_width = rng.uniform(0.7, 2.0, n_sensors)
    dip_day = rng.uniform(0.5, 1.5, (n_days, n_sensors))
    dip = dip_depth * _bump(hours[:, None], dip_hour, dip_width) * dip_day[day_index] * ~weekend[:, None]
    speed = speed - dip

    # ---- recurrent bottlenecks: a queue whose front is at sensor j (just upstream of the bottleneck)
    n_bottlenecks = int(params.bottleneck_p * n_sensors + rng.random())
    bottleneck_idx = np.sort(rng.choice(n_sensors, size=n_bottlenecks, replace=False))
    ratios = _stratified(rng, params.bottleneck_capacity, len(bottleneck_idx))
    front_offset = rng.uniform(0.05, 0.3, len(bottleneck_idx))  # miles from sensor j to the bottleneck
    if len(bottleneck_idx):
        # each bottleneck has its own mix of on-ramp traffic: more morning or more
        # evening than its corridor, and its own day-to-day and slow variation
        n_b = len(bottleneck_idx)
        n_days = int(day_index[-1]) + 1
        tilt = _stratified(rng, (-params.bottleneck_tilt, params.bottleneck_tilt), n_b)
        h = hours[:, None]
        shape = 1.0 + tilt * (_bump(h, 7.9, 1.2) - _bump(h, 17.6, 1.5)) * ~weekend[:, None]
        own = np.exp(
            rng.normal(0.0, params.bottleneck_day_sd, (n_days, n_b))[day_index]
            + params.slow_sd * _ar1(rng, n_steps, n_b, math.exp(-5.0 / params.slow_minutes))
        )
        # A bottleneck's capacity (relative to the upstream section) sets the speed in its
        # queue; its typical weekday peak demand is `excess` x its capacity.
        excess = _stratified(rng, params.bottleneck_peak_excess, n_b) * level / np.mean(params.demand_level)
        reference = (profile[:, corridor_of[bottleneck_idx]] * shape).max(axis=0)
        arrivals = demand[:, corridor_of[bottleneck_idx]] * shape * own * (ratios * excess / (level * reference))
        # the discharge rate of a queue fluctuates (driver mix, lane changes)
        discharge = ratios * np.exp(
            params.discharge_sd * _ar1(rng, n_steps, n_b, math.exp(-5.0 / params.discharge_minutes))
        )
        vehicles = lindley((arrivals - discharge) * CAPACITY * dt_hours)  # veh/lane, [T, B]
        length = vehicles / (queue_density_gap(ratios) * params.queue_storage)  # miles
        queued_speed = queue_speed(discharge)  # [T, B]
        for b, j in enumerate(bottleneck_idx):
            upstream = np.flatnonzero((corridor_of == corridor_of[j]) & (np.arange(n_sensors) <= j))
            distance = position[j] - position[upstream] + front_offset[b]
            cover = coverage(length[:, b : b + 1], distance[None, :], np.zeros((n_steps, 1)))
            # changes of the discharge rate travel upstream through the queue at the wave speed
            lag = np.round(distance / WAVE_SPEED * STEPS_PER_HOUR).astype(np.int64)
            rows = np.maximum(np.arange(n_steps)[:, None] - lag[None, :], 0)
            in_queue = queued_speed[rows, b]
            speed[:, upstream] = np.minimum(speed[:, upstream], cover * in_queue + (1.0 - cover) * speed[:, upstream])
    bottlenecks = [(ids[j], float(r)) for j, r in zip(bottleneck_idx, ratios)]

    # ---- incidents: temporary bottlenecks with HCM capacity left
    incidents = []
    if params.incidents:
        incidents = add_incidents(
            rng, speed, demand, corridor_of, position, sizes, first, ids, incident_rate, params
        )

    # ---- moving jams: born in the queues above, travelling upstream (their own random stream,
    # so the draws below are those of a generator without them)
    jam_rng = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0]) if params.jam_rate_per_hour else None
    if jam_rng is not None:
        add_moving_jams(jam_rng, speed, local_demand, corridor_of, position, free_flow, params)

    # ---- measurement: gain (bias) x speed + heteroscedastic AR(1) noise, then missing blocks
    clean = speed
    gain = 1.0 + rng.normal(0.0, params.gain_sd, n_sensors)
    base_sd = rng.uniform(*params.noise_sd, n_sensors)
    # stop-and-go: noise grows with the speed deficit, but crawling traffic varies little
    deficit = np.maximum(free_flow - clean, 0.0)
    congested_sd = np.minimum(params.noise_per_deficit * deficit, params.noise_congested_max) * np.minimum(
        1.0, clean / params.noise_crawl_mph
    )
    # few vehicles at night: a noisier 5-minute average
    sd = base_sd * (1.0 + params.noise_night_boost * np.clip(1.0 - local_demand / 0.4, 0.0, 1.0))
    noise = sd * _ar1(rng, n_steps, n_sensors, params.noise_phi)
    noise += congested_sd * _ar1(rng, n_steps, n_sensors, params.congested_noise_phi)
    measured = np.clip(gain * clean + noise, 3.0, 85.0)
    missing = _missing_mask(rng, n_steps, n_sensors, params)
    measured[missing] = np.nan
    return {
        "ids": ids,
        "speeds": measured,
        "clean": clean,
        "bottlenecks": bottlenecks,
        "incidents": incidents,
        "corridors": corridors,
        "neighbours": neighbours,
        "distances": distances,
    }


def _stratified(rng: np.random.Generator, bounds: tuple[float, float], n: int) -> np.ndarray:
    """n values spread over [lo, hi): one uniform draw in each n-th of the range, shuffled."""
    quantiles = (rng.permutation(n) + rng.random(n)) / max(n, 1)
    return bounds[0] + (bounds[1] - bounds[0]) * quantiles


def _corridor_name(c: int, letters: str) -> str:
    return letters[c] if c < len(letters) else f"{letters[c // len(letters) - 1]}{letters[c % len(letters)]}"


def _missing_mask(rng, n_steps, n_sensors, params) -> np.ndarray:
    """Blocks of missing readings: sensor outages, rare long outages, district-wide outages."""
    n_days = n_steps / STEPS_PER_DAY
    change = np.zeros((n_steps + 1, n_sensors), dtype=np.int32)

    def add_blocks(sensor, starts, lengths):
        ends = np.minimum(starts + lengths, n_steps)
        np.add.at(change, (starts, sensor), 1)
        np.add.at(change, (ends, sensor), -1)

    rate = params.missing_outages_per_sensor_day * rng.gamma(2.0, 0.5, n_sensors)  # some sensors flakier
    counts = rng.poisson(rate * n_days)
    sensor = np.repeat(np.arange(n_sensors), counts)
    starts = rng.integers(0, n_steps, len(sensor))
    lengths = np.maximum(
        1, np.round(rng.lognormal(math.log(params.missing_outage_median_steps), params.missing_outage_sigma, len(sensor)))
    ).astype(np.int64)
    add_blocks(sensor, starts, lengths)

    long_p = min(1.0, params.missing_long_outage_p * n_days / 28.0)
    has_long = np.flatnonzero(rng.random(n_sensors) < long_p)
    starts = rng.integers(0, n_steps, len(has_long))
    lengths = rng.integers(STEPS_PER_DAY, 4 * STEPS_PER_DAY, len(has_long))
    add_blocks(has_long, starts, lengths)

    n_district = rng.poisson(params.missing_district_outages_per_day * n_days)
    starts = rng.integers(0, n_steps, n_district)
    lengths = np.maximum(
        1, np.round(rng.lognormal(math.log(params.missing_district_median_steps), 1.0, n_district))
    ).astype(np.int64)
    for s in range(n_sensors):
        add_blocks(np.full(n_district, s), starts, lengths)

    missing = np.cumsum(change[:-1], axis=0) > 0
    missing |= rng.random((n_steps, n_sensors)) < params.missing_single_p
    # every sensor keeps at least half of its readings
    too_many = np.flatnonzero(missing.mean(axis=0) > 0.5)
    for s in too_many:
        missing[: n_steps // 2, s] = False
    return missing
