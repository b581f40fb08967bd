"""Finance alignment: which customers every party holds, found by private set intersection.

Nothing here joins the parties' tables. `align` runs ECDH-PSI (`shared.psi`, the lender
initiates) between the lender and each partner on their customer IDs. Each pairwise run
orders its shared customers by normalized ID; the lender keeps those it shares with EVERY
partner and tells each partner which positions of their pairwise list are kept (one bit per
customer they share), so every party ends with ITS OWN rows of the customers all parties
hold, in one common order (`aligned`). `split_aligned` is the lender's held-out split of
those customers. A duplicate or empty ID, or an empty intersection, is a one-line
`UserError` naming the file(s).

What each party learns beyond its own rows: the lender, which of its customers each partner
holds (every pairwise intersection) and the partners' set sizes; a partner, the lender's set
size and which of the customers it shares with the lender every other partner holds too
(it must know its rows of the common set to train on them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from finance.data import LENDER, FinanceData, PartyTable
from shared.errors import UserError
from shared.partition import stratified_split
from shared.psi import NORMALIZATION, PROTOCOL, Progress, intersect

__all__ = ["Alignment", "align", "align_ids", "aligned", "split_aligned", "psi_intersect"]


@dataclass
class Alignment:
    """The PSI result: each party's rows of the customers all parties share, in one common
    order: `rows[p][k]` (in party p's table) is the same customer for every party p."""

    rows: dict[str, np.ndarray]  # party name -> its rows, lender first
    sizes: dict[str, int]  # party name -> customers it holds
    pairwise: dict[str, int]  # partner name -> customers it shares with the lender
    seconds: float
    bytes_exchanged: int

    @property
    def match_count(self) -> int:
        return len(self.rows[LENDER])

    def __len__(self) -> int:
        return self.match_count

    def match_rate(self, party: str) -> float:
        return self.match_count / self.sizes[party]

    def describe(self) -> dict:
        """For the run summary."""
        return {
            "protocol": PROTOCOL,
            "normalization": NORMALIZATION,
            "customers": dict(self.sizes),
            "match_count": self.match_count,
            "match_rate": {party: self.match_rate(party) for party in self.sizes},
            "pairwise_match_count": dict(self.pairwise),
            "seconds": self.seconds,
            "bytes_exchanged": self.bytes_exchanged,
        }


def psi_intersect(
    lender_ids: Sequence, partner_ids: Sequence, lender_source: str, partner_source: str,
    progress: Progress | None = None, partner: str = "partner",
):
    """`shared.psi.intersect` (lender = party A) whose UserErrors also name the file(s)."""
    try:
        return intersect(lender_ids, partner_ids, party_a=LENDER, party_b=partner, progress=progress)
    except UserError as error:
        message = str(error)
        if message.startswith(f"PSI: the {LENDER}'s"):
            raise UserError(f"{lender_source}: {message}") from None
        if message.startswith(f"PSI: the {partner}'s"):
            raise UserError(f"{partner_source}: {message}") from None
        raise UserError(f"{lender_source} and {partner_source}: {message}") from None


def align(data: FinanceData, progress: Progress | None = None) -> Alignment:
    """Align every party's customers by pairwise PSI with the lender (module docstring)."""
    return align_ids([(p.name, p.ids, p.source) for p in data.parties], progress)


def align_ids(parties: Sequence[tuple[str, Sequence, str]], progress: Progress | None = None) -> Alignment:
    """`align` on (name, customer IDs, source) per party, the lender first."""
    (_, lender_ids, lender_source), partners = parties[0], parties[1:]
    pairs = {
        name: psi_intersect(lender_ids, ids, lender_source, source, progress, partner=name)
        for name, ids, source in partners
    }
    common = set.intersection(*(set(result.rows_a.tolist()) for result in pairs.values()))
    if not common:
        sources = ", ".join(source for _, _, source in parties)
        raise UserError(f"{sources}: PSI: no customer is held by every party; check the ID columns ({NORMALIZATION})")
    rows, keep_bytes = {}, 0
    for name, result in pairs.items():
        keep = np.isin(result.rows_a, list(common))  # the lender's message to this partner
        keep_bytes += 0 if len(pairs) == 1 else (len(keep) + 7) // 8
        rows.setdefault(LENDER, result.rows_a[keep])
        if not np.array_equal(rows[LENDER], result.rows_a[keep]):
            raise RuntimeError("PSI: the pairwise intersections disagree on the common order")
        rows[name] = result.rows_b[keep]
    return Alignment(
        rows=rows,
        sizes={name: len(ids) for name, ids, _ in parties},
        pairwise={name: result.match_count for name, result in pairs.items()},
        seconds=sum(result.seconds for result in pairs.values()),
        bytes_exchanged=sum(result.bytes_exchanged for result in pairs.values()) + keep_bytes,
    )


def aligned(data: FinanceData, alignment: Alignment) -> list[PartyTable]:
    """Each party's OWN rows of the shared customers, in the common order (no join), lender first."""
    return [party.subset(alignment.rows[party.name]) for party in data.parties]


def split_aligned(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_positions, test_positions) over the aligned customers, stratified on the label.

    `labels` are the lender's labels of the aligned customers, in the common order
    (`aligned(...)[0].labels`). The lender draws the split and tells the partner which
    aligned positions are held out: the partner learns which shared customers are in
    the test set, nothing about their labels.
    """
    labels = np.asarray(labels, dtype=np.int64)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if min(positives, negatives) < 2:
        raise UserError(
            f"the {len(labels)} aligned customers hold {positives} defaulted and {negatives} repaid ones; "
            "a held-out split needs at least 2 of each: align more customers"
        )
    return stratified_split(labels, test_fraction, seed)
