"""Traffic data: loop-detector speeds, one table per road district (the clients).

Two sources (``[data] source``):

``generator`` (default, embedded)
    A seeded, vectorized generator of 5-minute loop-detector speeds (mph) on a road
    network, calibrated to the statistics of one real METR-LA week
    (``../shared/ANCHORS.md``, "Traffic"; ``METR_LA_TARGETS`` and ``statistics``
    below; ``benchmarks/traffic_stats.py`` prints both). Each district has a few
    freeway corridors (4-6 sensors each, 0.5-1.5 miles apart, sensors ordered
    upstream to downstream; consecutive sensors are the graph neighbours).

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

    Queues: recurrent bottlenecks at about half the sensors (capacity 66-92 % of the
    upstream section; their own morning/evening mix of on-ramp demand, with weekday
    peak demand 1.15-1.55 x capacity; a discharge rate that fluctuates), and incidents
    (start weighted by demand, log-normal duration with median 35 minutes, capacity
    left per HCM for 3 lanes: shoulder 0.83, one lane 0.49, two lanes 0.17; districts
    differ in incident rate). Every queue is a point queue (Lindley recursion,
    vectorized with a cumulative minimum) whose vehicles are laid out upstream at the
    queue's density (times a storage factor: drivers leave long queues for parallel
    streets), so the tail reaches upstream sensors with a lag; inside a queue, changes
    of the discharge rate travel upstream at the wave speed, and after an incident is
    cleared the recovery wave travels upstream from the incident site.

    Measurement: per-sensor gain (bias, sd 3 %) x true speed + AR(1) noise of
    1.5-2 mph (phi 0.7; up to twice that at night, when a 5-minute average covers few
    vehicles) + nearly white stop-and-go noise in congestion (up to 6 mph, growing with
    the speed deficit, smaller at crawling speeds), clipped to 3-85 mph. Readings go
    missing in blocks (sensor outages of minutes to hours, rare 1-4 day outages,
    district-wide outages; about 8 % overall; every sensor keeps most readings).
    Districts differ in demand level, speed limits and incident rates (stratified
    over their ranges, so a few districts cover them). The default (6 districts x
    12 sensors x 28 days) takes about 0.2 s after imports.

``csv`` (the user's data, METR-LA / PEMS-BAY style)
    ``layout = "wide"``: one row per timestamp, one column per sensor (a timestamp
    column named by ``timestamp_column``; when that is empty, the first column if it
    is not numeric, otherwise no timestamp column and readings every
    ``interval_minutes`` from ``start_time``). ``layout = "long"``: one row per
    reading with ``timestamp_column`` (empty means ``timestamp``), ``sensor_column``
    and ``value_column``; duplicate (timestamp, sensor) rows are an error.
    Timestamps are sorted and put on the regular ``interval_minutes`` grid from the
    first to the last timestamp; grid steps without a row become missing readings. A
    timestamp off that grid, a duplicate timestamp, or an unparseable one is an error
    naming the file, column and row.
    ``metadata_path`` (required) maps sensors to districts: a CSV with
    ``sensor_column`` and either ``district_column`` or ``latitude_column`` and
    ``longitude_column``; with coordinates only, districts are KMeans clusters
    (``n_clusters``, seeded by the job seed) named ``cluster_1``, ``cluster_2``, ...
    in the order of their first sensor. Sensor ids are compared as stripped strings.
    Sensors in the metadata but not in the speeds file are ignored; a sensor in the
    speeds file but not in the metadata is an error. With coordinates, the graph
    neighbours are consecutive sensors by coordinates within a district (each sensor
    with its nearest sensor and the nearest one on its other side); without
    coordinates there are none. Districts named in a column are sorted by name
    (district_2 before district_10); sensors keep the speeds file's order.

Missing readings (csv): a cell is missing when it is empty or one of
``shared.tabular.MISSING_TOKENS``; with ``missing_values = "zero_or_empty"``
(default, the METR-LA convention) a speed of 0 is missing too. Missing readings
are NaN in ``District.speeds``. A sensor with no reading at all cannot be
normalized or evaluated: it is dropped, and the dropped sensors are counted and
named in ``TrafficData.description`` (a district left with fewer than
``min_sensors_per_district`` sensors is then an error).

Nothing here pools districts' raw readings: ``statistics`` computes per-district
aggregates (sums, counts, histograms, per-sensor and per-pair values) and combines
those. Every random choice comes from ``seed``. This module must not import
TensorFlow: it runs before the job's input is validated.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from shared.errors import UserError
from shared.tabular import MISSING_TOKENS, numeric_columns, read_csv, require_columns

__all__ = [
    "DataConfig",
    "District",
    "TrafficData",
    "load",
    "statistics",
    "compare_to_targets",
    "METR_LA_TARGETS",
]


@dataclass(frozen=True)
class DataConfig:
    """The [data] section of a traffic job. Field metadata drives config validation: 'choices', 'min', 'max', 'exclusive_min'."""

    source: str = field(default="generator", metadata={"choices": ("generator", "csv")})
    # generator
    n_districts: int = field(default=6, metadata={"min": 2, "max": 50})
    sensors_per_district: int = field(default=12, metadata={"min": 2, "max": 500})
    days: int = field(default=28, metadata={"min": 7, "max": 400})
    # csv (METR-LA / PEMS-BAY style)
    path: str = ""  # the speeds CSV
    layout: str = field(default="wide", metadata={"choices": ("wide", "long")})
    timestamp_column: str = ""  # wide: empty -> first column if not numeric, else a fixed interval from start_time; long: empty -> "timestamp"
    start_time: str = "2012-03-01 00:00:00"  # used when there is no timestamp column (and as the generator's start)
    interval_minutes: int = field(default=5, metadata={"min": 1, "max": 60})
    sensor_column: str = "sensor_id"  # long layout, and the sensor column of the metadata file
    value_column: str = "speed"  # long layout
    metadata_path: str = ""  # sensor metadata CSV: sensor_id + district, or sensor_id + latitude/longitude
    district_column: str = "district"
    latitude_column: str = "latitude"
    longitude_column: str = "longitude"
    n_clusters: int = field(default=5, metadata={"min": 2, "max": 100})  # districts from coordinates (KMeans, seeded)
    missing_values: str = field(default="zero_or_empty", metadata={"choices": ("zero_or_empty", "empty")})  # METR-LA writes missing readings as 0
    min_sensors_per_district: int = field(default=1, metadata={"min": 1})


@dataclass
class District:
    name: str
    sensor_ids: list[str]
    speeds: np.ndarray  # float64 [T, S], NaN = missing reading


@dataclass
class TrafficData:
    timestamps: pd.DatetimeIndex  # regular grid, length T
    districts: list[District]  # the clients, stable order
    interval_minutes: int
    description: str  # one line
    neighbours: list[tuple[str, str]]  # pairs of sensor ids that are graph neighbours


def load(cfg: DataConfig, seed: int) -> TrafficData:
    """Load the configured source and return one speed table per district."""
    if cfg.source == "generator":
        return _generate(cfg, seed).data
    if cfg.source == "csv":
        return _load_csv(cfg, seed)
    raise UserError(f"data.source = {cfg.source!r} is unknown; use one of generator, csv")


# =========================================================================== generator

STEPS_PER_HOUR = 12
STEPS_PER_DAY = 288
CAPACITY = 2000.0  # veh/h/lane
JAM_DENSITY = 190.0  # veh/mi/lane
FREE_FLOW = 65.0  # mph, network average
WAVE_SPEED = CAPACITY / (JAM_DENSITY - CAPACITY / FREE_FLOW)  # backward wave speed, about 12.6 mph
INCIDENT_CAPACITY = (0.83, 0.49, 0.17)  # HCM, 3 lanes: shoulder, one lane, two lanes blocked
INCIDENT_SEVERITY_P = (0.55, 0.33, 0.12)


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


@dataclass
class _Simulation:
    """The generated data plus the ground truth behind it (for tests and benchmarks)."""

    data: TrafficData
    clean: list[np.ndarray]  # per district: true speed [T, S] before bias, noise and missing
    bottlenecks: list[list[tuple[str, float]]]  # per district: (sensor id at the queue front, capacity)
    incidents: list[list[dict]]  # per district: start, end (steps), capacity, corridor, position (miles), sensor just upstream
    corridors: list[list[list[str]]]  # per district: corridors, each a list of sensor ids upstream -> downstream


def _generate(cfg: DataConfig, seed: int, params: GeneratorParams = GeneratorParams()) -> _Simulation:
    if cfg.interval_minutes != 5:
        raise UserError(
            f"data.interval_minutes = {cfg.interval_minutes} applies to csv data only; the generator makes "
            "5-minute readings: remove data.interval_minutes or set it to 5"
        )
    start = _parse_start_time(cfg.start_time)
    n_steps = cfg.days * STEPS_PER_DAY
    timestamps = pd.date_range(start, periods=n_steps, freq="5min")
    hours = np.asarray(timestamps.hour + timestamps.minute / 60.0, dtype=np.float64)
    weekend = np.asarray(timestamps.dayofweek >= 5)
    day_index = np.asarray((timestamps - timestamps[0].normalize()).days)
    root = np.random.SeedSequence([seed, 0x7261FF1C])
    district_seeds = root.spawn(cfg.n_districts + 1)
    # Districts differ in demand, speed limits and incident rates; their quantiles are
    # stratified (one per n-th of the range, shuffled) so that a handful of districts
    # covers the range instead of clustering by chance.
    strata_rng = np.random.default_rng(district_seeds.pop())
    strata = (
        np.stack([strata_rng.permutation(cfg.n_districts) for _ in range(3)], axis=1)
        + strata_rng.random((cfg.n_districts, 3))
    ) / cfg.n_districts

    districts, clean, bottlenecks, incidents, corridors, neighbours = [], [], [], [], [], []
    for d, district_seed in enumerate(district_seeds):
        rng = np.random.default_rng(district_seed)
        out = _generate_district(rng, d, strata[d], cfg, params, hours, weekend, day_index)
        districts.append(District(name=f"district_{d + 1}", sensor_ids=out["ids"], speeds=out["speeds"]))
        clean.append(out["clean"])
        bottlenecks.append(out["bottlenecks"])
        incidents.append(out["incidents"])
        corridors.append(out["corridors"])
        neighbours.extend(out["neighbours"])
    missing = sum(int(np.isnan(x.speeds).sum()) for x in districts) / sum(x.speeds.size for x in districts)
    description = (
        f"generator: {cfg.n_districts} districts x {cfg.sensors_per_district} sensors, {cfg.days} days of "
        f"5-minute speeds from {timestamps[0]:%Y-%m-%d}, calibrated to METR-LA, {missing:.1%} missing (seed {seed})"
    )
    data = TrafficData(
        timestamps=timestamps,
        districts=districts,
        interval_minutes=5,
        description=description,
        neighbours=neighbours,
    )
    return _Simulation(data, clean, bottlenecks, incidents, corridors)


def _parse_start_time(text: str) -> pd.Timestamp:
    try:
        value = pd.Timestamp(str(text).strip())
    except (ValueError, TypeError):
        value = pd.NaT
    if value is pd.NaT or pd.isna(value):
        raise UserError(
            f"data.start_time = {text!r} is not a date-time; write it like '2012-03-01 00:00:00'"
        )
    return value.tz_localize(None) if value.tzinfo is not None else value


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


def _queue_speed(capacity_ratio: np.ndarray) -> np.ndarray:
    """Speed (mph) in a queue discharging capacity_ratio x CAPACITY (congested triangular branch)."""
    flow = np.clip(capacity_ratio, 0.02, 1.0) * CAPACITY
    density = JAM_DENSITY - flow / WAVE_SPEED
    return flow / density


def _queue_density_gap(capacity_ratio: np.ndarray) -> np.ndarray:
    """Queue density minus the density of the arriving flow (veh/mi/lane), at least 5."""
    flow = np.clip(capacity_ratio, 0.02, 1.0) * CAPACITY
    queue_density = JAM_DENSITY - flow / WAVE_SPEED
    arrival_density = 0.9 * CAPACITY / FREE_FLOW
    return np.maximum(queue_density - arrival_density, 5.0)


def _lindley(excess: np.ndarray) -> np.ndarray:
    """Queue N[t] = max(0, N[t-1] + excess[t]) with N[-1] = 0, along axis 0, vectorized."""
    total = np.cumsum(excess, axis=0)
    return total - np.minimum(np.minimum.accumulate(total, axis=0), 0.0)


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


def _generate_district(rng, d, quantiles, cfg, params, hours, weekend, day_index):
    n_steps = len(hours)
    n_sensors = cfg.sensors_per_district
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
        vehicles = _lindley((arrivals - discharge) * CAPACITY * dt_hours)  # veh/lane, [T, B]
        length = vehicles / (_queue_density_gap(ratios) * params.queue_storage)  # miles
        queued_speed = _queue_speed(discharge)  # [T, B]
        for b, j in enumerate(bottleneck_idx):
            upstream = np.flatnonzero((corridor_of == corridor_of[j]) & (np.arange(n_sensors) <= j))
            distance = position[j] - position[upstream] + front_offset[b]
            cover = _coverage(length[:, b : b + 1], distance[None, :], np.zeros((n_steps, 1)))
            # changes of the discharge rate travel upstream through the queue at the wave speed
            lag = np.round(distance / WAVE_SPEED * STEPS_PER_HOUR).astype(np.int64)
            rows = np.maximum(np.arange(n_steps)[:, None] - lag[None, :], 0)
            in_queue = queued_speed[rows, b]
            speed[:, upstream] = np.minimum(speed[:, upstream], cover * in_queue + (1.0 - cover) * speed[:, upstream])
    bottlenecks = [(ids[j], float(r)) for j, r in zip(bottleneck_idx, ratios)]

    # ---- incidents: temporary bottlenecks with HCM capacity left
    incidents = []
    if params.incidents:
        incidents = _add_incidents(
            rng, speed, demand, corridor_of, position, sizes, first, ids, incident_rate, params
        )

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
    }


def _stratified(rng: np.random.Generator, bounds: tuple[float, float], n: int) -> np.ndarray:
    """n values spread over [lo, hi): one uniform draw in each n-th of the range, shuffled."""
    quantiles = (rng.permutation(n) + rng.random(n)) / max(n, 1)
    return bounds[0] + (bounds[1] - bounds[0]) * quantiles


def _corridor_name(c: int, letters: str) -> str:
    return letters[c] if c < len(letters) else f"{letters[c // len(letters) - 1]}{letters[c % len(letters)]}"


def _coverage(length, distance, front):
    """Share of a 5-minute interval a sensor at `distance` miles upstream spends in the queue.

    The queue occupies [front, length] miles upstream of its front; the tail and the
    front move during the interval, smoothed over 0.4 miles.
    """
    smooth = 0.4
    in_tail = np.clip((length - distance) / smooth + 0.5, 0.0, 1.0)
    past_front = np.clip((distance - front) / smooth + 0.5, 0.0, 1.0)
    return in_tail * past_front


def _add_incidents(rng, speed, demand, corridor_of, position, sizes, first, ids, rate, params):
    n_steps, n_corridors = demand.shape
    dt_hours = 1.0 / STEPS_PER_HOUR
    n_days = n_steps / STEPS_PER_DAY
    counts = rng.poisson(rate * n_days, n_corridors)
    incidents = []
    window = 8 * STEPS_PER_HOUR  # steps simulated after the start
    for c in range(n_corridors):
        if counts[c] == 0:
            continue
        # start weighted by demand (more traffic, more incidents)
        weights = demand[:, c] ** 2
        starts = rng.choice(n_steps, size=counts[c], p=weights / weights.sum())
        minutes = rng.lognormal(math.log(params.incident_median_minutes), params.incident_sigma, counts[c])
        durations = np.maximum(1, np.round(minutes / 5.0)).astype(np.int64)
        severity = rng.choice(3, size=counts[c], p=INCIDENT_SEVERITY_P)
        ratio = np.asarray(INCIDENT_CAPACITY)[severity]
        members = np.arange(first[c], first[c] + sizes[c])
        corridor_length = position[members[-1]]
        site = rng.uniform(0.0, corridor_length + 0.5, counts[c])  # miles along the corridor
        steps = starts[:, None] + np.arange(window)[None, :]  # [K, W]
        valid = steps < n_steps
        steps_c = np.minimum(steps, n_steps - 1)
        arrivals = demand[steps_c, c]
        active = np.arange(window)[None, :] < durations[:, None]
        capacity = np.where(active, ratio[:, None], 1.0)
        vehicles = _lindley(((arrivals - capacity) * CAPACITY * dt_hours).T).T  # [K, W]
        length = vehicles / (_queue_density_gap(ratio)[:, None] * params.incident_queue_storage)
        since_clear = np.maximum(np.arange(window)[None, :] - durations[:, None] + 1, 0) * dt_hours
        front = WAVE_SPEED * since_clear  # recovery wave from the incident, miles
        qspeed = _queue_speed(ratio)
        for k in range(counts[c]):
            upstream = members[position[members] <= site[k]]
            if len(upstream) == 0:
                continue
            distance = site[k] - position[upstream]
            cover = _coverage(length[k][:, None], distance[None, :], front[k][:, None])
            cover[~valid[k]] = 0.0
            rows = steps_c[k][valid[k]]
            block = speed[np.ix_(rows, upstream)]
            speed[np.ix_(rows, upstream)] = np.minimum(
                block, cover[valid[k]] * qspeed[k] + (1.0 - cover[valid[k]]) * block
            )
            incidents.append(
                {
                    "start": int(starts[k]),
                    "end": int(min(starts[k] + durations[k], n_steps)),
                    "capacity": float(ratio[k]),
                    "corridor": int(c),
                    "position": float(site[k]),
                    "sensor": ids[int(upstream[-1])],
                }
            )
    return incidents


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


# =========================================================================== statistics

# ../shared/ANCHORS.md, "Traffic": statistics of one real METR-LA week (207 sensors).
# Speeds in mph, shares and MAPE in percent.
METR_LA_TARGETS: dict[str, float] = {
    "speed_h03": 62.5,
    "speed_h07": 55.5,
    "speed_h08": 53.8,
    "speed_h12": 59.5,
    "speed_h17": 51.2,
    "speed_h18": 51.4,
    "pct_below_40": 9.9,
    "pct_below_20": 2.5,
    "sensor_mean_p5": 48.2,
    "sensor_mean_p50": 60.1,
    "sensor_mean_p95": 66.6,
    "sensor_sd_p5": 3.0,
    "sensor_sd_p50": 10.2,
    "sensor_sd_p95": 18.4,
    "acf_lag1": 0.834,
    "acf_lag3": 0.749,
    "acf_lag12": 0.51,
    "acf_lag288": 0.381,
    "corr_neighbours": 0.42,
    "corr_non_neighbours": 0.19,
    "abs_change_p50": 1.46,
    "abs_change_p90": 6.49,
    "abs_change_p99": 16.4,
    "missing_pct": 8.0,
    "persistence_mae_15": 3.24,
    "persistence_mae_30": 3.88,
    "persistence_mae_60": 4.90,
    "persistence_rmse_15": 6.01,
    "persistence_rmse_30": 7.56,
    "persistence_rmse_60": 9.63,
    "persistence_mape_15": 7.7,
    "persistence_mape_30": 9.7,
    "persistence_mape_60": 12.9,
}

_HOURS = (3, 7, 8, 12, 17, 18)
_ACF_LAG_MINUTES = {"acf_lag1": 5, "acf_lag3": 15, "acf_lag12": 60, "acf_lag288": 1440}
_HORIZON_MINUTES = (15, 30, 60)
_CHANGE_BIN = 0.01  # mph, histogram resolution of |5-minute change|
_CHANGE_MAX = 200.0
_MIN_PAIRS = 12  # observed pairs needed for a sensor's (or pair's) autocorrelation / correlation


def statistics(data: TrafficData) -> dict[str, float]:
    """The METR-LA calibration statistics of `data`, keyed like METR_LA_TARGETS.

    Everything is computed per district and combined from per-district aggregates
    (sums and counts, histograms, per-sensor and per-pair values); no raw readings of
    two districts ever meet in one array. "Observed" means not NaN. Definitions:

    - ``speed_hHH``: mean of all observed readings whose timestamp is in hour HH
      (every day, weekdays and weekends), pooled over sensors (sum / count).
    - ``pct_below_40`` / ``pct_below_20``: percent of observed readings below 40 / 20 mph.
    - ``sensor_mean_pQ`` / ``sensor_sd_pQ``: Q-th percentile (linear interpolation)
      over all sensors of each sensor's mean / standard deviation (ddof 1) of its
      observed readings (sensors with at least 2 readings).
    - ``acf_lagK``: for each sensor, the autocorrelation at lag K steps of 5 minutes
      of its series minus its observed mean: mean of x[t] x[t+K] over pairs where
      both are observed, divided by the mean of x[t]^2 over observed t; then the
      median over sensors (with at least 12 observed pairs). For data at another
      interval the lag is the same time (5 min, 15 min, 1 h, 1 day) in steps; NaN
      when that is not a whole number of steps.
    - ``corr_neighbours`` / ``corr_non_neighbours``: Pearson correlation of two
      sensors' readings over the steps where both are observed (at least 12), averaged
      (mean) over the pairs listed in ``data.neighbours`` / over all other pairs of
      sensors of the same district. NaN when there is no such pair.
    - ``abs_change_pQ``: Q-th percentile of |y[t+1] - y[t]| over all sensors and
      steps where both readings are observed (5-minute data only; from per-district
      histograms with 0.01 mph bins).
    - ``missing_pct``: percent of all readings that are missing.
    - ``persistence_{mae,rmse,mape}_M``: the last-value forecast y[t+h] = y[t] at
      horizon M minutes (h = M / interval steps), over all sensors and t where both
      are observed (pooled, so sensors with more pairs weigh more): MAE, RMSE, and
      MAPE = mean of |error| / y[t+h] in percent.
    """
    interval = int(data.interval_minutes)
    hour_sums = {h: [0.0, 0] for h in _HOURS}
    n_total = n_observed = n_below_40 = n_below_20 = 0
    sensor_means: list[np.ndarray] = []
    sensor_sds: list[np.ndarray] = []
    acfs: dict[str, list[np.ndarray]] = {key: [] for key in _ACF_LAG_MINUTES}
    corr_sums = {"corr_neighbours": [0.0, 0], "corr_non_neighbours": [0.0, 0]}
    change_hist = np.zeros(int(round(_CHANGE_MAX / _CHANGE_BIN)), dtype=np.int64)
    persistence = {m: np.zeros(4) for m in _HORIZON_MINUTES}  # n, sum|e|, sum e^2, sum |e|/y
    neighbour_set = {frozenset(pair) for pair in data.neighbours}
    hour_of_step = np.asarray(data.timestamps.hour)

    for district in data.districts:
        y = np.asarray(district.speeds, dtype=np.float64)
        observed = ~np.isnan(y)
        n_total += y.size
        n_observed += int(observed.sum())
        n_below_40 += int((y[observed] < 40.0).sum())
        n_below_20 += int((y[observed] < 20.0).sum())
        filled = np.where(observed, y, 0.0)
        for h in _HOURS:
            rows = hour_of_step == h
            hour_sums[h][0] += float(filled[rows].sum())
            hour_sums[h][1] += int(observed[rows].sum())

        counts = observed.sum(axis=0)
        enough = counts >= 2
        with np.errstate(invalid="ignore", divide="ignore"):
            means = filled.sum(axis=0) / counts
            centred = np.where(observed, y - means, 0.0)
            sds = np.sqrt((centred**2).sum(axis=0) / (counts - 1))
        sensor_means.append(means[enough])
        sensor_sds.append(sds[enough])

        for key, minutes in _ACF_LAG_MINUTES.items():
            if minutes % interval:
                continue
            acfs[key].append(_masked_acf(centred, observed, minutes // interval))

        corr = _pairwise_correlation(filled, observed)
        ids = district.sensor_ids
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                if np.isnan(corr[a, b]):
                    continue
                key = "corr_neighbours" if frozenset((ids[a], ids[b])) in neighbour_set else "corr_non_neighbours"
                corr_sums[key][0] += float(corr[a, b])
                corr_sums[key][1] += 1

        if interval == 5 and len(y) > 1:
            both = observed[1:] & observed[:-1]
            change = np.abs(y[1:] - y[:-1])[both]
            index = np.minimum((change / _CHANGE_BIN).astype(np.int64), len(change_hist) - 1)
            change_hist += np.bincount(index, minlength=len(change_hist))

        for minutes in _HORIZON_MINUTES:
            if minutes % interval or minutes // interval >= len(y):
                continue
            h = minutes // interval
            both = observed[h:] & observed[:-h]
            truth = y[h:][both]
            error = y[:-h][both] - truth
            with np.errstate(divide="ignore", invalid="ignore"):
                relative = np.abs(error) / np.abs(truth)
            persistence[minutes] += (truth.size, np.abs(error).sum(), (error**2).sum(), relative.sum())

    nan = float("nan")
    stats: dict[str, float] = {}
    for h in _HOURS:
        total, count = hour_sums[h]
        stats[f"speed_h{h:02d}"] = total / count if count else nan
    stats["pct_below_40"] = 100.0 * n_below_40 / n_observed if n_observed else nan
    stats["pct_below_20"] = 100.0 * n_below_20 / n_observed if n_observed else nan
    all_means = np.concatenate(sensor_means) if sensor_means else np.array([])
    all_sds = np.concatenate(sensor_sds) if sensor_sds else np.array([])
    for q in (5, 50, 95):
        stats[f"sensor_mean_p{q}"] = float(np.percentile(all_means, q)) if all_means.size else nan
    for q in (5, 50, 95):
        stats[f"sensor_sd_p{q}"] = float(np.percentile(all_sds, q)) if all_sds.size else nan
    for key in _ACF_LAG_MINUTES:
        values = np.concatenate(acfs[key]) if acfs[key] else np.array([])
        values = values[~np.isnan(values)]
        stats[key] = float(np.median(values)) if values.size else nan
    for key, (total, count) in corr_sums.items():
        stats[key] = total / count if count else nan
    for q in (50, 90, 99):
        stats[f"abs_change_p{q}"] = _histogram_quantile(change_hist, q / 100.0)
    stats["missing_pct"] = 100.0 * (n_total - n_observed) / n_total if n_total else nan
    for minutes in _HORIZON_MINUTES:
        n, abs_sum, sq_sum, rel_sum = persistence[minutes]
        stats[f"persistence_mae_{minutes}"] = abs_sum / n if n else nan
        stats[f"persistence_rmse_{minutes}"] = math.sqrt(sq_sum / n) if n else nan
        stats[f"persistence_mape_{minutes}"] = 100.0 * rel_sum / n if n else nan
    return {key: float(stats[key]) for key in METR_LA_TARGETS}


def _masked_acf(centred: np.ndarray, observed: np.ndarray, lag: int) -> np.ndarray:
    """Per-sensor autocorrelation at `lag` over observed pairs (NaN if too few pairs)."""
    n_steps = centred.shape[0]
    if lag >= n_steps:
        return np.full(centred.shape[1], np.nan)
    both = observed[lag:] & observed[:-lag]
    pairs = both.sum(axis=0)
    products = (centred[lag:] * centred[:-lag] * both).sum(axis=0)
    variance = (centred**2).sum(axis=0) / np.maximum(observed.sum(axis=0), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acf = (products / pairs) / variance
    acf[(pairs < _MIN_PAIRS) | ~(variance > 0)] = np.nan
    return acf


def _pairwise_correlation(filled: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Pearson correlation of every pair of columns over the rows where both are observed."""
    m = observed.astype(np.float64)
    n = m.T @ m
    sum_a = filled.T @ m  # [a, b]: sum of a's readings where both observed
    sum_aa = (filled**2).T @ m
    sum_ab = filled.T @ filled
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sum_ab / n - (sum_a / n) * (sum_a.T / n)
        var_a = sum_aa / n - (sum_a / n) ** 2
        corr = cov / np.sqrt(var_a * var_a.T)
    corr[(n < _MIN_PAIRS) | ~(var_a > 0) | ~(var_a.T > 0)] = np.nan
    return corr


