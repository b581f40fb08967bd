"""Healthcare data: one table per hospital, for binary diagnosis (horizontal FL).

Three sources (``[data] source``):

``breast_cancer`` (default, embedded)
    scikit-learn's Wisconsin breast cancer table (569 x 30, bundled, no download),
    label 1 = malignant, split over ``n_clients`` hospitals with Dirichlet label
    skew (``alpha``) and log-normal quantity skew (``quantity_sigma``). This is the
    only source that starts from one pooled table, because the public data has no
    sites; it is partitioned before anything else sees it.

``heart`` (embedded generator, ``healthcare/generator.py``)
    A seeded generator of the four UCI heart-disease hospitals (cleveland,
    hungarian, switzerland, va), drawn from the published per-site, per-class
    statistics (``../shared/ANCHORS.md``, "Healthcare"); that module says how.

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

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from healthcare.generator import HEART_CATEGORICAL, HEART_FEATURES, heart_clients
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

__all__ = ["DataConfig", "HealthcareData", "load"]


@dataclass(frozen=True)
class DataConfig:
    """The [data] section of a healthcare job."""

    source: str = field(default="breast_cancer", metadata={"choices": ("breast_cancer", "heart", "csv"), "doc": (
        "`breast_cancer`: scikit-learn's bundled data (malignant = 1) split over `n_clients` hospitals; `heart`: a "
        "generator of the four UCI heart-disease hospitals from their published per-site statistics; `csv`: your "
        "files (docs/healthcare.md)."
    )})
    n_clients: int = field(default=5, metadata={"min": 2, "max": 1000, "doc": "breast_cancer: the number of hospitals."})
    alpha: float = field(default=0.5, metadata={"min": 0.01, "doc": (
        "breast_cancer: Dirichlet label skew α across hospitals (smaller = more skewed)."
    )})
    quantity_sigma: float = field(default=0.5, metadata={"min": 0.0, "doc": (
        "breast_cancer: log-normal quantity skew σ of the hospitals' sizes."
    )})
    path: str = field(default="", metadata={"doc": (
        "csv: a folder with one CSV per hospital (site = file name), or one CSV with a `site_column`."
    )})
    site_column: str = field(default="", metadata={"doc": "csv, single file: the column naming the hospital."})
    label_column: str = field(default="", metadata={"doc": "csv: the label column."})
    positive_label: str = field(default="1", metadata={"doc": (
        "csv: the label value that means disease; every other value is healthy."
    )})
    negative_label: str = field(default="", metadata={"doc": (
        "csv: if set, the value that means healthy, and every other value is disease (UCI heart `num`: \"0\")."
    )})
    feature_columns: list[str] = field(default_factory=list, metadata={"doc": (
        "csv: the feature columns; empty = every column except the label and site columns."
    )})
    categorical_columns: list[str] = field(default_factory=list, metadata={"doc": (
        "csv: integer-coded columns to one-hot encode (for example chest-pain type)."
    )})
    zero_means_missing: list[str] = field(default_factory=list, metadata={"doc": (
        "csv: columns where 0 means \"not measured\" (for example UCI `chol`); the export applies it too."
    )})
    min_rows_per_site: int = field(default=10, metadata={"min": 2, "doc": (
        "Fewest labelled rows a hospital may have (breast_cancer: the smallest hospital of the split)."
    )})


@dataclass
class HealthcareData:
    clients: list[ClientTable]  # one per hospital, in a stable order
    feature_names: list[str]  # raw feature columns, same for every client
    categorical_columns: list[str]  # subset of feature_names to be one-hot encoded by the engine
    source_description: str  # one line
    dropped_rows: dict[str, int]  # per site: rows dropped (e.g. missing label)
    zero_means_missing: list[str] = field(default_factory=list)  # also applied by the exported model
    # public [low, high] per column, for DP statistics (`preprocess.bounds` overrides them)
    public_bounds: dict[str, list[float]] = field(default_factory=dict)


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


# --------------------------------------------------------------------------- heart


def _load_heart(seed: int) -> HealthcareData:
    clients = heart_clients(seed)
    return HealthcareData(
        clients=clients,
        feature_names=list(HEART_FEATURES),
        categorical_columns=list(HEART_CATEGORICAL),
        zero_means_missing=["chol"],  # raw UCI rows sent for scoring code "not measured" as 0
        source_description=f"heart: 4 hospitals generated from UCI per-site statistics (seed {seed})",
        dropped_rows={c.name: 0 for c in clients},
        public_bounds=HEART_PUBLIC_BOUNDS,
    )


# The UCI heart-disease attributes' ranges as their documentation and clinical plausibility
# give them (codes: cp 1-4, restecg 0-2; binary sex, fbs, exang), never read from the rows:
# what a DP release may clip to. docs/privacy.md repeats them for users of the real CSVs.
HEART_PUBLIC_BOUNDS = {
    "age": [20, 90], "sex": [0, 1], "cp": [1, 4], "trestbps": [80, 200], "chol": [100, 600],
    "fbs": [0, 1], "restecg": [0, 2], "thalach": [60, 210], "exang": [0, 1], "oldpeak": [-3, 7],
}


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
