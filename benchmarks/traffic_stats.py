"""Print the traffic generator's statistics next to the METR-LA targets (../shared/ANCHORS.md).

Run by hand (not by pytest):  cd /work/main && uv run python benchmarks/traffic_stats.py [--seed N] [--days D]
Bar: every statistic within 25 % (relative) of its target; the hour-of-day speeds within 3 %.
Also prints the generation time, the weekday / weekend hour-of-day profile and the spread
of the statistics over a few seeds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from traffic.calibration import compare_to_targets, statistics  # noqa: E402
from traffic.data import DataConfig, _generate, load  # noqa: E402

TOLERANCE = 0.25
SPEED_TOLERANCE = 0.03


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--days", type=int, default=DataConfig().days)
    parser.add_argument("--seeds", type=int, default=5, help="seeds for the spread column")
    args = parser.parse_args()
    cfg = DataConfig(days=args.days)

    started = time.perf_counter()
    data = load(cfg, seed=args.seed)
    generated_in = time.perf_counter() - started
    started = time.perf_counter()
    stats = statistics(data)
    stats_in = time.perf_counter() - started
    print(data.description)
    print(f"generation {generated_in:.2f} s, statistics {stats_in:.2f} s")

    spread = {key: [] for key in stats}
    for seed in range(args.seed, args.seed + args.seeds):
        for key, value in statistics(load(cfg, seed=seed)).items():
            spread[key].append(value)

    print()
    print(f"{'statistic':<22} {'generated':>10} {'target':>9} {'rel diff':>9}   {'min..max over ' + str(args.seeds) + ' seeds':>24}")
    failures = 0
    for key, value, target, rel in compare_to_targets(stats):
        bar = SPEED_TOLERANCE if key.startswith("speed_h") else TOLERANCE
        ok = abs(rel) <= bar
        failures += not ok
        lo, hi = min(spread[key]), max(spread[key])
        print(f"{key:<22} {value:10.3f} {target:9.3f} {rel:+9.1%}   {lo:11.3f} .. {hi:8.3f} {'' if ok else '  <-- off'}")
    print(f"\n{failures} statistic(s) outside the bar (speeds 3 %, others 25 %)")

    sim = _generate(cfg, seed=args.seed)
    hours = np.asarray(data.timestamps.hour)
    weekend = np.asarray(data.timestamps.dayofweek >= 5)
    print("\nhour-of-day mean speed (weekday / weekend):")
    line = []
    for h in range(24):
        cells = []
        for mask in (~weekend, weekend):
            rows = (hours == h) & mask
            total = sum(np.nansum(d.speeds[rows]) for d in data.districts)
            count = sum(np.sum(~np.isnan(d.speeds[rows])) for d in data.districts)
            cells.append(total / count)
        line.append(f"{h:02d}h {cells[0]:4.1f}/{cells[1]:4.1f}")
    for i in range(0, 24, 6):
        print("  " + "  ".join(line[i : i + 6]))
    n_incidents = sum(len(x) for x in sim.incidents)
    n_bottlenecks = sum(len(x) for x in sim.bottlenecks)
    print(f"\n{n_bottlenecks} recurrent bottlenecks, {n_incidents} incidents")


if __name__ == "__main__":
    main()