def _histogram_quantile(hist: np.ndarray, q: float) -> float:
    """Quantile from a histogram with _CHANGE_BIN bins, interpolating within the bin."""
    total = int(hist.sum())
    if total == 0:
        return float("nan")
    cumulative = np.cumsum(hist)
    target = q * total
    b = int(np.searchsorted(cumulative, target, side="left"))
    before = cumulative[b - 1] if b > 0 else 0
    inside = (target - before) / hist[b] if hist[b] else 0.0
    return float((b + inside) * _CHANGE_BIN)


def compare_to_targets(stats: dict[str, float]) -> list[tuple[str, float, float, float]]:
    """(key, generated, target, relative difference (generated - target) / target) per target."""
    rows = []
    for key, target in METR_LA_TARGETS.items():
        value = float(stats.get(key, float("nan")))
        rows.append((key, value, target, (value - target) / target))
    return rows


# =========================================================================== csv


def _load_csv(cfg: DataConfig, seed: int) -> TrafficData:
    if not cfg.path.strip():
        raise UserError(
            "data.path is empty; give the speeds CSV (wide: a timestamp column and one column per sensor; "
            "long: timestamp, sensor and speed columns)"
        )
    if not cfg.metadata_path.strip():
        raise UserError(
            "data.metadata_path is empty; give a sensor metadata CSV with a sensor id column and either a "
            "district column or latitude and longitude columns"
        )
    path = Path(cfg.path.strip()).expanduser()
    meta_path = Path(cfg.metadata_path.strip()).expanduser()
    source = str(path)
    if cfg.layout == "wide":
        stamps, sensor_ids, values = _read_wide(cfg, path)
    elif cfg.layout == "long":
        stamps, sensor_ids, values = _read_long(cfg, path)
    else:
        raise UserError(f"data.layout = {cfg.layout!r} is unknown; use one of wide, long")
    if stamps is None:
        start = _parse_start_time(cfg.start_time)
        timestamps = pd.date_range(start, periods=len(values), freq=pd.Timedelta(minutes=cfg.interval_minutes))
    else:
        timestamps, values = _on_regular_grid(stamps, values, cfg.interval_minutes, source)

    districts_of, coordinates, how = _read_metadata(cfg, meta_path, sensor_ids, source, seed)

    has_reading = ~np.isnan(values).all(axis=0)
    dropped = [sensor for sensor, ok in zip(sensor_ids, has_reading) if not ok]
    members: dict[str, list[int]] = {}
    for column, sensor in enumerate(sensor_ids):
        if has_reading[column]:
            members.setdefault(districts_of[sensor], []).append(column)
    names = list(members)
    if how == "column":
        names.sort(key=_natural_key)
    for name in names:
        if len(members[name]) < cfg.min_sensors_per_district:
            raise UserError(
                f"{meta_path}: district '{_short(name)}' has {len(members[name])} sensor(s) with readings but "
                f"data.min_sensors_per_district = {cfg.min_sensors_per_district}; merge it into another district "
                "or lower data.min_sensors_per_district"
            )
    if len(names) < 2:
        only = f" ('{_short(names[0])}')" if names else ""
        raise UserError(
            f"{meta_path}: the sensors with readings form {len(names)} district(s){only}; federated training "
            "needs at least 2 districts: assign sensors to more districts"
            + (" or raise data.n_clusters" if how == "clusters" else "")
        )
    districts = [
        District(
            name=name,
            sensor_ids=[sensor_ids[c] for c in members[name]],
            speeds=np.ascontiguousarray(values[:, members[name]], dtype=np.float64),
        )
        for name in names
    ]
    neighbours = _nearest_neighbours(districts, coordinates) if coordinates else []

    n_sensors = sum(len(d.sensor_ids) for d in districts)
    missing = sum(int(np.isnan(d.speeds).sum()) for d in districts) / max(1, n_sensors * len(timestamps))
    grouping = {"column": f"column '{cfg.district_column}'", "clusters": "KMeans on coordinates"}[how]
    description = (
        f"csv: {path.name} ({cfg.layout}), {n_sensors} sensors in {len(districts)} districts ({grouping}), "
        f"{len(timestamps)} steps of {cfg.interval_minutes} min from {timestamps[0]} to {timestamps[-1]}, "
        f"{missing:.1%} missing"
    )
    if dropped:
        shown = ", ".join(_short(x) for x in dropped[:3]) + (", ..." if len(dropped) > 3 else "")
        description += f"; {len(dropped)} sensor(s) without any reading dropped ({shown})"
    return TrafficData(
        timestamps=timestamps,
        districts=districts,
        interval_minutes=cfg.interval_minutes,
        description=description,
        neighbours=neighbours,
    )


