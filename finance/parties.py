"""Finance csv source: who holds which file and columns, configured and checked per party.

In vertical FL a party's columns are its own: two parties may both call a column `x0`, and
the lender never needs to know what a partner's columns are called (FATE's example hetero
CSVs are laid out so: guest `id,y,x0,...`, host `id,x0,...`). So each party's column
selection and categorical columns are configured for that party alone:

```toml
[data.parties.lender]      # the active party: its file holds data.label_column
csv = "guest.csv"
columns = ["x0", "x1"]     # optional; empty = every column but the ID and the label
categorical = []           # optional; empty = inferred (a non-numeric column is categorical)
[data.parties.partner]     # every other table is a partner (FATE's hosts), in file order
csv = "host.csv"
```

The flat keys `data.lender_csv`, `data.partner_csv`, `data.lender_columns` and
`data.partner_columns` are the two-party shorthand for the `lender` and `partner` tables;
`data.categorical_columns` marks, at every party, those of ITS OWN columns it names.

`party_specs` turns the config into one `PartySpec` per party (lender first); `load_party`
is what one party runs on its own file: its checks read only that party's file and spec,
and every error is one line naming the party and the column.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finance.tables import PartyTable
from finance.csv_columns import column_listing, lender_labels, parse_names, party_features, require_id_column
from shared.errors import UserError
from shared.tabular import read_csv

__all__ = ["LENDER", "PARTNER", "PartySpec", "party_spec", "party_specs", "load_party", "check_shared_categorical", "party_view"]

LENDER = "lender"  # the active party (labels); also its PSI and servable name
PARTNER = "partner"  # the partner of the two-party shorthand keys
PARTY_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # names folders and servables: finance_<party>
PARTY_KEYS = ("csv", "columns", "categorical")


@dataclass(frozen=True)
class PartySpec:
    """One party's part of the [data] config: its file and its own column choices."""

    name: str
    csv: str
    columns: tuple[str, ...]  # empty = every column but the ID (and, at the lender, the label)
    categorical: tuple[str, ...]  # empty = inferred
    key: str  # where the party is configured, for messages: "data.parties.partner" or "data"
    shared_categorical: tuple[str, ...] = ()  # data.categorical_columns: names any party may hold

    @property
    def is_lender(self) -> bool:
        return self.name == LENDER

    def key_of(self, item: str) -> str:
        """The config key of `item` (csv, columns, categorical) for this party."""
        if self.key != "data":
            return f"{self.key}.{item}"
        return f"data.{self.name}_{item}" if item in ("csv", "columns") else "data.categorical_columns"


def party_specs(cfg: Any) -> list[PartySpec]:
    """The parties of a csv job (a `finance.data.DataConfig`), lender first, partners in
    the order of the config; a malformed party table is a one-line UserError naming it."""
    tables = _tables(cfg)
    if LENDER not in tables:
        raise UserError(
            "data.source = 'csv' needs the lender's table: [data.parties.lender] with csv = \"FILE\" "
            "(its file holds data.label_column), or data.lender_csv"
        )
    if len(tables) < 2:
        raise UserError("data.source = 'csv' needs at least one partner: [data.parties.partner] with csv = \"FILE\"")
    shared = tuple(parse_names(cfg.categorical_columns, "categorical_columns"))
    order = [LENDER] + [name for name in tables if name != LENDER]
    return [_spec(name, tables[name], shared) for name in order]


def party_spec(cfg: Any, name: str) -> PartySpec:
    """One party's spec alone (`site prepare` at that party: the other parties are not its to check)."""
    tables = _tables(cfg)
    if name not in tables:
        listed = ", ".join(tables) or "none"
        raise UserError(f"--site {name!r} is not a party of the config's [data.parties] (it lists {listed})")
    return _spec(name, tables[name], tuple(parse_names(cfg.categorical_columns, "categorical_columns")))


def _tables(cfg: Any) -> dict[str, dict[str, Any]]:
    tables = _shorthand_tables(cfg)
    for name, table in cfg.parties.items():
        _check_table(name, table)
        entry = tables.setdefault(name, {"key": f"data.parties.{name}"})
        for item, value in table.items():
            if item in entry:
                raise UserError(f"data.parties.{name}.{item} and the shorthand key for the {name} are both set; keep one")
            entry[item] = value
    return tables


def _shorthand_tables(cfg: Any) -> dict[str, dict[str, Any]]:
    tables: dict[str, dict[str, Any]] = {}
    for party in (LENDER, PARTNER):
        csv = getattr(cfg, f"{party}_csv").strip()
        columns = parse_names(getattr(cfg, f"{party}_columns"), f"{party}_columns")
        table = {"csv": csv} if csv else {}
        if columns:
            table["columns"] = columns
        if table:
            tables[party] = {"key": "data", **table}
    return tables


