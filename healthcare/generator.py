"""The ``heart`` source: a generator of the four UCI heart-disease hospitals.

A seeded generator of the four UCI heart-disease hospitals (cleveland,
hungarian, switzerland, va), drawn from the published per-site, per-class
statistics (``../shared/ANCHORS.md``, "Healthcare"; the FLamby Fed-Heart-Disease
sites after dropping slope/ca/thal and incomplete rows: 303/261/46/130 rows).
For every site and class the row count is exact; categorical and binary
columns are drawn with exact counts (largest-remainder rounding of the
published percentages, randomly assigned to rows); continuous columns come
from a correlated Gaussian latent whose sample mean and covariance are fixed
exactly (so per-class means and sds match the table up to rounding and
clipping), mapped to normals for age/trestbps/chol/thalach and to a normal
censored at zero for oldpeak (its many zeros), with the censored normal's
parameters solved so that its mean and sd match the table. Within a class
thalach falls with age, oldpeak rises with age and falls with thalach, and
exang goes with high oldpeak / low thalach. Sites differ in prevalence
(0.46 / 0.38 / 0.98 / 0.78) and covariates, which is what makes per-site
z-scoring hurt.

``heart_clients`` returns one table per hospital; ``healthcare.data`` wraps them
into the source's ``HealthcareData``. Every random choice comes from ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from shared.tabular import ClientTable

__all__ = ["HEART_FEATURES", "HEART_CATEGORICAL", "HEART_SITES", "heart_clients"]

HEART_FEATURES = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak"]
HEART_CATEGORICAL = ["cp", "restecg"]
HEART_SITES = ("cleveland", "hungarian", "switzerland", "va")


@dataclass(frozen=True)
class _ClassStats:
    """One row of the ANCHORS table: a site's patients of one class."""

    n: int
    age: tuple[float, float]
    male: float  # %
    cp: tuple[float, float, float, float]  # % of cp 1/2/3/4
    trestbps: tuple[float, float]
    chol: tuple[float, float] | None  # None = all missing
    chol_missing: int
    fbs: float  # %
    restecg: tuple[float, float, float]  # % of restecg 0/1/2
    thalach: tuple[float, float]
    exang: float  # %
    oldpeak: tuple[float, float]


# ../shared/ANCHORS.md, "Per-site, per-class statistics of the four hospitals" (y = num > 0).
_HEART_STATS: dict[str, dict[int, _ClassStats]] = {
    "cleveland": {
        0: _ClassStats(164, (52.6, 9.5), 56, (10, 25, 41, 24), (129, 16), (243, 53), 0, 14, (58, 1, 41), (158, 19), 14, (0.59, 0.78)),
        1: _ClassStats(139, (56.6, 7.9), 82, (5, 6, 13, 76), (135, 19), (251, 49), 0, 16, (40, 2, 58), (139, 23), 55, (1.57, 1.30)),
    },
    "hungarian": {
        0: _ClassStats(163, (46.8, 8.0), 65, (4, 52, 21, 23), (131, 17), (238, 54), 0, 4, (80, 17, 3), (146, 22), 12, (0.20, 0.51)),
        1: _ClassStats(98, (49.4, 7.3), 88, (3, 8, 11, 78), (136, 19), (267, 79), 0, 13, (80, 19, 1), (129, 23), 65, (1.29, 1.07)),
    },
    "switzerland": {
        0: _ClassStats(1, (56, 0), 100, (0, 0, 100, 0), (120, 0), None, 1, 0, (100, 0, 0), (97, 0), 0, (0.0, 0.0)),
        1: _ClassStats(45, (56.7, 8.6), 93, (2, 2, 13, 82), (136, 20), None, 45, 9, (67, 27, 7), (114, 24), 64, (0.48, 0.75)),
    },
    "va": {
        0: _ClassStats(29, (56.9, 9.0), 93, (0, 10, 28, 62), (130, 18), (238, 65), 9, 28, (34, 48, 17), (121, 26), 41, (0.77, 0.91)),
        1: _ClassStats(101, (60.1, 7.3), 97, (3, 4, 14, 79), (136, 23), (240, 48), 24, 35, (45, 43, 13), (122, 20), 72, (1.41, 1.14)),
    },
}

# Within-class correlation of the Gaussian latent behind the continuous columns,
# in the order age, trestbps, chol, thalach, oldpeak (modest, UCI-like signs).
_LATENT = ("age", "trestbps", "chol", "thalach", "oldpeak")
_LATENT_CORR = np.array(
    [
        [1.00, 0.25, 0.15, -0.35, 0.15],
        [0.25, 1.00, 0.10, -0.05, 0.15],
        [0.15, 0.10, 1.00, 0.00, 0.05],
        [-0.35, -0.05, 0.00, 1.00, -0.25],
        [0.15, 0.15, 0.05, -0.25, 1.00],
    ]
)
# Physiological ranges (UCI observed ranges, slightly widened).
_CLIP = {"age": (25, 85), "trestbps": (80, 200), "chol": (85, 603), "thalach": (60, 202), "oldpeak": (0.0, 6.2)}


