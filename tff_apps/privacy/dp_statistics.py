"""DP data statistics: the normalization (`privacy.preprocessing = "dp"`) and the client
profiles (`privacy.profiles = "dp"`) released through the Gaussian mechanism and accounted.

What each site releases (record level: add or remove one record at one site)
-----------------------------------------------------------------------------
Every value is first clipped to its column's public range `[low, high]`
(`preprocess.bounds`, never read from the data) and scaled to [-1, 1] around the range's
centre. A site's statistics vector is then

    [rows] + per numeric column [count, sum, sum of squares] + per categorical column
    [count of each code low..high]  (+ [positives] for a profile)

One record adds at most 1 to `rows`, and per numeric column at most 1 to each of count,
|sum| and sum of squares, and 1 to one code's count per categorical column: the L2
sensitivity is sqrt(1 + 3 * numeric + categorical) (+1 for the label in a profile). Noise
N(0, (z * sensitivity)^2) on every coordinate makes each release a Gaussian mechanism with
noise multiplier z (`GaussianDpEvent(z)`). The preprocessing noise is split over the sites
(each adds variance 1/K of it before the secure sum, so the sum carries the whole noise and
no site's exact aggregate reaches the server); a profile is one site's own release, noised
in full at the site. Each record lives at one site, so the sites' profiles together are one
Gaussian mechanism per record.

z is calibrated so that the statistics alone spend `privacy.statistics_epsilon` (default a
quarter of `privacy.target_epsilon`); training is calibrated for the rest of the target, with
the statistics composed in (`calibration.plan`). Nothing here imports TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dp_accounting import dp_event as dpe
from scipy import optimize

from shared.errors import UserError
from tff_apps.privacy.accounting import epsilon

DEFAULT_SHARE = 0.25  # of target_epsilon, when privacy.statistics_epsilon is 0
MAX_CATEGORY_CODES = 256


@dataclass(frozen=True)
class StatisticsSpec:
    """The public ranges of a table's raw columns, in the table's column order."""

    numeric: Mapping[str, tuple[float, float]]
    categorical: Mapping[str, tuple[int, int]]

    def sensitivity(self, with_labels: bool = False) -> float:
        return math.sqrt(1 + 3 * len(self.numeric) + len(self.categorical) + int(with_labels))


def spec_from(
    feature_names: Sequence[str], categorical: Sequence[str], bounds: Mapping[str, Sequence[float]]
) -> StatisticsSpec:
    """The spec of a table from `preprocess.bounds`; UserError naming what is missing or wrong."""
    missing = [name for name in feature_names if name not in bounds]
    if missing:
        raise UserError(
            f"privacy: DP statistics need a public range for every column; preprocess.bounds lacks "
            f"{', '.join(missing)}: give each [low, high] from the column's definition, not from the data"
        )
    numeric: dict[str, tuple[float, float]] = {}
    codes: dict[str, tuple[int, int]] = {}
    for name in feature_names:
        pair = list(bounds[name])
        if len(pair) != 2 or not all(math.isfinite(v) for v in pair) or pair[0] >= pair[1]:
            raise UserError(f"preprocess.bounds.{name} = {pair!r}: give [low, high] with low < high")
        if name in categorical:
            low, high = pair
            if low != round(low) or high != round(high) or high - low + 1 > MAX_CATEGORY_CODES:
                raise UserError(
                    f"preprocess.bounds.{name} = {pair!r}: a categorical column needs integer codes "
                    f"[lowest, highest], at most {MAX_CATEGORY_CODES} of them"
                )
            codes[name] = (int(low), int(high))
        else:
            numeric[name] = (float(pair[0]), float(pair[1]))
    return StatisticsSpec(numeric, codes)


def releases(section) -> list[str]:
    """The DP statistics a [privacy] section asks for, in the order they are released."""
    return [name for name in ("preprocessing", "profiles") if getattr(section, name) == "dp"]


def check_section(section) -> None:
    """DP statistics are accounted at record level only (a client-level adjacency would
    replace a whole site's statistics, which no clip bounds)."""
    for name in releases(section):
        if section.level != "record":
            raise UserError(
                f'privacy.{name} = "dp" is accounted per record: it needs privacy.level = "record" '
                f"(got {section.level!r})"
            )
    if releases(section) and section.statistics_epsilon == 0 and section.target_epsilon == 0:
        raise UserError(
            "privacy: DP statistics need privacy.statistics_epsilon > 0 (or privacy.target_epsilon > 0, "
            "whose quarter they take)"
        )
    if releases(section) and 0 < section.target_epsilon <= section.statistics_epsilon:
        raise UserError(
            f"privacy.statistics_epsilon = {section.statistics_epsilon:g} leaves nothing of "
            f"privacy.target_epsilon = {section.target_epsilon:g} for training; lower it or raise the target"
        )


def statistics_epsilon(section) -> float:
    return section.statistics_epsilon or DEFAULT_SHARE * section.target_epsilon


def statistics_event(noise_multiplier: float, count: int) -> dpe.DpEvent:
    """`count` Gaussian releases with noise multiplier z each."""
    return dpe.ComposedDpEvent([dpe.GaussianDpEvent(float(noise_multiplier)) for _ in range(count)])


def calibrate(target_epsilon: float, delta: float, count: int, accountant: str) -> float:
    """The z whose `count` Gaussian releases spend `target_epsilon` at `delta` (0.01 %)."""

    def excess(log_z: float) -> float:
        return epsilon(statistics_event(math.exp(log_z), count), delta, accountant) - target_epsilon

    low, high = math.log(1e-2), math.log(1e4)
    if excess(high) > 0:
        raise UserError(f"privacy.statistics_epsilon = {target_epsilon:g} is unreachable at delta {delta:g}")
    root = optimize.brentq(excess, low, high, xtol=1e-5)
    z = math.exp(root)
    while excess(math.log(z)) > 0:
        z *= 1.0001
    return z
