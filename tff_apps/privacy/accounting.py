"""ε of the mechanisms as run: dp_accounting's RDP and PLD accountants over their events.

Two levels (`privacy.level`):

client  DP-FedAvg (McMahan et al. 2018): each sampled client's model update is clipped to
        L2 norm C, the server adds N(0, (z*C)^2) to the sum and divides by the FIXED
        `clients_per_round` m (TFF's `DifferentiallyPrivateFactory`, see
        `client_dp_aggregator`). Clipping "fixed" uses C = `clip_norm`; "adaptive" (Andrew
        et al. 2021) starts at `clip_norm` and moves C toward the `target_quantile` of the
        update norms, spending part of the noise on a noisy count of unclipped clients.
record  DP-SGD (Abadi et al. 2016) at every client (`tff_apps/learning/dp_sgd.py`): per local step
        each record is Poisson-sampled with q = batch_size / rows, per-example gradients are
        clipped to C, summed, N(0, (z*C)^2) is added and the sum divided by q*rows.

How ε is accounted (dp-accounting 0.4.3, read from its installed source)
------------------------------------------------------------------------
* The events are built from the mechanism as run: the noise multiplier actually passed to
  TFF / DP-SGD, the sampling the program really performs, the rounds and local steps. TFF
  0.87 does report a per-round event in the DP aggregator's state
  (`extract_dp_event_from_state`; `mechanism_event_from_state` below reads it), but that
  event knows nothing of client sampling or rounds, so the composed event is built here
  from the resolved config and the sampling, with the per-round mechanism event equal to
  the one TFF reports (tests/tff_apps/privacy/test_accounting.py checks they agree).
* Client level, sampling. `tff_apps.program.round_loop.sample_clients` draws a FIXED-size subset of m
  of n clients without replacement. The event is
  `SelfComposed(SampledWithoutReplacement(n, m, Gaussian(z/2)), rounds)`. dp-accounting
  accounts fixed-size sampling only with the RDP accountant and only under the
  REPLACE_ONE neighbouring relation (Wang, Balle & Kasiviswanathan 2019, Thm 27): the
  guarantee is for replacing one client's entire data by any other, the number of
  clients being public. Under replacement the L2 sensitivity of a sum of C-clipped
  updates is 2C, not C, so the noise multiplier relative to the sensitivity is z/2
  (`_compute_rdp_sample_wor_gaussian` takes "std / l2-sensitivity"). Using Gaussian(z)
  there, as one might read `GaussianDpEvent`'s "std / C", would understate ε.
* Client level, every client every round (`clients_per_round` 0 or >= n): no
  amplification, `SelfComposed(Gaussian(z/2), rounds)`, same relation, so ε is monotone in
  m and both client-level cases mean the same thing.
* PLD: dp-accounting 0.4.3's `PLDAccountant` supports Gaussian, Laplace and Poisson
  sampling only; it has no sampling-without-replacement event. `accountant = "pld"` is
  therefore refused (UserError) for client level with sampling; with every client every
  round it is exact Gaussian PLD accounting. Poisson client sampling would be a different
  mechanism from the one the program runs and is not substituted.
* Adaptive clipping. TFF's `gaussian_adaptive(noise_multiplier=z, ...)` treats z as the
  TOTAL noise multiplier: it raises the value noise to z_v = (z^-2 - (2s)^-2)^-1/2 and adds
  N(0, s^2) to the count of unclipped clients (records +-0.5, sensitivity 0.5 ->
  GaussianDpEvent(2s)). The per-round event is Composed([Gaussian(z_v), Gaussian(2s)]),
  whose effective noise multiplier (z_v^-2 + (2s)^-2)^-1/2 is exactly z: the accounted z
  bounds value AND clip estimate together. TFF's default s = 0.05*m is infeasible for
  small cohorts (it needs z < 0.1*m); we pass s = max(0.05*m, z/1.2), which keeps
  z_v <= 1.25*z (`adaptive_noise_split`).
* Record level. Per client k: `SelfComposed(PoissonSampled(q_k, Gaussian(z)), steps_k *
  rounds_k)`, add/remove-one-record relation, q_k = min(1, batch_size / rows_k), rows_k
  treated as public (as in every DP-SGD implementation). Each client accounts its own
  records; the job's ε is the max over clients. Client sampling is not credited
  (conservative); rounds_k counts the rounds client k actually took part in.
* RDP (default orders) and PLD (`PLDAccountant`, default discretization) are
  dp-accounting's own accountants. Compositions mixing relations (the lifetime ledger may
  hold client- and record-level runs on the same data) are composed in RDP by adding each
  event's RDP curve, each computed under its own relation: a client-level bound also
  bounds any change of one record inside that client, so the sum bounds the record-level
  loss. For a single relation this is exactly the accountant's ComposedDpEvent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting import dp_event as dpe
from dp_accounting.rdp import rdp_privacy_accountant

from shared.errors import UserError
from tff_apps.privacy.dp_config import ACCOUNTANTS, ClientSampling, Sampling
from tff_apps.privacy.dp_events import Spend, normalize_event, round_spend

RDP_ORDERS = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=np.float64)


class Composition:
    """Spends composed one after another; ε at any δ. Record-level spends compose per client
    (and with every client-level spend); the ε reported is the max over clients.

    RDP adds the accountant's RDP curves (`rdp_curve`). PLD composes privacy loss
    distributions built exactly as `PLDAccountant._maybe_compose` builds them (same
    constructors, same discretization), but caches each mechanism's PLD so that ε after
    every round does not rebuild them; tests check it equals `PLDAccountant`.
    """

    def __init__(self, accountant: str = "rdp"):
        if accountant not in ACCOUNTANTS:
            raise UserError(f"privacy.accountant = {accountant!r} is not allowed; choose one of 'rdp', 'pld'")
        self.accountant = accountant
        self._shared: list[tuple[dpe.DpEvent, int]] = []
        self._clients: dict[str, Any] = {}  # name -> RDP curve or PLD state
        self._shared_state = self._zero()

    def _zero(self):
        return np.zeros_like(RDP_ORDERS) if self.accountant == "rdp" else _PldState()

    def _plus(self, state, event: dpe.DpEvent, count: int):
        if self.accountant == "rdp":
            return state + count * rdp_curve(event)
        return state.compose(event, count)

    def add(self, spend: Spend, count: int = 1) -> "Composition":
        if count <= 0:
            return self
        if isinstance(spend, Mapping):
            for name, event in spend.items():
                if name not in self._clients:
                    self._clients[name] = self._shared_state
                self._clients[name] = self._plus(self._clients[name], normalize_event(event), count)
        else:
            event = normalize_event(spend)
            self._shared.append((event, count))
            self._shared_state = self._plus(self._shared_state, event, count)
            for name in self._clients:
                self._clients[name] = self._plus(self._clients[name], event, count)
        return self

    @property
    def empty(self) -> bool:
        return not self._shared and not self._clients

    def _epsilon_of(self, state, delta: float) -> float:
        if self.accountant == "rdp":
            return _rdp_epsilon(state, delta)
        return state.epsilon(delta)

    def epsilon(self, delta: float) -> float:
        if self.empty:
            return 0.0
        states = list(self._clients.values()) or [self._shared_state]
        return max(self._epsilon_of(state, delta) for state in states)

    def epsilon_by_client(self, delta: float) -> dict[str, float]:
        """Record level: each client's own ε (client-level spends included)."""
        return {name: self._epsilon_of(state, delta) for name, state in self._clients.items()}


