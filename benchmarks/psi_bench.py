"""Benchmark ECDH-PSI on ristretto255 (shared.psi): 10k x 10k and 100k x 100k IDs with 80 % overlap.

Run by hand (not by pytest):  cd /work/main && uv run python benchmarks/psi_bench.py
Target: 100k x 100k in under 30 s on 2 cores (ristretto255 through rbcl/libsodium, one thread
per core: about 10 s; the earlier X25519 version took 10.7 s).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.psi import expected_bytes, intersect

OVERLAP = 0.8
SIZES = (10_000, 100_000)


def overlapping_ids(n: int, overlap: float, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    shared = round(overlap * n)
    pool = [f"CUST-{value:010d}" for value in rng.choice(10**10, size=2 * n - shared, replace=False)]
    ids_a, ids_b = pool[:n], pool[:shared] + pool[n:]
    rng.shuffle(ids_a)
    rng.shuffle(ids_b)
    return ids_a, ids_b


def main() -> None:
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, overlap {OVERLAP:.0%}")
    print(f"{'sizes':>17} {'seconds':>8} {'matches':>8} {'rate_a':>7} {'bytes':>11} {'MB':>6}")
    for n in SIZES:
        ids_a, ids_b = overlapping_ids(n, OVERLAP, seed=0)
        result = intersect(ids_a, ids_b)
        assert result.match_count == round(OVERLAP * n)
        assert result.bytes_exchanged == expected_bytes(n, n)
        print(
            f"{n:>7,} x {n:>7,} {result.seconds:8.2f} {result.match_count:8,} {result.match_rate_a:7.2f} "
            f"{result.bytes_exchanged:11,} {result.bytes_exchanged / 1e6:6.1f}"
        )


if __name__ == "__main__":
    main()