def _zero_is_missing(cfg: DataConfig) -> bool:
    return cfg.missing_values == "zero_or_empty"


def _read_wide(cfg: DataConfig, path: Path):
    """(timestamps per row or None, sensor ids, values [rows, sensors]) of a wide CSV."""
    df = read_csv(path)
    source = str(path)
    columns = list(df.columns)
    if cfg.timestamp_column.strip():
        time_column = cfg.timestamp_column.strip()
        require_columns(df, [time_column], source)
    elif _looks_numeric(df[columns[0]]):
        time_column = None  # every column is a sensor; readings every interval_minutes from start_time
    else:
        time_column = columns[0]
    sensors = [c for c in columns if c != time_column]
    if not sensors:
        raise UserError(f"{source}: has no sensor columns besides the timestamp column '{_short(time_column)}'")
    sensor_ids = [str(c).strip() for c in sensors]
    values = numeric_columns(
        df, sensors, source, zero_means_missing=sensors if _zero_is_missing(cfg) else ()
    ).to_numpy(dtype=np.float64)
    stamps = None if time_column is None else _parse_timestamps(df[time_column], source, time_column)
    if stamps is not None:
        duplicated = stamps.duplicated(keep=False)
        if duplicated.any():
            rows = np.flatnonzero(np.asarray(stamps == stamps[np.flatnonzero(duplicated)[0]]))
            raise UserError(
                f"{source}: timestamp '{stamps[rows[0]]}' appears more than once (rows {rows[0] + 1} and "
                f"{rows[1] + 1}) in column '{_short(time_column)}'; give one row per timestamp"
            )
    return stamps, sensor_ids, values


