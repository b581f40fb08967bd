"""Finds raw client rows in released files: a run's export/ and its report (report.md,
report.html, plots/). A row counts as found in a file when `min_values` of its distinctive
values (non-integers, which a metric or a count rarely equals) appear there: in text files
as printed numbers, in binary files (SavedModel, variables, weights.npz, PNG) as float32 or
float64 bytes at any offset."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = {".json", ".md", ".html", ".txt", ".toml", ".csv", ".jsonl"}
NUMBER = re.compile(rb"-?\d+\.\d+(?:[eE][-+]?\d+)?")


def released_files(run_dir: Path) -> list[Path]:
    files = [p for p in (run_dir / "export").rglob("*") if p.is_file()]
    files += [run_dir / "report.md", run_dir / "report.html"]
    files += [p for p in (run_dir / "plots").rglob("*") if p.is_file()]
    return [p for p in files if p.exists()]


def numbers_in(path: Path) -> np.ndarray:
    """Every number the file holds: printed ones, or every 4- and 8-byte window as a float."""
    data = path.read_bytes()
    if path.suffix in TEXT_SUFFIXES:
        return np.array([float(m) for m in NUMBER.findall(data)], dtype=np.float64)
    found = []
    with np.errstate(all="ignore"):  # arbitrary bytes: NaNs, infinities, signalling NaNs
        for width, dtype in ((4, "<f4"), (8, "<f8")):
            for offset in range(width):
                usable = (len(data) - offset) // width * width
                found.append(np.frombuffer(data, dtype=dtype, count=usable // width, offset=offset).astype(np.float64))
    values = np.concatenate(found)
    return values[np.isfinite(values) & (np.abs(values) < 3e38)]


def rows_found(rows: np.ndarray, path: Path, min_values: int = 5) -> list[int]:
    """Indexes of the rows of `rows` (raw values, NaN = missing) found in `path`."""
    numbers = numbers_in(path)
    if not len(numbers):
        return []
    # a printed number may be rounded: compare at float32 precision, relative 1e-6
    pool = np.unique(np.float32(numbers))
    if len(pool) < 2:
        pool = np.r_[pool, np.float32(np.inf)]
    found = []
    for index, row in enumerate(rows):
        values = np.unique(np.float32(row[np.isfinite(row) & (row != np.round(row))]))
        if len(values) < min_values:
            continue
        position = np.clip(np.searchsorted(pool, values), 1, len(pool) - 1)
        nearest = np.minimum(np.abs(pool[position] - values), np.abs(pool[position - 1] - values))
        if np.sum(nearest <= 1e-6 * np.abs(values)) >= min_values:
            found.append(index)
    return found
