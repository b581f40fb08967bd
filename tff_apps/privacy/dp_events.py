"""dp_accounting events of the mechanisms as they run (client level, record level, adaptive
clipping), and their JSON form for checkpoints and the lifetime ledger.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Union

from dp_accounting import dp_event as dpe

from tff_apps.privacy.dp_config import ClientSampling, Sampling

# Adaptive clipping: the value noise may be at most this factor above the total z.
MAX_VALUE_NOISE_INFLATION = 1.25


# A client level run yields one event; a record level run one event per client (by name).
Spend = Union[dpe.DpEvent, Mapping[str, dpe.DpEvent]]


def adaptive_noise_split(noise_multiplier: float, clients_per_round: float) -> tuple[float, float]:
    """(value noise multiplier z_v, clipped-count stddev s) for a TOTAL noise multiplier z.

    Same formula as TFF's `adaptive_clip_noise_params` (which `gaussian_adaptive` applies
    to the s we pass), with s = max(0.05*m, z/1.2): feasible for small cohorts (TFF's
    default 0.05*m needs z < 0.1*m) and z_v <= 1.25*z.
    """
    z = float(noise_multiplier)
    if z == 0:
        return 0.0, 0.0
    floor = z / (2.0 * math.sqrt(1.0 - MAX_VALUE_NOISE_INFLATION**-2))
    stddev = max(0.05 * float(clients_per_round), floor)
    value = (z**-2 - (2.0 * stddev) ** -2) ** -0.5
    return float(value), float(stddev)


def client_mechanism_event(clipping: str, noise_multiplier: float, clients_per_round: int) -> dpe.DpEvent:
    """One round's event exactly as TFF's DP query reports it (noise relative to the clip)."""
    z = float(noise_multiplier)
    if clipping == "fixed":
        return dpe.GaussianDpEvent(z)
    if clipping == "adaptive":
        value, count_stddev = adaptive_noise_split(z, clients_per_round)
        # The count query sums +-0.5 per client: TFP reports GaussianDpEvent(stddev / 0.5).
        return dpe.ComposedDpEvent([dpe.GaussianDpEvent(value), dpe.GaussianDpEvent(2.0 * count_stddev)])
    raise ValueError(f"unknown clipping {clipping!r}")


def client_round_event(mechanism_event: dpe.DpEvent, sampling: ClientSampling) -> dpe.DpEvent:
    """A round of client-level DP under replace-one-client: noise halved (sensitivity 2C),
    wrapped in the fixed-size sampling the program performs."""
    replace_one = _scale_gaussians(normalize_event(mechanism_event), 0.5)
    if not sampling.samples:
        return replace_one
    return dpe.SampledWithoutReplacementDpEvent(sampling.n_clients, sampling.participants, replace_one)


def record_step_event(noise_multiplier: float, q: float) -> dpe.DpEvent:
    """One DP-SGD step at a client: Poisson sampling q, Gaussian sum with multiplier z."""
    return dpe.PoissonSampledDpEvent(float(q), dpe.GaussianDpEvent(float(noise_multiplier)))


def round_spend(
    noise_multiplier: float,
    sampling: Sampling,
    clipping: str = "fixed",
    participants: Sequence[str] | None = None,
) -> Spend:
    """One round's spend. Record level: the clients that took part (`participants`, default all)."""
    if isinstance(sampling, ClientSampling):
        mechanism = client_mechanism_event(clipping, noise_multiplier, sampling.participants)
        return client_round_event(mechanism, sampling)
    names = list(sampling.client_rows) if participants is None else list(participants)
    return {
        name: dpe.SelfComposedDpEvent(
            record_step_event(noise_multiplier, sampling.q(name)), sampling.steps_per_round[name]
        )
        for name in names
    }


def dp_event(
    noise_multiplier: float,
    sampling: Sampling,
    rounds: int,
    clipping: str = "fixed",
    participation: Mapping[str, int] | None = None,
) -> Spend:
    """The mechanism as run, composed over `rounds`.

    Client level: one event. Record level: {client: event}, client k composed over
    `participation[k]` rounds (default: every round).
    """
    if isinstance(sampling, ClientSampling):
        return dpe.SelfComposedDpEvent(round_spend(noise_multiplier, sampling, clipping), int(rounds))
    counts = participation if participation is not None else {name: rounds for name in sampling.client_rows}
    per_step = {name: record_step_event(noise_multiplier, sampling.q(name)) for name in counts}
    return {
        name: dpe.SelfComposedDpEvent(per_step[name], sampling.steps_per_round[name] * int(counts[name]))
        for name in counts
    }


