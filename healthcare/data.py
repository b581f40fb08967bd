"""Healthcare data: one table per hospital, for binary diagnosis (horizontal FL).

Three sources (``[data] source``):

``breast_cancer`` (default, embedded)
    scikit-learn's Wisconsin breast cancer table (569 x 30, bundled, no download),
    label 1 = malignant, split over ``n_clients`` hospitals with Dirichlet label
    skew (``alpha``) and log-normal quantity skew (``quantity_sigma``). This is the
    only source that starts from one pooled table, because the public data has no
    sites; it is partitioned before anything else sees it.

``heart`` (embedded generator)
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

``csv`` (the user's data)
    Either ``path`` is a folder with one ``*.csv`` per hospital (site name = file
    stem, sites sorted by name), or ``path`` is one CSV with a ``site_column``
    (sites sorted by name). Every hospital must have the same feature columns.

Missing-value policy (csv):

- A cell counts as missing when, after stripping spaces, it is one of
  ``shared.tabular.MISSING_TOKENS`` (``""``, ``NA``, ``N/A``, ``NaN``, ``nan``,
  ``?``, ``null``, ``NULL``).
- In the columns listed in ``zero_means_missing`` a value of 0 also counts as
  missing (e.g. UCI ``chol``, where 0 means "not measured").
- Rows whose label is missing are dropped; the count per site is reported in
  ``HealthcareData.dropped_rows``. Any label value other than
  ``positive_label`` is a negative; or, when ``negative_label`` is set, any value
  other than it is a positive (UCI heart disease: ``num`` 0 healthy, 1-4 disease).
- Missing feature values stay NaN here. The engine imputes them downstream with
  the federated mean (computed from per-site counts and sums, never from pooled
  rows). A column that is entirely missing at one site is allowed (it is imputed
  there); a column with no value at any site is an error, since there is nothing
  to impute it with.
- A non-numeric feature value that is not a missing token is an error naming the
  file, column and row.

Nothing here pools clients' rows, and every random choice comes from ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from shared.errors import UserError
from shared.partition import dirichlet_label_partition, quantity_weights
from shared.tabular import (
    MISSING_TOKENS,
    ClientTable,
    label_matches,
    numeric_columns,
    read_csv,
    require_columns,
)

__all__ = ["DataConfig", "HealthcareData", "load", "HEART_SITES", "HEART_FEATURES"]


@dataclass(frozen=True)
class DataConfig:
    """The [data] section of a healthcare job."""

    source: str = field(default="breast_cancer", metadata={"choices": ("breast_cancer", "heart", "csv")})
    n_clients: int = field(default=5, metadata={"min": 2, "max": 1000})  # breast_cancer only
    alpha: float = field(default=0.5, metadata={"min": 0.01})  # Dirichlet label skew, breast_cancer only
    quantity_sigma: float = field(default=0.5, metadata={"min": 0.0})  # log-normal quantity skew, breast_cancer only
    path: str = ""  # csv: a folder of *.csv (one per hospital) or one CSV file with a site column
    site_column: str = ""  # csv, single-file layout: the column naming the hospital
    label_column: str = ""  # csv
    positive_label: str = "1"  # csv: the label value that means disease
    negative_label: str = ""  # csv: if set, this value means healthy and every other value disease (UCI num: "0")
    feature_columns: list[str] = field(default_factory=list)  # csv: empty = every column except label/site
    categorical_columns: list[str] = field(default_factory=list)  # csv: one-hot encoded by the engine
    zero_means_missing: list[str] = field(default_factory=list)  # csv: columns where 0 means not measured
    min_rows_per_site: int = field(default=10, metadata={"min": 2})


@dataclass
class HealthcareData:
    clients: list[ClientTable]  # one per hospital, in a stable order
    feature_names: list[str]  # raw feature columns, same for every client
    categorical_columns: list[str]  # subset of feature_names to be one-hot encoded by the engine
    source_description: str  # one line
    dropped_rows: dict[str, int]  # per site: rows dropped (e.g. missing label)
    zero_means_missing: list[str] = field(default_factory=list)  # also applied by the exported model


def load(cfg: DataConfig, seed: int) -> HealthcareData:
    """Load the configured source and return one table per hospital."""
    if cfg.source == "breast_cancer":
        return _load_breast_cancer(cfg, seed)
    if cfg.source == "heart":
        return _load_heart(seed)
    if cfg.source == "csv":
        return _load_csv(cfg)
    raise UserError(f"data.source = {cfg.source!r} is unknown; use one of breast_cancer, heart, csv")


# --------------------------------------------------------------------------- breast_cancer


def _load_breast_cancer(cfg: DataConfig, seed: int) -> HealthcareData:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    names = [str(n).replace(" ", "_") for n in bunch.feature_names]
    features = pd.DataFrame(np.asarray(bunch.data, dtype=np.float64), columns=names)
    labels = (1 - np.asarray(bunch.target)).astype(np.int64)  # sklearn: 0 = malignant
    n_rows = len(labels)
    if cfg.n_clients * cfg.min_rows_per_site > n_rows:
        raise UserError(
            f"data.n_clients = {cfg.n_clients} is too many for breast_cancer's {n_rows} rows with "
            f"data.min_rows_per_site = {cfg.min_rows_per_site}; use at most {n_rows // cfg.min_rows_per_site} clients"
        )
    weights = quantity_weights(cfg.n_clients, cfg.quantity_sigma, seed)
    try:
        parts = dirichlet_label_partition(
            labels, cfg.n_clients, cfg.alpha, seed, min_size=cfg.min_rows_per_site, size_weights=weights
        )
    except UserError:
        raise UserError(
            f"data.alpha = {cfg.alpha:g} with data.n_clients = {cfg.n_clients}: could not give every hospital "
            f"data.min_rows_per_site = {cfg.min_rows_per_site} rows of breast_cancer; raise data.alpha, "
            "or lower data.n_clients, data.quantity_sigma or data.min_rows_per_site"
        ) from None
    clients = []
    for i, idx in enumerate(parts, start=1):
        idx = np.asarray(idx, dtype=np.int64)
        clients.append(
            ClientTable(
                name=f"hospital_{i}",
                features=features.iloc[idx].reset_index(drop=True),
                labels=labels[idx].copy(),
            )
        )
    description = (
        f"breast_cancer: {n_rows} rows of scikit-learn's Wisconsin breast cancer data split over "
        f"{cfg.n_clients} hospitals (Dirichlet label skew alpha {cfg.alpha:g}, "
        f"quantity sigma {cfg.quantity_sigma:g}, seed {seed})"
    )
    return HealthcareData(
        clients=clients,
        feature_names=names,
        categorical_columns=[],
        source_description=description,
        dropped_rows={c.name: 0 for c in clients},
    )


# --------------------------------------------------------------------------- heart generator

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


def _load_heart(seed: int) -> HealthcareData:
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
    return HealthcareData(
        clients=clients,
        feature_names=list(HEART_FEATURES),
        categorical_columns=list(HEART_CATEGORICAL),
        zero_means_missing=["chol"],  # raw UCI rows sent for scoring code "not measured" as 0
        source_description=f"heart: 4 hospitals generated from UCI per-site statistics (seed {seed})",
        dropped_rows={c.name: 0 for c in clients},
    )


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


# --------------------------------------------------------------------------- csv


@dataclass
class _Site:
    name: str
    source: str  # how error messages name it, e.g. "'/data/a.csv'" or "'/data/all.csv' (site 'x')"
    features: pd.DataFrame  # float64, NaN = missing, index 0..n-1
    label_text: pd.Series  # the label column as text, index 0..n-1


def _load_csv(cfg: DataConfig) -> HealthcareData:
    if not cfg.label_column:
        raise UserError("data.label_column is empty; name the label column of your CSV files")
    if not cfg.path:
        raise UserError(
            "data.path is empty; give a folder of CSV files (one per hospital) or one CSV file with data.site_column"
        )
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise UserError(f"data.path = '{cfg.path}' does not exist; give a folder of CSV files or one CSV file")
    _check_column_lists(cfg)

    if path.is_dir():
        sites, feature_names, layout = _read_folder(cfg, path)
    else:
        sites, feature_names, layout = _read_single_file(cfg, path)

    clients: list[ClientTable] = []
    dropped: dict[str, int] = {}
    kept_labels: list[pd.Series] = []
    for site in sites:
        text = site.label_text.astype(str).str.strip()
        missing = site.label_text.isna().to_numpy() | text.isin(MISSING_TOKENS).to_numpy()
        n_kept = int((~missing).sum())
        dropped[site.name] = int(missing.sum())
        if n_kept < cfg.min_rows_per_site:
            raise UserError(
                f"{site.source}: {n_kept} rows with a label, fewer than data.min_rows_per_site = "
                f"{cfg.min_rows_per_site}; add rows, lower data.min_rows_per_site or leave this hospital out"
            )
        kept_labels.append(text[~missing])
        clients.append(
            ClientTable(
                name=site.name,
                features=site.features.loc[~missing].reset_index(drop=True),
                labels=np.zeros(n_kept, dtype=np.int64),  # filled below
            )
        )

    # Each site maps its own labels; a hospital without a positive (or negative) case is
    # allowed, a label value that occurs at no site is an error (usually a typo).
    for client, labels in zip(clients, kept_labels):
        client.labels = _site_labels(cfg, labels, client.name)
    _require_both_classes(cfg, clients)

    for c in feature_names:
        if all(client.features[c].isna().all() for client in clients):
            raise UserError(
                f"column '{c}' has no value at any site, so it cannot be imputed; "
                "remove it from the files or from data.feature_columns"
            )

    return HealthcareData(
        clients=clients,
        feature_names=feature_names,
        categorical_columns=list(cfg.categorical_columns),
        zero_means_missing=list(cfg.zero_means_missing),
        source_description=f"csv: {len(clients)} hospitals from {layout}",
        dropped_rows=dropped,
    )


def _site_labels(cfg: DataConfig, labels: pd.Series, site: str) -> np.ndarray:
    source = f"data.path = '{cfg.path}', site {site}"
    if cfg.negative_label:
        return (~label_matches(labels, cfg.negative_label, source, cfg.label_column)).astype(np.int64)
    return label_matches(labels, cfg.positive_label, source, cfg.label_column).astype(np.int64)


def _require_both_classes(cfg: DataConfig, clients: list[ClientTable]) -> None:
    positives = sum(int(c.labels.sum()) for c in clients)
    rows = sum(len(c) for c in clients)
    if cfg.negative_label and positives == rows:
        raise UserError(
            f"data.negative_label = '{cfg.negative_label}' occurs in no row of label column "
            f"'{cfg.label_column}'; name the value that means healthy"
        )
    if not cfg.negative_label and positives == 0:
        raise UserError(
            f"data.positive_label = '{cfg.positive_label}' occurs in no row of label column "
            f"'{cfg.label_column}'; name the value that means disease (or set data.negative_label)"
        )


def _check_column_lists(cfg: DataConfig) -> None:
    for key in ("feature_columns", "categorical_columns", "zero_means_missing"):
        values = list(getattr(cfg, key))
        dupes = sorted({v for v in values if values.count(v) > 1})
        if dupes:
            raise UserError(f"data.{key} lists '{dupes[0]}' twice; list each column once")
    for c in cfg.feature_columns:
        if c == cfg.label_column:
            raise UserError(f"data.feature_columns includes the label column '{c}'; remove it")
        if cfg.site_column and c == cfg.site_column:
            raise UserError(f"data.feature_columns includes the site column '{c}'; remove it")
    if cfg.site_column and cfg.site_column == cfg.label_column:
        raise UserError(f"data.site_column and data.label_column are both '{cfg.label_column}'; they must differ")


def _feature_names(cfg: DataConfig, columns, source: str) -> list[str]:
    """The configured feature columns, or every column except label/site; checks the column lists."""
    if cfg.feature_columns:
        names = list(cfg.feature_columns)
    else:
        names = [c for c in columns if c not in (cfg.label_column, cfg.site_column)]
        if not names:
            raise UserError(
                f"{source}: no feature column besides the label '{cfg.label_column}'; "
                "add feature columns or list them in data.feature_columns"
            )
    for key in ("categorical_columns", "zero_means_missing"):
        for c in getattr(cfg, key):
            if c not in names:
                raise UserError(
                    f"data.{key} names '{c}', which is not a feature column; features are {', '.join(names)}"
                )
    return names


def _read_folder(cfg: DataConfig, folder: Path) -> tuple[list[_Site], list[str], str]:
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".csv"), key=lambda p: p.stem)
    if len(files) < 2:
        raise UserError(
            f"data.path = '{cfg.path}' holds {len(files)} CSV file(s); put one CSV per hospital there, at least 2"
        )
    stems = [p.stem for p in files]
    for s in stems:
        if stems.count(s) > 1:
            raise UserError(f"data.path = '{cfg.path}' has two CSV files named '{s}'; give each hospital one file")

    sites: list[_Site] = []
    feature_names: list[str] = []
    for i, p in enumerate(files):
        source = str(p)
        df = read_csv(p)
        if i == 0:
            feature_names = _feature_names(cfg, df.columns, source)
        require_columns(df, [cfg.label_column, *feature_names], source)
        if not cfg.feature_columns:
            extra = [c for c in df.columns if c not in (cfg.label_column, cfg.site_column) and c not in feature_names]
            if extra:
                raise UserError(
                    f"{source}: column '{extra[0]}' is not in {files[0]}; every hospital needs the same "
                    "feature columns (or list the shared ones in data.feature_columns)"
                )
        features = numeric_columns(df, feature_names, source, zero_means_missing=tuple(cfg.zero_means_missing))
        sites.append(_Site(p.stem, source, features, df[cfg.label_column].reset_index(drop=True)))
    return sites, feature_names, f"folder '{folder}' (one CSV per hospital)"


def _read_single_file(cfg: DataConfig, path: Path) -> tuple[list[_Site], list[str], str]:
    if not cfg.site_column:
        raise UserError(
            f"data.site_column is empty but data.path = '{cfg.path}' is one file; name the column that holds "
            "the hospital, or point data.path at a folder with one CSV per hospital"
        )
    source = str(path)
    df = read_csv(path)
    require_columns(df, [cfg.site_column, cfg.label_column], source)
    feature_names = _feature_names(cfg, df.columns, source)
    require_columns(df, feature_names, source)
    # Parsed on the whole file so that error messages give the file's row numbers.
    features = numeric_columns(df, feature_names, source, zero_means_missing=tuple(cfg.zero_means_missing))

    site_text = df[cfg.site_column].astype(str).str.strip()
    missing_site = site_text.isin(MISSING_TOKENS).to_numpy()
    if missing_site.any():
        raise UserError(
            f"{source}: {int(missing_site.sum())} rows have no hospital in site column '{cfg.site_column}' "
            f"(first at row {int(np.flatnonzero(missing_site)[0]) + 1}); fill it in or remove those rows"
        )
    names = sorted(site_text.unique())
    if len(names) < 2:
        raise UserError(
            f"{source}: site column '{cfg.site_column}' names {len(names)} hospital(s); "
            "federated training needs at least 2"
        )
    sites = []
    for name in names:
        mask = (site_text == name).to_numpy()
        sites.append(
            _Site(
                name,
                f"{source} (site '{name}')",
                features.loc[mask].reset_index(drop=True),
                df.loc[mask, cfg.label_column].reset_index(drop=True),
            )
        )
    return sites, feature_names, f"'{path}' split by column '{cfg.site_column}'"
