"""Small party CSVs in FATE's vertical layout (an ID column per party, the label at the
lender), written into a test's folder: the finance data, alignment and parties tests share them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from finance.data import DataConfig

LENDER_CSV = "id,age,region,default\nA1,30,north,0\nA2,45,south,1\nA3,28,north,0\nA4,52,east,1\nA5,33,south,0\n"
PARTNER_CSV = "id,balance,score\n a2 ,100.5,7\nA1,20,3\nA5,,5\nZ9,7,1\nA3,3.5,2\n"


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def csv_config(tmp_path: Path, lender: str = LENDER_CSV, partner: str = PARTNER_CSV, **kw) -> DataConfig:
    """The two-party shorthand keys over the two files (a key in `kw` overrides)."""
    files = {
        "lender_csv": write(tmp_path / "lender.csv", lender),
        "partner_csv": write(tmp_path / "partner.csv", partner),
        "label_column": "default",
    }
    return DataConfig(source="csv", **{**files, **kw})


def fate_csvs(
    folder: Path, customers: int = 300, shared: int = 240, seed: int = 0, hosts: tuple = (None,),
) -> list[Path]:
    """FATE's hetero example layout: the guest (lender) `id,y,x0,...,x12` and one host
    (partner) file per entry of `hosts`: `id,x0,...,x9` for None (the same names at every
    party), else `id` and the names given; integer IDs. Every party holds `customers` rows,
    `shared` of them common to all (the rest under IDs of their own); the label depends on
    three columns of every party. Files: guest.csv, host.csv, host2.csv, ..."""
    rng = np.random.default_rng(seed)
    names = [list(h) if h is not None else [f"x{i}" for i in range(10)] for h in hosts]
    guest_x = rng.normal(size=(customers, 13))
    host_x = [rng.normal(size=(customers, len(columns))) for columns in names]
    logit = guest_x[:, :3] @ [1.0, -1.0, 0.5] + sum(x[:, :3] @ [1.2, -0.8, 0.6] for x in host_x)
    y = (rng.random(customers) < 1 / (1 + np.exp(-logit))).astype(int)
    numbers = rng.permutation(10**5)[: customers + len(hosts) * (customers - shared)]
    guest = pd.DataFrame(guest_x.round(6), columns=[f"x{i}" for i in range(13)])
    guest.insert(0, "y", y)
    guest.insert(0, "id", numbers[:customers])
    paths = [_shuffled(guest, folder / "guest.csv", rng)]
    for h, (x, columns) in enumerate(zip(host_x, names)):
        ids = numbers[:customers].copy()  # the first `shared` customers are everyone's
        ids[shared:] = numbers[customers + h * (customers - shared) : customers + (h + 1) * (customers - shared)]
        host = pd.DataFrame(x.round(6), columns=columns)
        host.insert(0, "id", ids)
        paths.append(_shuffled(host, folder / ("host.csv" if h == 0 else f"host{h + 1}.csv"), rng))
    return paths


def _shuffled(frame: pd.DataFrame, path: Path, rng: np.random.Generator) -> Path:
    frame.iloc[rng.permutation(len(frame))].to_csv(path, index=False)
    return path
