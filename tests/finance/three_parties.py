"""Three parties' small CSVs in FATE's hetero layout (guest `id,y,x0,...`; hosts `id,x0,...`), with
column names the parties share, for the tests of finance across sites. Unlike `party_csvs.fate_csvs`
(integer IDs, numeric columns): text IDs that the parties spell differently (PSI normalizes them),
a categorical column at the lender, and column names no other party has ("grade", "income",
"tenure") so that a test can look for them where they must not be."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

LENDER_COLUMNS = ["x0", "x1", "x2", "grade"]  # "grade" is text: inferred categorical
PARTNER_COLUMNS = {"partner": ["x0", "x1", "income"], "partner2": ["x0", "tenure"]}


def write_party_csvs(folder: Path, customers: int = 320, seed: int = 0) -> Path:
    """lender.csv, partner.csv, partner2.csv (each party holds most customers, in its own
    order, IDs spelled as its system spells them) and job.toml naming them; returns job.toml."""
    rng = np.random.default_rng(seed)
    ids = [f"C{i:05d}" for i in range(customers)]
    x = rng.normal(size=(customers, 8))
    logit = x @ np.array([1.0, -0.6, 0.4, 0.0, 0.9, 0.5, -0.7, 0.6])
    y = (rng.random(customers) < 1 / (1 + np.exp(-logit))).astype(int)
    lender = pd.DataFrame({"id": ids, "y": y, "x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2],
                           "grade": np.where(x[:, 3] > 0, "A", "B")})
    partner = pd.DataFrame({"id": [i.lower() for i in ids], "x0": x[:, 4], "x1": x[:, 5], "income": x[:, 6]})
    partner2 = pd.DataFrame({"id": ids, "x0": x[:, 7], "tenure": rng.normal(size=customers)})
    holds = {"lender": lender.iloc[: customers - 20], "partner": partner.iloc[10:], "partner2": partner2.iloc[5:]}
    for name, table in holds.items():
        table.sample(frac=1.0, random_state=seed).to_csv(folder / f"{name}.csv", index=False)
    job = folder / "job.toml"
    job.write_text('[data]\nsource = "csv"\nlabel_column = "y"\n'
                   + "".join(f'[data.parties.{name}]\ncsv = "{folder / name}.csv"\n' for name in holds))
    return job
