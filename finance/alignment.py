"""Finance alignment: which customers the two parties share, found by private set intersection.

Nothing here joins the two tables. `align` runs ECDH-PSI (`shared.psi`, the lender
initiates) on the parties' customer IDs; `aligned` gives each party ITS OWN rows of the
shared customers in one common order; `split_aligned` is the lender's held-out split of
those customers. A duplicate or empty ID, or an empty intersection, is a one-line
`UserError` naming the file(s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from finance.data import LENDER, PARTNER, FinanceData, PartyTable
from shared.errors import UserError
from shared.partition import stratified_split
from shared.psi import NORMALIZATION, PROTOCOL, Progress, intersect

__all__ = ["Alignment", "align", "aligned", "split_aligned", "psi_intersect"]


@dataclass
class Alignment:
    """The PSI result: each party's rows of the shared customers, in one common order.

    `lender_rows[k]` (in the lender's table) and `partner_rows[k]` (in the partner's)
    are the same customer. Each party learns only its own shared rows and the set sizes.
    """

    lender_rows: np.ndarray
    partner_rows: np.ndarray
    match_count: int
    lender_size: int
    partner_size: int
    match_rate_lender: float  # match_count / lender_size
    match_rate_partner: float  # match_count / partner_size
    seconds: float
    bytes_exchanged: int

    def __len__(self) -> int:
        return self.match_count

    def describe(self) -> dict:
        """For the run summary."""
        return {
            "protocol": PROTOCOL,
            "normalization": NORMALIZATION,
            "lender_customers": self.lender_size,
            "partner_customers": self.partner_size,
            "match_count": self.match_count,
            "match_rate_lender": self.match_rate_lender,
            "match_rate_partner": self.match_rate_partner,
            "seconds": self.seconds,
            "bytes_exchanged": self.bytes_exchanged,
        }


def psi_intersect(
    lender_ids: Sequence, partner_ids: Sequence, lender_source: str, partner_source: str,
    progress: Progress | None = None,
):
    """`shared.psi.intersect` (lender = party A) whose UserErrors also name the file(s)."""
    try:
        return intersect(lender_ids, partner_ids, party_a=LENDER, party_b=PARTNER, progress=progress)
    except UserError as error:
        message = str(error)
        if message.startswith(f"PSI: the {LENDER}'s"):
            raise UserError(f"{lender_source}: {message}") from None
        if message.startswith(f"PSI: the {PARTNER}'s"):
            raise UserError(f"{partner_source}: {message}") from None
        raise UserError(f"{lender_source} and {partner_source}: {message}") from None


def align(data: FinanceData, progress: Progress | None = None) -> Alignment:
    """Align the two parties' customers by private set intersection (lender initiates)."""
    result = psi_intersect(data.lender.ids, data.partner.ids, data.lender.source, data.partner.source, progress)
    return Alignment(
        lender_rows=result.rows_a,
        partner_rows=result.rows_b,
        match_count=result.match_count,
        lender_size=len(data.lender),
        partner_size=len(data.partner),
        match_rate_lender=result.match_rate_a,
        match_rate_partner=result.match_rate_b,
        seconds=result.seconds,
        bytes_exchanged=result.bytes_exchanged,
    )


def aligned(data: FinanceData, alignment: Alignment) -> tuple[PartyTable, PartyTable]:
    """Each party's OWN rows of the shared customers, in the common order (no join)."""
    return data.lender.subset(alignment.lender_rows), data.partner.subset(alignment.partner_rows)


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