class _PldState:
    """An immutable PLD composition, mirroring dp-accounting 0.4.3's PLDAccountant."""

    def __init__(self, pld=None, non_private: bool = False):
        self.pld = pld
        self.non_private = non_private

    def compose(self, event: dpe.DpEvent, count: int) -> "_PldState":
        if _contains(event, dpe.SampledWithoutReplacementDpEvent):
            raise UserError(
                "privacy.accountant = 'pld': dp-accounting 0.4.3's PLD accountant cannot account "
                "fixed-size client sampling (train.clients_per_round < number of clients); "
                "use privacy.accountant = 'rdp' or train.clients_per_round = 0"
            )
        state = self
        for part, part_count in _flatten(event, count):
            if part is None:
                state = _PldState(state.pld, True)
            else:
                piece = _pld_of(part, part_count)
                state = _PldState(piece if state.pld is None else state.pld.compose(piece), state.non_private)
        return state

    def epsilon(self, delta: float) -> float:
        if self.non_private:
            return math.inf
        if self.pld is None:
            return 0.0
        return float(self.pld.get_epsilon_for_delta(delta))


def _flatten(event: dpe.DpEvent, count: int):
    """(mechanism, count) pairs in the order PLDAccountant composes them; (None, count) for a
    non-private part (ε = inf)."""
    if isinstance(event, dpe.NoOpDpEvent):
        return
    if isinstance(event, dpe.SelfComposedDpEvent):
        yield from _flatten(event.event, count * event.count)
    elif isinstance(event, dpe.ComposedDpEvent):
        for e in event.events:
            yield from _flatten(e, count)
    elif isinstance(event, dpe.NonPrivateDpEvent):
        yield None, count
    elif isinstance(event, dpe.GaussianDpEvent):
        yield (None if event.noise_multiplier == 0 else event), count
    elif isinstance(event, dpe.PoissonSampledDpEvent) and isinstance(event.event, dpe.GaussianDpEvent):
        if event.sampling_probability > 0:
            yield (None if event.event.noise_multiplier == 0 else event), count
    else:
        raise ValueError(f"the PLD accountant cannot account {event}")


