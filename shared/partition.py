"""Splitting rows among simulated clients, and into train / test.

All randomness comes from `np.random.default_rng(seed)`, so the same arguments always
give the same split. Functions return sorted int64 index arrays into the original rows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from shared.errors import UserError

# Dirichlet draws are repeated until every client is large enough; this bounds the
# retries so an infeasible request fails (in under a second) instead of looping forever.
# Strong skew needs many draws: 569 binary rows, 10 clients, alpha 0.1, min_size 10
# succeed in about 1 draw in 3000, so 1000 attempts would usually give up too early.
_MAX_DIRICHLET_ATTEMPTS = 10_000


def iid_partition(n_rows: int, n_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle the rows and deal them into `n_clients` parts whose sizes differ by <= 1."""
    _check_client_count(n_clients)
    _require_enough_rows(n_rows, n_clients, min_size=1)
    shuffled = np.random.default_rng(seed).permutation(n_rows)
    return [np.sort(part).astype(np.int64) for part in np.array_split(shuffled, n_clients)]


def quantity_weights(n_clients: int, sigma: float, seed: int) -> np.ndarray:
    """Client size shares drawn from log-normal(0, sigma), summing to 1.

    sigma = 0 gives equal shares; larger sigma gives more unequal client sizes.
    """
    _check_client_count(n_clients)
    return _lognormal_shares(n_clients, sigma, np.random.default_rng(seed))


