"""Queues for the traffic generator: the fundamental diagram, point queues, incidents.

A queue's speed comes from the congested branch of the triangular fundamental diagram
(capacity 2000 veh/h/lane, jam density 190 veh/mi/lane, backward wave speed about
12.6 mph). Every queue is a point queue (Lindley recursion, vectorized with a cumulative
minimum) whose vehicles are laid out upstream of its front, so its tail reaches upstream
sensors with a lag (`coverage`). Incidents are temporary bottlenecks with the capacity
HCM leaves for 3 lanes (`add_incidents`). ``traffic/generator.py`` describes the whole
model and uses these for recurrent bottlenecks and incidents.
"""

from __future__ import annotations

import math

import numpy as np

# The generator's time step: 5 minutes (queues grow and drain one step at a time).
STEPS_PER_HOUR = 12
STEPS_PER_DAY = 288
CAPACITY = 2000.0  # veh/h/lane
JAM_DENSITY = 190.0  # veh/mi/lane
FREE_FLOW = 65.0  # mph, network average
WAVE_SPEED = CAPACITY / (JAM_DENSITY - CAPACITY / FREE_FLOW)  # backward wave speed, about 12.6 mph
INCIDENT_CAPACITY = (0.83, 0.49, 0.17)  # HCM, 3 lanes: shoulder, one lane, two lanes blocked
INCIDENT_SEVERITY_P = (0.55, 0.33, 0.12)


def queue_speed(capacity_ratio: np.ndarray) -> np.ndarray:
    """Speed (mph) in a queue discharging capacity_ratio x CAPACITY (congested triangular branch)."""
    flow = np.clip(capacity_ratio, 0.02, 1.0) * CAPACITY
    density = JAM_DENSITY - flow / WAVE_SPEED
    return flow / density


def queue_density_gap(capacity_ratio: np.ndarray) -> np.ndarray:
    """Queue density minus the density of the arriving flow (veh/mi/lane), at least 5."""
    flow = np.clip(capacity_ratio, 0.02, 1.0) * CAPACITY
    queue_density = JAM_DENSITY - flow / WAVE_SPEED
    arrival_density = 0.9 * CAPACITY / FREE_FLOW
    return np.maximum(queue_density - arrival_density, 5.0)


def lindley(excess: np.ndarray) -> np.ndarray:
    """Queue N[t] = max(0, N[t-1] + excess[t]) with N[-1] = 0, along axis 0, vectorized."""
    total = np.cumsum(excess, axis=0)
    return total - np.minimum(np.minimum.accumulate(total, axis=0), 0.0)


def coverage(length, distance, front):
    """Share of a 5-minute interval a sensor at `distance` miles upstream spends in the queue.

    The queue occupies [front, length] miles upstream of its front; the tail and the
    front move during the interval, smoothed over 0.4 miles.
    """
    smooth = 0.4
    in_tail = np.clip((length - distance) / smooth + 0.5, 0.0, 1.0)
    past_front = np.clip((distance - front) / smooth + 0.5, 0.0, 1.0)
    return in_tail * past_front


def add_incidents(rng, speed, demand, corridor_of, position, sizes, first, ids, rate, params):
    """Slow `speed` [T, S] in place by incidents on each corridor; returns one record per incident.

    A record holds start and end (steps), capacity left, corridor, position (miles) and
    the sensor just upstream.
    """
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
        vehicles = lindley(((arrivals - capacity) * CAPACITY * dt_hours).T).T  # [K, W]
        length = vehicles / (queue_density_gap(ratio)[:, None] * params.incident_queue_storage)
        since_clear = np.maximum(np.arange(window)[None, :] - durations[:, None] + 1, 0) * dt_hours
        front = WAVE_SPEED * since_clear  # recovery wave from the incident, miles
        qspeed = queue_speed(ratio)
        for k in range(counts[c]):
            upstream = members[position[members] <= site[k]]
            if len(upstream) == 0:
                continue
            distance = site[k] - position[upstream]
            cover = coverage(length[k][:, None], distance[None, :], front[k][:, None])
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


def add_moving_jams(rng, speed, local_demand, corridor_of, position, free_flow, params):
    """Slow `speed` [T, S] in place by moving jams (stop-and-go waves); returns how many were born.

    Congested traffic is unstable: jams are born in a queue (a sensor slower than
    `jam_onset` x its free-flow speed; `jam_rate_per_hour` each congested hour) and travel
    upstream against the traffic at a speed drawn from `jam_speed_mph` (observed 9-12 mph,
    about the backward wave speed) for an exponential distance (mean `jam_reach_miles`),
    beyond the queue's tail while the traffic they meet is dense: a jam fades where the
    demand is light. A sensor it passes loses `jam_drop_mph` over about one 5-minute
    interval. So what a sensor reads now tells what its upstream neighbours read minutes
    later, at the distance over the jam's speed.
    """
    n_steps, n_sensors = speed.shape
    born = (speed < params.jam_onset * free_flow[None, :]) & (
        rng.random((n_steps, n_sensors)) < params.jam_rate_per_hour / STEPS_PER_HOUR
    )
    t0, origin = np.nonzero(born)
    n_jams = len(t0)
    if n_jams == 0:
        return 0
    drop = rng.uniform(*params.jam_drop_mph, n_jams)
    velocity = rng.uniform(*params.jam_speed_mph, n_jams)
    reach = rng.exponential(params.jam_reach_miles, n_jams)
    offset = rng.random(n_jams)  # when in its birth interval the jam starts
    dip = np.zeros_like(speed)
    for sensor in range(n_sensors):  # the sensors each jam meets on its way upstream
        distance = position[origin] - position[sensor]
        meets = (corridor_of[origin] == corridor_of[sensor]) & (distance >= 0) & (distance <= reach)
        arrival = t0[meets] + offset[meets] + distance[meets] / velocity[meets] * STEPS_PER_HOUR
        first = np.floor(arrival).astype(np.int64)
        share = 1.0 - (arrival - first)  # the jam's pass split over two 5-minute intervals
        for step, weight in ((first, share), (first + 1, 1.0 - share)):
            ok = step < n_steps
            np.add.at(dip[:, sensor], step[ok], (drop[meets] * weight)[ok])
    # a jam needs dense traffic to live: it fades where the demand is below 60 % of capacity
    density = np.clip((local_demand - 0.6) / 0.3, 0.0, 1.0)
    np.subtract(speed, np.minimum(dip * density, np.maximum(speed - 5.0, 0.0)), out=speed)
    return n_jams