_PLD_CACHE: dict[tuple, Any] = {}
PLD_DISCRETIZATION = 1e-4  # PLDAccountant's default value_discretization_interval


def _pld_of(event: dpe.DpEvent, count: int):
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    if isinstance(event, dpe.GaussianDpEvent):
        # PLDAccountant: `count` Gaussians compose exactly into one with std z / sqrt(count).
        key = ("gaussian", event.noise_multiplier, count)
        if key not in _PLD_CACHE:
            if len(_PLD_CACHE) >= 256:
                _PLD_CACHE.clear()
            _PLD_CACHE[key] = pld_lib.from_gaussian_mechanism(
                standard_deviation=event.noise_multiplier / math.sqrt(count),
                value_discretization_interval=PLD_DISCRETIZATION,
            )
        return _PLD_CACHE[key]
    key = ("poisson_gaussian", event.event.noise_multiplier, event.sampling_probability)
    if key not in _PLD_CACHE:
        if len(_PLD_CACHE) >= 256:
            _PLD_CACHE.clear()
        _PLD_CACHE[key] = pld_lib.from_gaussian_mechanism(
            standard_deviation=event.event.noise_multiplier,
            value_discretization_interval=PLD_DISCRETIZATION,
            sampling_prob=event.sampling_probability,
        )
    return _PLD_CACHE[key].self_compose(count)


def epsilon(spend: Spend, delta: float, accountant: str = "rdp") -> float:
    """ε at δ of one spend (a record-level spend: the max over clients)."""
    return Composition(accountant).add(spend).epsilon(delta)


def composed_epsilon(spends: Sequence[Spend], delta: float, accountant: str = "rdp") -> float:
    """ε at δ of the composition of several spends (e.g. every run on one data source)."""
    composition = Composition(accountant)
    for spend in spends:
        composition.add(spend)
    return composition.epsilon(delta)