def mechanism_event_from_state(learning_state) -> dpe.DpEvent:
    """The per-round event TFF's DP aggregator reports in a learning process's state (after
    `next`), as plain-float dp_accounting objects. Wrap it with `client_round_event`."""
    from tensorflow_federated.python.aggregators import differential_privacy

    aggregator_state = getattr(learning_state, "aggregator", learning_state)
    return normalize_event(differential_privacy.extract_dp_event_from_state(aggregator_state))


def normalize_event(event: dpe.DpEvent) -> dpe.DpEvent:
    """Numbers as Python floats/ints.

    Events coming out of TFF carry numpy float32 values; dp-accounting's RDP code tests
    `isinstance(sigma, float)`, which float32 fails, and then silently uses only the first
    Gaussian of a composed event inside a sampling event.
    """
    if isinstance(event, dpe.GaussianDpEvent):
        return dpe.GaussianDpEvent(float(event.noise_multiplier))
    if isinstance(event, dpe.LaplaceDpEvent):
        return dpe.LaplaceDpEvent(float(event.noise_multiplier))
    if isinstance(event, dpe.ComposedDpEvent):
        return dpe.ComposedDpEvent([normalize_event(e) for e in event.events])
    if isinstance(event, dpe.SelfComposedDpEvent):
        return dpe.SelfComposedDpEvent(normalize_event(event.event), int(event.count))
    if isinstance(event, dpe.PoissonSampledDpEvent):
        return dpe.PoissonSampledDpEvent(float(event.sampling_probability), normalize_event(event.event))
    if isinstance(event, dpe.SampledWithoutReplacementDpEvent):
        return dpe.SampledWithoutReplacementDpEvent(
            int(event.source_dataset_size), int(event.sample_size), normalize_event(event.event)
        )
    return event


def _scale_gaussians(event: dpe.DpEvent, factor: float) -> dpe.DpEvent:
    if isinstance(event, dpe.GaussianDpEvent):
        return dpe.GaussianDpEvent(float(event.noise_multiplier) * factor)
    if isinstance(event, dpe.ComposedDpEvent):
        return dpe.ComposedDpEvent([_scale_gaussians(e, factor) for e in event.events])
    if isinstance(event, dpe.SelfComposedDpEvent):
        return dpe.SelfComposedDpEvent(_scale_gaussians(event.event, factor), event.count)
    raise ValueError(f"cannot restate {type(event).__name__} for replace-one accounting")


_EVENT_TYPES = {
    cls.__name__: cls
    for cls in (
        dpe.NoOpDpEvent,
        dpe.NonPrivateDpEvent,
        dpe.GaussianDpEvent,
        dpe.LaplaceDpEvent,
        dpe.SelfComposedDpEvent,
        dpe.ComposedDpEvent,
        dpe.PoissonSampledDpEvent,
        dpe.SampledWithoutReplacementDpEvent,
    )
}


def event_to_json(event: dpe.DpEvent) -> dict[str, Any]:
    """A dp_accounting event as JSON-ready data ({"type": class name, fields...})."""
    event = normalize_event(event)
    name = type(event).__name__
    if name not in _EVENT_TYPES:
        raise ValueError(f"cannot serialize {name}")
    data: dict[str, Any] = {"type": name}
    for key in getattr(type(event), "__attrs_attrs__", ()):
        value = getattr(event, key.name)
        if isinstance(value, dpe.DpEvent):
            value = event_to_json(value)
        elif isinstance(value, list):
            value = [event_to_json(v) for v in value]
        data[key.name] = value
    return data


def event_from_json(data: Mapping[str, Any]) -> dpe.DpEvent:
    """Inverse of `event_to_json`; only the event types this suite produces are accepted."""
    cls = _EVENT_TYPES.get(data.get("type", ""))
    if cls is None:
        raise ValueError(f"unknown dp event type {data.get('type')!r}")
    kwargs = {}
    for key, value in data.items():
        if key == "type":
            continue
        if isinstance(value, Mapping):
            value = event_from_json(value)
        elif isinstance(value, list):
            value = [event_from_json(v) for v in value]
        kwargs[key] = value
    return cls(**kwargs)


def spend_to_json(spend: Spend) -> dict[str, Any]:
    if isinstance(spend, Mapping):
        return {"per_client": {name: event_to_json(e) for name, e in spend.items()}}
    return {"event": event_to_json(spend)}


def spend_from_json(data: Mapping[str, Any]) -> Spend:
    if "per_client" in data:
        return {name: event_from_json(e) for name, e in data["per_client"].items()}
    return event_from_json(data["event"])