def _check_table(name: str, table: Any) -> None:
    if name == "coordinator":  # the coordinator's checkpoints sit beside the parties' (checkpoints/<party>/)
        raise UserError("data.parties.coordinator: 'coordinator' is the coordinator's name; give the party another")
    if not PARTY_NAME.match(str(name)):
        raise UserError(
            f"data.parties.{name}: a party name is lowercase letters, digits and '_', starting with a letter "
            "(it names the party's export folder)"
        )
    if not isinstance(table, dict):
        raise UserError(f"data.parties.{name} must be a table ([data.parties.{name}] with csv = \"FILE\")")
    for item, value in table.items():
        if item not in PARTY_KEYS:
            raise UserError(f"data.parties.{name}: unknown key '{item}'; a party takes {', '.join(PARTY_KEYS)}")
        if item == "csv" and not isinstance(value, str):
            raise UserError(f"data.parties.{name}.csv must be a path (a string), got {value!r}")
        if item != "csv" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise UserError(f"data.parties.{name}.{item} must be a list of column names, got {value!r}")


def _spec(name: str, table: dict[str, Any], shared: tuple[str, ...]) -> PartySpec:
    spec = PartySpec(name, str(table.get("csv", "")).strip(), (), (), table.get("key", "data"), shared)
    return dataclasses.replace(
        spec, columns=_names(table.get("columns", []), spec.key_of("columns")),
        categorical=_names(table.get("categorical", []), spec.key_of("categorical")),
    )


def _names(values, key: str) -> tuple[str, ...]:
    names = [str(v).strip() for v in values if str(v).strip()]
    repeated = [n for i, n in enumerate(names) if n in names[:i]]
    if repeated:
        raise UserError(f"{key} lists '{repeated[0]}' twice; list each column once")
    return tuple(names)


def load_party(spec: PartySpec, id_column: str, label: str, positive_label: str):
    """One party's table from its own CSV, checked at that party: a UserError names the party,
    its file and the column (and lists only this party's columns)."""
    try:
        return _load(spec, id_column, label, positive_label)
    except UserError as error:
        raise UserError(f"party '{spec.name}': {error}") from None


def _load(spec: PartySpec, id_column: str, label: str, positive_label: str):
    if not spec.csv:
        raise UserError(f"{spec.key_of('csv')} is empty; give the path of the {spec.name}'s CSV file")
    source = str(Path(spec.csv))
    df = read_csv(source)
    require_id_column(df, id_column, source)
    reserved = (id_column, label) if spec.is_lender else (id_column,)
    if spec.is_lender and label not in df.columns:
        raise UserError(
            f"{source}: the lender's label column '{label}' (data.label_column) is missing; "
            f"the file has columns {column_listing(df.columns)}"
        )
    columns = _feature_columns(spec, df, source, reserved)
    own_categorical = _categorical(spec, columns)
    infer = not (spec.categorical or spec.shared_categorical)
    features, categorical = party_features(df, columns, own_categorical, infer, source)
    labels = lender_labels(df[label], positive_label, source, label) if spec.is_lender else None
    return PartyTable(
        name=spec.name, ids=df[id_column].astype(str).to_numpy(dtype=object), features=features,
        labels=labels, categorical=categorical, source=source,
    )


def _feature_columns(spec: PartySpec, df, source: str, reserved: tuple[str, ...]) -> list[str]:
    key = spec.key_of("columns")
    for column in spec.columns:
        if column in reserved:
            what = "ID" if column == reserved[0] else "label"
            raise UserError(f"{key} includes the {what} column '{column}'; list feature columns only")
        if column not in df.columns:
            raise UserError(
                f"{source}: column '{column}' (listed in {key}) is missing; the file has columns {column_listing(df.columns)}"
            )
    columns = list(spec.columns) or [str(c) for c in df.columns if c not in reserved]
    if not columns:
        raise UserError(
            f"{source}: no feature column besides {', '.join(repr(r) for r in reserved)}; "
            f"each party needs at least one column ({key})"
        )
    return columns


def _categorical(spec: PartySpec, columns: list[str]) -> list[str]:
    unknown = [c for c in spec.categorical if c not in columns]
    if unknown:
        raise UserError(
            f"{spec.key_of('categorical')} names '{unknown[0]}', which is not one of the {spec.name}'s feature "
            f"columns ({column_listing(columns)})"
        )
    return [c for c in columns if c in spec.categorical or c in spec.shared_categorical]


def check_shared_categorical(specs: list[PartySpec], tables) -> None:
    """data.categorical_columns: every name must be some party's feature column (each party
    tells only whether it holds each listed name)."""
    for name in specs[0].shared_categorical if specs else ():
        if not any(name in table.columns for table in tables):
            raise UserError(f"data.categorical_columns names '{name}', which is no party's feature column")


def party_view(cfg, party: str):
    """The job config as `party` may see it (a `JobConfig`): every other party's column
    choices left out, and data.categorical_columns too (it may name any party's columns).
    The summary, the report and the lender's card show the lender's view; each party's
    export card its own."""
    data = cfg.data
    parties = {
        name: (dict(table) if name == party else {k: v for k, v in table.items() if k == "csv"})
        for name, table in data.parties.items()
    }
    return cfg.replace(
        "data", parties=parties, categorical_columns="",
        lender_columns=data.lender_columns if party == LENDER else "",
        partner_columns=data.partner_columns if party == PARTNER else "",
    )