def rdp_curve(event: dpe.DpEvent) -> np.ndarray:
    """RDP of `event` at `RDP_ORDERS`; each sampling event under the neighbouring relation
    dp-accounting accounts it with (see the module docstring)."""
    event = normalize_event(event)
    if isinstance(event, dpe.ComposedDpEvent):
        return sum((rdp_curve(e) for e in event.events), np.zeros_like(RDP_ORDERS))
    if isinstance(event, dpe.SelfComposedDpEvent):
        return event.count * rdp_curve(event.event)
    if _has_zero_noise(event):
        return np.full_like(RDP_ORDERS, np.inf)
    key = repr(event)
    curve = _RDP_CACHE.get(key)
    if curve is None:
        curve = _rdp_of_leaf(event)
        curve.setflags(write=False)
        if len(_RDP_CACHE) >= 4096:
            _RDP_CACHE.clear()
        _RDP_CACHE[key] = curve
    return curve


_RDP_CACHE: dict[str, np.ndarray] = {}


def _rdp_of_leaf(event: dpe.DpEvent) -> np.ndarray:
    relation = (
        dp_accounting.NeighboringRelation.REPLACE_ONE
        if isinstance(event, dpe.SampledWithoutReplacementDpEvent)
        else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    acc = rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS), relation)
    if not acc.supports(event):
        raise ValueError(f"the RDP accountant cannot account {event}")
    acc.compose(event)
    return acc.rdp


def _has_zero_noise(event: dpe.DpEvent) -> bool:
    if isinstance(event, (dpe.GaussianDpEvent, dpe.LaplaceDpEvent)):
        return float(event.noise_multiplier) == 0.0
    if isinstance(event, dpe.NonPrivateDpEvent):
        return True
    inner = [getattr(event, "event", None), *getattr(event, "events", [])]
    return any(_has_zero_noise(e) for e in inner if e is not None)


def _rdp_epsilon(curve: np.ndarray, delta: float) -> float:
    if not np.all(np.isfinite(curve)):
        return math.inf
    return float(rdp_privacy_accountant.compute_epsilon(RDP_ORDERS, curve, delta)[0])


def _contains(event: dpe.DpEvent, kind: type) -> bool:
    if isinstance(event, kind):
        return True
    inner = [getattr(event, "event", None), *getattr(event, "events", [])]
    return any(_contains(e, kind) for e in inner if e is not None)


def check_accountant(accountant: str, sampling: Sampling) -> None:
    """Refuses an accountant that cannot account this sampling (before any training)."""
    if accountant == "pld" and isinstance(sampling, ClientSampling) and sampling.samples:
        raise UserError(
            f"privacy.accountant = 'pld' cannot account fixed-size client sampling "
            f"(train.clients_per_round = {sampling.participants} of {sampling.n_clients} clients) "
            "in dp-accounting 0.4.3; use privacy.accountant = 'rdp' or train.clients_per_round = 0"
        )


def epsilon_after_round(
    noise_multiplier: float,
    delta: float,
    rounds: int,
    sampling: Sampling,
    accountant: str = "rdp",
    clipping: str = "fixed",
    prefix: Spend | None = None,
) -> list[float]:
    """ε after each of rounds 1..`rounds` (every client taking part each round), after the
    `prefix` spend (the DP data statistics) if any."""
    check_accountant(accountant, sampling)
    composition = Composition(accountant)
    if prefix is not None:
        composition.add(prefix)
    spend = round_spend(noise_multiplier, sampling, clipping)
    result = []
    for _ in range(int(rounds)):
        result.append(composition.add(spend).epsilon(delta))
    return result


def epsilon_for_rounds(
    noise_multiplier: float,
    delta: float,
    rounds: int,
    sampling: Sampling,
    accountant: str = "rdp",
    clipping: str = "fixed",
    prefix: Spend | None = None,
) -> float:
    check_accountant(accountant, sampling)
    composition = Composition(accountant)
    if prefix is not None:
        composition.add(prefix)
    return composition.add(round_spend(noise_multiplier, sampling, clipping), int(rounds)).epsilon(delta)
