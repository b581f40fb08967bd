"""Two small party CSVs in FATE's vertical layout (an ID column per party, the label at the
lender), written into a test's folder: the finance data and alignment tests share them."""

from __future__ import annotations

from pathlib import Path

from finance.data import DataConfig

LENDER_CSV = "id,age,region,default\nA1,30,north,0\nA2,45,south,1\nA3,28,north,0\nA4,52,east,1\nA5,33,south,0\n"
PARTNER_CSV = "id,balance,score\n a2 ,100.5,7\nA1,20,3\nA5,,5\nZ9,7,1\nA3,3.5,2\n"


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def csv_config(tmp_path: Path, lender: str = LENDER_CSV, partner: str = PARTNER_CSV, **kw) -> DataConfig:
    return DataConfig(
        source="csv",
        lender_csv=write(tmp_path / "lender.csv", lender),
        partner_csv=write(tmp_path / "partner.csv", partner),
        label_column=kw.pop("label_column", "default"),
        **kw,
    )
