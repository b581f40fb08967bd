"""Reading and validating tabular client data (CSV files) without any ML framework.

Every problem with the user's file is reported as a one-line `UserError` that names
the file (or other source), the column and what was expected.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from shared.errors import UserError

MISSING_TOKENS = ("", "NA", "N/A", "NaN", "nan", "?", "null", "NULL")  # cells read as missing

# Cell values quoted in error messages are shortened so the message stays one short line.
_MAX_SHOWN_CHARS = 40
_MAX_SHOWN_VALUES = 10


@dataclass
class ClientTable:
    """One client's (site's) rows: raw feature columns and binary labels."""

    name: str
    features: pd.DataFrame  # raw feature columns, float64, NaN = missing
    labels: np.ndarray  # int64 0/1, len == len(features)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.ndim != 1 or len(self.labels) != len(self.features):
            raise ValueError(
                f"ClientTable {self.name!r}: {len(self.features)} feature rows but "
                f"labels of shape {self.labels.shape}"
            )

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "ClientTable":
        """The rows at positions `idx` (index reset to 0..k-1), under the same name."""
        positions = np.asarray(idx, dtype=np.int64)
        return ClientTable(
            name=self.name,
            features=self.features.iloc[positions].reset_index(drop=True),
            labels=self.labels[positions].copy(),
        )

    def fingerprint(self) -> str:
        """SHA-256 hex digest of name, column names, feature values and labels.

        Built from explicit little-endian bytes (never Python's salted `hash`), so the
        same table gives the same digest in every run and process.
        """
        digest = hashlib.sha256()
        _update_with_text(digest, self.name)
        digest.update(len(self.features.columns).to_bytes(8, "little"))
        for column in self.features.columns:
            _update_with_text(digest, str(column))
        values = self.features.to_numpy(dtype=np.float64, copy=True)
        # NaN has many bit patterns and -0.0 differs from 0.0 bitwise; pin one of each.
        values[np.isnan(values)] = np.nan
        values += 0.0
        digest.update(np.asarray(values.shape, dtype="<i8").tobytes())
        digest.update(np.ascontiguousarray(values, dtype="<f8").tobytes())
        digest.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        return digest.hexdigest()


def _update_with_text(digest: "hashlib._Hash", text: str) -> None:
    """Add length-prefixed UTF-8 text, so ("ab", "c") and ("a", "bc") hash differently."""
    encoded = text.encode("utf-8")
    digest.update(len(encoded).to_bytes(8, "little"))
    digest.update(encoded)


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read a CSV file with every cell as a string and stripped header names.

    Raises UserError when the file is missing, empty, has no data rows, cannot be
    parsed as CSV, or has two columns with the same (stripped) name.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if not path.is_file():
        raise UserError(f"{path}: is not a file; give the path of a CSV file")
    try:
        # header=None keeps duplicate header names as they are (pandas would rename
        # them to "a.1"), so duplicates can be reported under their real name.
        raw = pd.read_csv(
            path,
            header=None,
            dtype=str,
            keep_default_na=False,
            encoding="utf-8-sig",
            skip_blank_lines=True,
        )
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: file is empty; expected a header line and data rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError, csv.Error) as error:
        reason = _one_line(str(error), limit=120)
        raise UserError(f"{path}: not a readable CSV file ({reason})") from None

    header = [_header_name(value, position) for position, value in enumerate(raw.iloc[0])]
    _reject_duplicate_names(header, str(path))
    data = raw.iloc[1:].reset_index(drop=True)
    if data.empty:
        raise UserError(f"{path}: has a header but no data rows")
    data.columns = header
    # Short rows leave NaN in the trailing cells; an absent cell is an empty cell.
    return data.fillna("")


def _header_name(value: object, position: int) -> str:
    """Stripped header text; a blank header gets pandas' "Unnamed: i" name."""
    text = "" if pd.isna(value) else str(value).strip()
    return text if text else f"Unnamed: {position}"


def _reject_duplicate_names(header: Sequence[str], source: str) -> None:
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise UserError(
                f"{source}: column '{_shown(name)}' appears more than once in the header; "
                "give every column a unique name"
            )
        seen.add(name)


def require_columns(df: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    """Raise UserError for the first of `columns` that `df` lacks."""
    present = set(df.columns)
    for column in columns:
        if column not in present:
            available = ", ".join(_shown(name) for name in df.columns)
            raise UserError(
                f"{source}: column '{_shown(column)}' is missing; the file has columns {available}"
            )


def numeric_columns(
    df: pd.DataFrame,
    columns: Sequence[str],
    source: str,
    zero_means_missing: Sequence[str] = (),
) -> pd.DataFrame:
    """A new float64 DataFrame holding exactly `columns`, in that order.

    Cells in MISSING_TOKENS become NaN, as do zeros in the `zero_means_missing` columns
    (datasets such as UCI heart code an unmeasured cholesterol as 0). Any other cell
    that is not a finite number is a UserError naming the column and the data row.
    """
    unknown = [name for name in zero_means_missing if name not in columns]
    if unknown:
        raise ValueError(f"zero_means_missing names columns not in `columns`: {unknown}")
    require_columns(df, columns, source)
    converted = {
        column: _column_to_float(df[column], source, column) for column in columns
    }
    result = pd.DataFrame(converted, columns=list(columns), dtype=np.float64)
    for column in zero_means_missing:
        result.loc[result[column] == 0.0, column] = np.nan
    return result


def _column_to_float(values: pd.Series, source: str, column: str) -> np.ndarray:
    """Parse one column to float64 with NaN for missing; UserError on the first bad cell."""
    if pd.api.types.is_numeric_dtype(values):
        parsed = values.to_numpy(dtype=np.float64, na_value=np.nan)
        is_missing = np.isnan(parsed)
        shown_text = values.astype(str)
    else:
        is_null = values.isna().to_numpy()
        shown_text = values.where(~is_null, "").astype(str).str.strip()
        is_missing = is_null | shown_text.isin(MISSING_TOKENS).to_numpy()
        parsed = pd.to_numeric(shown_text.mask(is_missing), errors="coerce").to_numpy(
            dtype=np.float64
        )
    # Infinity parses as a float but is never a usable measurement.
    is_bad = ~is_missing & ~np.isfinite(parsed)
    if is_bad.any():
        first_bad = int(np.flatnonzero(is_bad)[0])
        raise UserError(
            f"{source}: column '{_shown(column)}' is not numeric "
            f"(row {first_bad + 1} has '{_shown(shown_text.iloc[first_bad])}'); "
            "give numbers, or leave the cell empty for missing"
        )
    parsed = parsed.copy()
    parsed[is_missing] = np.nan
    return parsed


def binary_labels(
    values: pd.Series, positive_label: str, source: str, column: str
) -> np.ndarray:
    """int64 labels: 1 where the value equals `positive_label`, 0 for every other value.

    Values are compared as stripped strings, and also as numbers when both sides parse
    as numbers (so "1.0" matches "1"). Any number of distinct values is allowed: all
    values other than the positive one are class 0. Missing labels are a UserError, and
    so is a positive label that never occurs (usually a typo in the configuration).
    """
    is_positive = label_matches(values, positive_label, source, column)
    if not is_positive.any():
        raise UserError(
            f"{source}: label column '{_shown(column)}' has no value equal to the positive "
            f"label '{_shown(str(positive_label).strip())}' (values seen: {_distinct_values(_label_text(values))})"
        )
    return is_positive.astype(np.int64)


def label_matches(values: pd.Series, label: str, source: str, column: str) -> np.ndarray:
    """Boolean per row: the value equals `label` (as text, or as a number). Missing -> UserError."""
    label_text = str(label).strip()
    text = _label_text(values)
    is_missing = text.isin(MISSING_TOKENS).to_numpy()
    if is_missing.any():
        first_missing = int(np.flatnonzero(is_missing)[0])
        raise UserError(
            f"{source}: label column '{_shown(column)}' is empty at row {first_missing + 1}; "
            "every row needs a label (drop the row or fill in the label)"
        )
    matches = (text == label_text).to_numpy()
    label_number = _as_number(label_text)
    if label_number is not None:
        numbers = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
        matches |= numbers == label_number
    return matches


def _label_text(values: pd.Series) -> pd.Series:
    text = pd.Series(values).reset_index(drop=True)
    return text.where(~text.isna(), "").astype(str).str.strip()


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _distinct_values(text: pd.Series) -> str:
    """The distinct values, sorted (numerically when all are numbers), abbreviated."""
    distinct = list(pd.unique(text))
    numbers = [_as_number(value) for value in distinct]
    if all(number is not None for number in numbers):
        distinct = [value for _, value in sorted(zip(numbers, distinct))]
    else:
        distinct = sorted(distinct)
    shown = [_shown(value) for value in distinct[:_MAX_SHOWN_VALUES]]
    if len(distinct) > _MAX_SHOWN_VALUES:
        shown.append(f"... {len(distinct) - _MAX_SHOWN_VALUES} more")
    return ", ".join(shown)


def _shown(value: object) -> str:
    """A value as it may appear inside a one-line error message."""
    return _one_line(str(value), limit=_MAX_SHOWN_CHARS)


def _one_line(text: str, limit: int) -> str:
    """Collapse line breaks and runs of whitespace, and shorten to `limit` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