def _read_long(cfg: DataConfig, path: Path):
    """(unique timestamps, sensor ids, values [timestamps, sensors]) pivoted from a long CSV."""
    df = read_csv(path)
    source = str(path)
    time_column = cfg.timestamp_column.strip() or "timestamp"
    sensor_column, value_column = cfg.sensor_column.strip(), cfg.value_column.strip()
    require_columns(df, [time_column, sensor_column, value_column], source)
    sensors = df[sensor_column].astype(str).str.strip()
    empty = np.flatnonzero(sensors.isin(MISSING_TOKENS).to_numpy())
    if len(empty):
        raise UserError(
            f"{source}: column '{_short(sensor_column)}' is empty at row {empty[0] + 1}; every reading needs a sensor id"
        )
    readings = numeric_columns(
        df, [value_column], source, zero_means_missing=[value_column] if _zero_is_missing(cfg) else ()
    )[value_column].to_numpy(dtype=np.float64)
    stamps = _parse_timestamps(df[time_column], source, time_column)
    keys = pd.DataFrame({"t": stamps, "s": sensors.to_numpy()})
    duplicated = keys.duplicated(keep=False).to_numpy()
    if duplicated.any():
        first = int(np.flatnonzero(duplicated)[0])
        same = np.flatnonzero(
            duplicated & (keys["t"] == keys["t"].iloc[first]).to_numpy() & (keys["s"] == keys["s"].iloc[first]).to_numpy()
        )
        raise UserError(
            f"{source}: sensor '{_short(keys['s'].iloc[first])}' has more than one reading at "
            f"{keys['t'].iloc[first]} (rows {same[0] + 1} and {same[1] + 1}); give one row per timestamp and sensor"
        )
    sensor_ids = list(pd.unique(sensors))
    sensor_codes = pd.Index(sensor_ids).get_indexer(sensors)
    unique_stamps, time_codes = np.unique(stamps.to_numpy(), return_inverse=True)
    values = np.full((len(unique_stamps), len(sensor_ids)), np.nan)
    values[time_codes, sensor_codes] = readings
    return pd.DatetimeIndex(unique_stamps), sensor_ids, values