def _lognormal_shares(n_clients: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return np.full(n_clients, 1.0 / n_clients)
    draws = rng.lognormal(mean=0.0, sigma=sigma, size=n_clients)
    return draws / draws.sum()


def quantity_skew_partition(
    n_rows: int, n_clients: int, sigma: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """IID rows but unequal client sizes: shares from `quantity_weights`, each >= min_size.

    Every client first gets `min_size` rows; the remaining rows are shared out in
    proportion to the log-normal weights.
    """
    _check_client_count(n_clients)
    _require_enough_rows(n_rows, n_clients, min_size)
    rng = np.random.default_rng(seed)
    shares = _lognormal_shares(n_clients, sigma, rng)
    sizes = min_size + _apportion(n_rows - n_clients * min_size, shares)
    shuffled = rng.permutation(n_rows)
    parts = np.split(shuffled, np.cumsum(sizes)[:-1])
    return [np.sort(part).astype(np.int64) for part in parts]


def _apportion(total: int, shares: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `shares` (largest remainder)."""
    exact = total * shares / shares.sum()
    counts = np.floor(exact).astype(np.int64)
    shortfall = total - int(counts.sum())
    # Stable sort so ties go to the lower client index, keeping the result deterministic.
    by_remainder = np.argsort(-(exact - counts), kind="stable")
    counts[by_remainder[:shortfall]] += 1
    return counts


def dirichlet_label_partition(
    labels: np.ndarray,
    n_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    size_weights: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Label-skewed split as in Hsu et al. 2019 and NIID-Bench (Li et al. 2022).

    For each class, client proportions are drawn from Dirichlet(alpha) (small alpha =
    strong skew), multiplied by `size_weights` (to add quantity skew) and renormalised,
    and that class's rows are cut accordingly. Whole draws are repeated until every
    client has at least `min_size` rows. As in NIID-Bench, a client that already holds
    its share of all rows receives nothing from later classes, which keeps sizes near
    the intended shares and makes the minimum size reachable.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    _check_client_count(n_clients)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    weights = _check_size_weights(size_weights, n_clients)
    n_rows = len(labels)
    _require_enough_rows(n_rows, n_clients, min_size)

    rng = np.random.default_rng(seed)
    rows_by_class = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    capacities = n_rows * weights
    for _ in range(_MAX_DIRICHLET_ATTEMPTS):
        parts = _one_dirichlet_draw(rows_by_class, alpha, weights, capacities, rng)
        if min(len(part) for part in parts) >= min_size:
            return [np.sort(part).astype(np.int64) for part in parts]
    raise UserError(
        f"could not give each of n_clients={n_clients} clients at least min_size={min_size} "
        f"rows with Dirichlet alpha={alpha} in {_MAX_DIRICHLET_ATTEMPTS} attempts; "
        "raise alpha, or lower n_clients or min_size"
    )


def _one_dirichlet_draw(
    rows_by_class: list[np.ndarray],
    alpha: float,
    weights: np.ndarray,
    capacities: np.ndarray,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    n_clients = len(weights)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    sizes = np.zeros(n_clients)
    for class_rows in rows_by_class:
        shuffled = rng.permutation(class_rows)
        proportions = rng.dirichlet(np.full(n_clients, alpha)) * weights
        open_proportions = proportions * (sizes < capacities)
        # With a tiny alpha every open client can draw exactly 0; fall back to all clients.
        if open_proportions.sum() > 0:
            proportions = open_proportions
        if proportions.sum() == 0:
            proportions = weights.copy()
        proportions = proportions / proportions.sum()
        cuts = (np.cumsum(proportions) * len(shuffled)).astype(np.int64)[:-1]
        for client, piece in enumerate(np.split(shuffled, cuts)):
            parts[client].append(piece)
            sizes[client] += len(piece)
    return [np.concatenate(pieces) for pieces in parts]


def _check_size_weights(size_weights: np.ndarray | None, n_clients: int) -> np.ndarray:
    """Validated weights normalised to sum 1 (equal weights when None)."""
    if size_weights is None:
        return np.full(n_clients, 1.0 / n_clients)
    weights = np.asarray(size_weights, dtype=np.float64)
    if weights.shape != (n_clients,):
        raise ValueError(f"size_weights must have shape ({n_clients},), got {weights.shape}")
    if not (np.all(np.isfinite(weights)) and np.all(weights >= 0) and weights.sum() > 0):
        raise ValueError("size_weights must be finite, non-negative and not all zero")
    return weights / weights.sum()


def natural_partition(keys: Sequence | pd.Series) -> dict[str, np.ndarray]:
    """Row positions grouped by key (e.g. a site column).

    Keys become strings and appear in order of first appearance.
    """
    as_text = pd.Series(keys).reset_index(drop=True).astype(str)
    codes, names = pd.factorize(as_text, sort=False)
    return {
        str(name): np.flatnonzero(codes == code).astype(np.int64)
        for code, name in enumerate(names)
    }


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx), sorted, with each class split in `test_fraction`.

    Per class, round(test_fraction * count) rows go to test, adjusted so that train keeps
    at least one row of every class, and test gets one whenever the class has two rows.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    train_parts, test_parts = [], []
    for value in np.unique(labels):
        class_rows = rng.permutation(np.flatnonzero(labels == value))
        n_test = _test_count(len(class_rows), test_fraction)
        test_parts.append(class_rows[:n_test])
        train_parts.append(class_rows[n_test:])
    return _sorted_union(train_parts), _sorted_union(test_parts)


def _test_count(class_size: int, test_fraction: float) -> int:
    if class_size < 2:
        return 0  # a lone row must stay in train, or the class is unlearnable
    return min(max(round(test_fraction * class_size), 1), class_size - 1)


def _sorted_union(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(parts)).astype(np.int64)


def _check_client_count(n_clients: int) -> None:
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")


def _require_enough_rows(n_rows: int, n_clients: int, min_size: int) -> None:
    if n_rows < 0 or min_size < 0:
        raise ValueError(f"n_rows and min_size must be >= 0, got {n_rows} and {min_size}")
    if n_rows < n_clients * min_size:
        raise UserError(
            f"cannot give each of n_clients={n_clients} clients at least min_size={min_size} "
            f"rows from {n_rows} rows; use fewer clients (at most {n_rows // max(min_size, 1)}) "
            "or a smaller min_size"
        )