def heart_clients(seed: int) -> list[ClientTable]:
    """One table per hospital, in HEART_SITES order; label 1 = disease (num > 0)."""
    clients = []
    for site_index, site in enumerate(HEART_SITES):
        rng = np.random.default_rng([int(seed), site_index])
        parts = [_generate_class(_HEART_STATS[site][y], y, rng) for y in (0, 1)]
        features = pd.concat([p[0] for p in parts], ignore_index=True)
        labels = np.concatenate([p[1] for p in parts])
        order = rng.permutation(len(labels))
        clients.append(
            ClientTable(
                name=site,
                features=features.iloc[order].reset_index(drop=True),
                labels=labels[order].astype(np.int64),
            )
        )
    return clients


def _generate_class(st: _ClassStats, y: int, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    n = st.n
    z = _exact_latent(n, _LATENT_CORR, rng)
    col = {name: z[:, j] for j, name in enumerate(_LATENT)}

    out: dict[str, np.ndarray] = {}
    out["age"] = _normal_column(col["age"], *st.age, _CLIP["age"], decimals=0)
    out["sex"] = _exact_categorical(n, (100 - st.male, st.male), (0, 1), rng)
    out["cp"] = _exact_categorical(n, st.cp, (1, 2, 3, 4), rng)
    out["trestbps"] = _normal_column(col["trestbps"], *st.trestbps, _CLIP["trestbps"], decimals=0)

    chol = np.full(n, np.nan)
    if st.chol is not None and st.chol_missing < n:
        observed = np.sort(rng.permutation(n)[: n - st.chol_missing])
        chol[observed] = _normal_column(_standardize(col["chol"][observed]), *st.chol, _CLIP["chol"], decimals=0)
    out["chol"] = chol

    out["fbs"] = _exact_categorical(n, (100 - st.fbs, st.fbs), (0, 1), rng)
    out["restecg"] = _exact_categorical(n, st.restecg, (0, 1, 2), rng)
    out["thalach"] = _normal_column(col["thalach"], *st.thalach, _CLIP["thalach"], decimals=0)

    # exang: exact count, given preferably to rows with high oldpeak / low thalach.
    n_exang = _largest_remainder((100 - st.exang, st.exang), n)[1]
    score = 0.5 * col["oldpeak"] - 0.5 * col["thalach"] + rng.standard_normal(n)
    exang = np.zeros(n)
    exang[np.argsort(-score, kind="stable")[:n_exang]] = 1.0
    out["exang"] = exang

    out["oldpeak"] = _censored_column(col["oldpeak"], *st.oldpeak)

    frame = pd.DataFrame({name: np.asarray(out[name], dtype=np.float64) for name in HEART_FEATURES})
    return frame, np.full(n, y, dtype=np.int64)


def _standardize(x: np.ndarray) -> np.ndarray:
    if len(x) < 2:
        return np.zeros_like(x)
    sd = x.std(ddof=1)
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


def _exact_latent(n: int, corr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """n draws whose sample mean is 0 and sample correlation is exactly ``corr``."""
    k = corr.shape[0]
    e = rng.standard_normal((n, k))
    if n <= k + 1:  # too few rows to fix the covariance: just centre and scale
        return np.column_stack([_standardize(e[:, j]) for j in range(k)])
    e = e - e.mean(axis=0)
    cov = e.T @ e / (n - 1)
    white = e @ np.linalg.inv(np.linalg.cholesky(cov)).T
    return white @ np.linalg.cholesky(corr).T


def _normal_column(z: np.ndarray, mean: float, sd: float, clip: tuple[float, float], decimals: int) -> np.ndarray:
    return np.round(np.clip(mean + sd * z, *clip), decimals)


def _censored_column(z: np.ndarray, mean: float, sd: float) -> np.ndarray:
    """max(0, mu + sigma z) with (mu, sigma) such that the result has the given mean and sd."""
    if mean <= 0 or sd <= 0:
        return np.full(len(z), max(mean, 0.0))
    mu, sigma = _censored_normal_params(mean, sd)
    return np.round(np.clip(mu + sigma * z, *_CLIP["oldpeak"]), 1)


def _phi(t: float) -> float:
    return math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)


def _Phi(t: float) -> float:
    return 0.5 * math.erfc(-t / math.sqrt(2))


def _censored_normal_params(mean: float, sd: float) -> tuple[float, float]:
    """Solve for N(mu, sigma) such that max(0, X) has the given mean and sd."""

    def ratio(t: float) -> float:  # E[Y^2] / E[Y]^2 for Y = max(0, X), X ~ N(t, 1); decreasing in t
        m1 = t * _Phi(t) + _phi(t)
        m2 = (t * t + 1) * _Phi(t) + t * _phi(t)
        return m2 / (m1 * m1)

    target = 1 + (sd / mean) ** 2
    lo, hi = -6.0, 10.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if ratio(mid) > target:
            lo = mid
        else:
            hi = mid
    t = 0.5 * (lo + hi)
    sigma = mean / (t * _Phi(t) + _phi(t))
    return t * sigma, sigma


def _largest_remainder(percents, n: int) -> list[int]:
    p = np.asarray(percents, dtype=np.float64)
    exact = p / p.sum() * n
    counts = np.floor(exact).astype(int)
    rest = n - counts.sum()
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts.tolist()


def _exact_categorical(n: int, percents, codes, rng: np.random.Generator) -> np.ndarray:
    counts = _largest_remainder(percents, n)
    values = np.repeat(np.asarray(codes, dtype=np.float64), counts)
    return rng.permutation(values)