def _looks_numeric(values: pd.Series) -> bool:
    """True when every non-missing cell of the column parses as a number."""
    text = values.astype(str).str.strip()
    present = text[~text.isin(MISSING_TOKENS)]
    return bool(pd.to_numeric(present, errors="coerce").notna().all())


def _parse_timestamps(values: pd.Series, source: str, column: str) -> pd.DatetimeIndex:
    """Parse a timestamp column (each distinct text once); a bad or empty cell is a UserError naming its row."""
    import warnings

    text = values.astype(str).str.strip()
    empty = np.flatnonzero(text.isin(MISSING_TOKENS).to_numpy())
    if len(empty):
        raise UserError(
            f"{source}: column '{_short(column)}' is empty at row {empty[0] + 1}; every row needs a timestamp"
        )
    unique, inverse = np.unique(text.to_numpy(dtype=str), return_inverse=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            parsed = pd.to_datetime(pd.Series(unique), errors="coerce")
            if parsed.isna().any():
                parsed = pd.to_datetime(pd.Series(unique), errors="coerce", format="mixed")
        except (ValueError, TypeError, OverflowError):
            raise UserError(
                f"{source}: column '{_short(column)}' mixes time zones or formats; write local date-times "
                "like 2012-03-01 00:05:00"
            ) from None
    if not pd.api.types.is_datetime64_any_dtype(parsed):
        raise UserError(
            f"{source}: column '{_short(column)}' mixes time zones or formats; write local date-times "
            "like 2012-03-01 00:05:00"
        )
    bad = parsed.isna().to_numpy()[inverse]
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise UserError(
            f"{source}: column '{_short(column)}' row {row + 1} has '{_short(text.iloc[row])}', which is not a "
            "date-time; write timestamps like 2012-03-01 00:05:00"
        )
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_localize(None)  # keep the local wall-clock time
    return pd.DatetimeIndex(parsed.to_numpy()[inverse])


def _on_regular_grid(stamps: pd.DatetimeIndex, values: np.ndarray, interval_minutes: int, source: str):
    """Sort rows by time and place them on the grid first..last every interval_minutes (gaps -> NaN)."""
    order = np.argsort(stamps.to_numpy(), kind="stable")
    stamps, values = stamps[order], values[order]
    step = pd.Timedelta(minutes=interval_minutes)
    start = stamps[0]
    offsets = stamps - start
    off_grid = np.asarray(offsets % step != pd.Timedelta(0))
    if off_grid.any():
        bad = int(np.flatnonzero(off_grid)[0])
        raise UserError(
            f"{source}: timestamp {stamps[bad]} is not on the {interval_minutes}-minute grid that starts at "
            f"{start}; fix the timestamp or set data.interval_minutes to the data's interval"
        )
    # Data on a coarser grid (every 15 minutes read with interval 5) would be two thirds gaps.
    gaps = np.diff(stamps.to_numpy()).astype("timedelta64[s]").astype(np.int64)
    common = int(np.gcd.reduce(gaps)) // 60 if len(gaps) >= 3 else interval_minutes
    if common >= 2 * interval_minutes:
        raise UserError(
            f"{source}: readings are {common} minutes apart (or a multiple of it) but data.interval_minutes = "
            f"{interval_minutes}; set data.interval_minutes = {common}"
        )
    index = np.asarray(offsets // step, dtype=np.int64)
    n_steps = int(index[-1]) + 1
    if n_steps > 20 * len(stamps) and n_steps > 10_000:
        raise UserError(
            f"{source}: timestamps run from {start} to {stamps[-1]} ({n_steps} steps of {interval_minutes} minutes) "
            f"but only {len(stamps)} have readings; check for a mistyped timestamp"
        )
    grid = pd.date_range(start, periods=n_steps, freq=step)
    out = np.full((n_steps, values.shape[1]), np.nan)
    out[index] = values
    return grid, out


def _read_metadata(cfg: DataConfig, meta_path: Path, sensor_ids: list[str], speeds_source: str, seed: int):
    """({sensor: district}, {sensor: (x, y)} or {}, "column" | "clusters") for the speeds file's sensors."""
    df = read_csv(meta_path)
    source = str(meta_path)
    sensor_column = cfg.sensor_column.strip()
    require_columns(df, [sensor_column], source)
    ids = df[sensor_column].astype(str).str.strip()
    empty = np.flatnonzero(ids.isin(MISSING_TOKENS).to_numpy())
    if len(empty):
        raise UserError(f"{source}: column '{_short(sensor_column)}' is empty at row {empty[0] + 1}; give every row a sensor id")
    duplicated = ids.duplicated(keep=False).to_numpy()
    if duplicated.any():
        rows = np.flatnonzero(ids.to_numpy() == ids.iloc[np.flatnonzero(duplicated)[0]])
        raise UserError(
            f"{source}: sensor '{_short(ids.iloc[rows[0]])}' appears more than once (rows {rows[0] + 1} and "
            f"{rows[1] + 1}); give one row per sensor"
        )
    row_of = {sensor: row for row, sensor in enumerate(ids)}
    unknown = [sensor for sensor in sensor_ids if sensor not in row_of]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise UserError(
            f"{speeds_source}: sensor '{_short(unknown[0])}'{more} is not in the metadata file {source}; "
            f"add it to {source} (column '{_short(sensor_column)}') or remove it from the speeds file"
        )
    rows = np.array([row_of[sensor] for sensor in sensor_ids], dtype=np.int64)
    lat_column, lon_column = cfg.latitude_column.strip(), cfg.longitude_column.strip()
    has_coordinates = lat_column in df.columns and lon_column in df.columns
    coordinates: dict[str, tuple[float, float]] = {}
    if has_coordinates:
        coords = numeric_columns(df, [lat_column, lon_column], source).to_numpy(dtype=np.float64)[rows]
        missing = np.flatnonzero(np.isnan(coords).any(axis=1))
        if len(missing) and cfg.district_column.strip() not in df.columns:
            raise UserError(
                f"{source}: sensor '{_short(sensor_ids[missing[0]])}' (row {rows[missing[0]] + 1}) has no "
                f"{lat_column}/{lon_column}; give every sensor coordinates or a '{cfg.district_column}' column"
            )
        if not len(missing):
            # a local plane: degrees of longitude shrink with the cosine of the latitude
            scale = math.cos(math.radians(float(np.mean(coords[:, 0]))))
            coordinates = {
                sensor: (float(lon) * scale, float(lat)) for sensor, (lat, lon) in zip(sensor_ids, coords)
            }

    district_column = cfg.district_column.strip()
    if district_column in df.columns:
        names = df[district_column].astype(str).str.strip().to_numpy()[rows]
        empty = np.flatnonzero(np.isin(names, MISSING_TOKENS))
        if len(empty):
            raise UserError(
                f"{source}: column '{_short(district_column)}' is empty at row {rows[empty[0]] + 1} (sensor "
                f"'{_short(sensor_ids[empty[0]])}'); give every sensor a district"
            )
        return dict(zip(sensor_ids, names)), coordinates, "column"
    if not has_coordinates:
        raise UserError(
            f"{source}: has neither a '{_short(district_column)}' column nor '{_short(lat_column)}' and "
            f"'{_short(lon_column)}' columns; add districts or coordinates (or set data.district_column, "
            "data.latitude_column, data.longitude_column)"
        )
    if cfg.n_clusters > len(sensor_ids):
        raise UserError(
            f"data.n_clusters = {cfg.n_clusters} but {speeds_source} has only {len(sensor_ids)} sensors; "
            f"lower data.n_clusters to at most {len(sensor_ids)}"
        )
    from sklearn.cluster import KMeans

    points = np.array([coordinates[sensor] for sensor in sensor_ids])
    labels = KMeans(n_clusters=cfg.n_clusters, n_init=10, random_state=seed % 2**32).fit_predict(points)
    order: dict[int, str] = {}
    for label in labels:  # clusters named in the order of their first sensor
        order.setdefault(int(label), f"cluster_{len(order) + 1}")
    return {sensor: order[int(label)] for sensor, label in zip(sensor_ids, labels)}, coordinates, "clusters"


def _nearest_neighbours(districts: list[District], coordinates: dict[str, tuple[float, float]]):
    """Consecutive sensors by coordinates, within each district.

    Each sensor is paired with its nearest sensor, and with the nearest one on the other
    side of it (the direction to it at more than 90 degrees from the direction to the
    first): on a line of sensors, the one before and the one after.
    """
    pairs: list[tuple[str, str]] = []
    seen: set[frozenset] = set()
    for district in districts:
        ids = district.sensor_ids
        if len(ids) < 2:
            continue
        points = np.array([coordinates[s] for s in ids])
        distance = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(axis=-1))
        np.fill_diagonal(distance, np.inf)
        for a in range(len(ids)):
            first = int(np.argmin(distance[a]))
            chosen = [first]
            other_side = (points - points[a]) @ (points[first] - points[a]) < 0
            if other_side.any():
                chosen.append(int(np.flatnonzero(other_side)[np.argmin(distance[a][other_side])]))
            for b in chosen:
                key = frozenset((ids[a], ids[b]))
                if key not in seen:
                    seen.add(key)
                    pairs.append((ids[min(a, b)], ids[max(a, b)]))
    return pairs


def _natural_key(name: str):
    """Sort 'district_2' before 'district_10'."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def _short(value: object) -> str:
    """A value as it may appear inside a one-line error message."""
    flat = " ".join(str(value).split())
    return flat if len(flat) <= 40 else flat[:37] + "..."
