"""One party's table: its own customer IDs, raw feature columns and (at the lender) labels."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["PartyTable"]


@dataclass
class PartyTable:
    """One party's rows: its own customer IDs, raw feature columns and (lender) labels."""

    name: str  # LENDER or a partner's name
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
