"""Finance csv source: one party's CSV columns, checked and parsed.

The config's comma-separated column lists (`parse_names`), the ID and label columns,
0/1 labels from a two-valued column, and the cells of a feature column as numbers or as
categorical text. Every mistake is a one-line `UserError` naming the file, column or
config key. `finance.parties` loads each party's table with these; vertical scoring (`finance.model`) checks its CSVs' ID
column with `require_id_column`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from shared.errors import UserError
from shared.tabular import MISSING_TOKENS, binary_labels, numeric_columns

__all__ = [
    "parse_names", "require_id_column", "column_listing", "lender_labels", "party_features",
]


def parse_names(text: str, key: str) -> list[str]:
    """A comma-separated config value -> the stripped, non-empty names; a repeat is a UserError."""
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UserError(f"data.{key} lists '{name}' twice; list each column once")
        seen.add(name)
    return names


def require_id_column(df: pd.DataFrame, id_column: str, source: str) -> None:
    """UserError naming the file and the ID column, listing the file's columns."""
    if id_column not in df.columns:
        raise UserError(
            f"{source}: the customer-ID column '{id_column}' (data.id_column) is missing; "
            f"the file has columns {column_listing(df.columns)}"
        )


def column_listing(columns: Sequence) -> str:
    """A file's columns for an error message: the first 20, long names shortened."""
    names = [str(c) for c in columns]
    shown = [n if len(n) <= 40 else n[:37] + "..." for n in names[:20]]
    return ", ".join(shown) + (f" and {len(names) - 20} more" if len(names) > 20 else "")


def lender_labels(values: pd.Series, positive_label: str, source: str, column: str) -> np.ndarray:
    """0/1 labels (1 = default) from a column with exactly two distinct values.

    Values compare as stripped text, or as numbers when both parse ("1.0" == "1").
    `positive_label` may be empty when the two values are 0 and 1.
    """
    text = pd.Series(values).reset_index(drop=True).astype(str).str.strip()
    missing = text.isin(MISSING_TOKENS).to_numpy()
    if missing.any():
        raise UserError(
            f"{source}: label column '{column}' is empty at row {int(np.flatnonzero(missing)[0]) + 1}; "
            "every lender row needs a label (drop the row or fill in the label)"
        )
    keys: dict[object, str] = {}
    for value in pd.unique(text):
        keys.setdefault(_label_key(value), value)
    shown = ", ".join(f"'{v}'" for v in list(keys.values())[:10]) + (" ..." if len(keys) > 10 else "")
    if len(keys) > 2:
        raise UserError(
            f"{source}: label column '{column}' is not binary: it has {len(keys)} distinct values ({shown}); "
            "give two values, e.g. 0/1 or good/bad"
        )
    if len(keys) < 2:
        raise UserError(
            f"{source}: label column '{column}' has only the value {shown}; training needs both "
            "defaulted and repaid customers"
        )
    positive = str(positive_label).strip()
    if not positive:
        if set(keys) != {0.0, 1.0}:
            raise UserError(
                f"data.positive_label is empty but label column '{column}' in {source} has values {shown}; "
                "set data.positive_label to the value that means default"
            )
        positive = "1"
    return binary_labels(text, positive, source, column)


def _label_key(value: str) -> object:
    try:
        number = float(value)
    except ValueError:
        return value
    return number if np.isfinite(number) else value


def party_features(
    df: pd.DataFrame, columns: list[str], categorical: list[str], infer: bool, source: str
) -> tuple[pd.DataFrame, list[str]]:
    """(a party's feature columns, the categorical ones among them); `infer`: non-numeric = categorical."""
    if infer:
        party_categorical = [c for c in columns if not _is_numeric_text(df[c])]
    else:
        party_categorical = [c for c in columns if c in categorical]
    numeric = [c for c in columns if c not in party_categorical]
    parsed = numeric_columns(df, numeric, source)  # errors name the file, column and row
    features = pd.DataFrame(
        {c: (_category_text(df[c]) if c in party_categorical else parsed[c]) for c in columns},
        columns=columns,
    )
    return features, party_categorical


def _is_numeric_text(values: pd.Series) -> bool:
    text = values.astype(str).str.strip()
    present = text[~text.isin(MISSING_TOKENS)]
    numbers = pd.to_numeric(present, errors="coerce")
    return bool(numbers.notna().all())


def _category_text(values: pd.Series) -> pd.Series:
    """Stripped text; missing tokens become "" (the encoder maps "" to all zeros)."""
    text = values.astype(str).str.strip().reset_index(drop=True)
    return text.mask(text.isin(MISSING_TOKENS), "").astype(object)

