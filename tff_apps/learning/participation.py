"""Unreliable clients, simulated ([clients]): which of a round's sampled clients report.

Each sampled client gets two draws from its own stream, seeded by (job seed, round, client
index, STREAM_TAG): the tag keeps it apart from `client_data.round_seed`'s stream (the client's
round data), and the main sampling generator is never touched, so a run whose [clients]
section is default samples and trains exactly as before, and a resumed run makes the
same draws. The two draws are always made, in the same order, so changing `dropout` does
not change a client's speed and vice versa:

* u ~ U(0, 1): the client fails this round (drops out) if u < dropout;
* a slowdown exp(N(0, speed_spread^2)): its simulated time is the examples it processes
  this round (local_epochs x rows, or local_steps x batch_size) x seconds_per_example x
  the slowdown.

The survivors (not dropped) that miss `deadline_seconds` are stragglers, cut. With
over-selection more clients are sampled than the m a round wants; the first m survivors to
finish (by simulated time) report and the rest are unused. A round with fewer than
`quorum` reports is skipped: the model is not changed.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from tff_apps.privacy.dp_config import ClientSampling

STREAM_TAG = 0x636C6E74  # "clnt": keeps these draws apart from client_data.round_seed's


def participants(n_clients: int, clients_per_round: int) -> int:
    """m: the clients a round wants (`train.clients_per_round`, 0 or >= n: every client)."""
    return ClientSampling(n_clients, clients_per_round).participants


def sample_size(n_clients: int, clients_per_round: int, over_selection: float) -> int:
    """What to hand `round_loop.sample_clients`: `clients_per_round` itself without
    over-selection (the sampler's draws stay exactly as before), else ceil(m (1 + o)) capped
    at the number of clients."""
    if over_selection <= 0:
        return clients_per_round
    m = participants(n_clients, clients_per_round)
    return min(n_clients, math.ceil(m * (1.0 + over_selection) - 1e-9))


@dataclass(frozen=True)
class ClientDraw:
    dropped: bool
    slowdown: float  # exp(N(0, speed_spread^2))


def client_draw(seed: int, round_number: int, client_index: int, clients) -> ClientDraw:
    """One sampled client's fate in one round (`clients`: a `federation.ClientsSection`)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, round_number, client_index, STREAM_TAG]))
    u, z = rng.random(), rng.standard_normal()
    return ClientDraw(dropped=bool(u < clients.dropout), slowdown=math.exp(clients.speed_spread * z))


@dataclass(frozen=True)
class Turnout:
    """Who did what in one round (client indices; `reported` in sampling order)."""

    sampled: list[int]
    dropped: list[int]
    stragglers: list[int]
    unused: list[int]
    reported: list[int]
    skipped: bool
    simulated_seconds: float

    def stats(self) -> dict[str, Any]:
        """The round's participation as metrics.jsonl records it."""
        return {
            "sampled": len(self.sampled),
            "dropped": len(self.dropped),
            "stragglers": len(self.stragglers),
            "unused": len(self.unused),
            "reported": len(self.reported),
            "skipped": self.skipped,
            "simulated_seconds": round(self.simulated_seconds, 6),
        }


def turnout(
    clients, seed: int, round_number: int, sampled: Sequence[int], examples: Sequence[int], wanted: int
) -> Turnout:
    """Which of the `sampled` client indices report this round.

    `examples[i]`: examples client i processes in a round; `wanted`: m. The round's simulated
    time is the last reporting client's; when fewer than m report and there is a deadline,
    the server waited for it (it cannot know a silent client has failed).
    """
    dropped, stragglers, finished = [], [], []
    for index in sampled:
        draw = client_draw(seed, round_number, index, clients)
        seconds = examples[index] * clients.seconds_per_example * draw.slowdown
        if draw.dropped:
            dropped.append(index)
        elif clients.deadline_seconds > 0 and seconds > clients.deadline_seconds:
            stragglers.append(index)
        else:
            finished.append((seconds, index))
    finished.sort()
    accepted, unused = finished[:wanted], [index for _, index in finished[wanted:]]
    reported = sorted(index for _, index in accepted)
    simulated = max((seconds for seconds, _ in accepted), default=0.0)
    if len(reported) < wanted and clients.deadline_seconds > 0:
        simulated = clients.deadline_seconds
    return Turnout(
        sampled=list(sampled), dropped=dropped, stragglers=stragglers, unused=sorted(unused),
        reported=reported, skipped=len(reported) < clients.quorum, simulated_seconds=simulated,
    )


def summary(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals over a run's metrics records (rounds without participation fields are left
    out: a run resumed from an older metrics.jsonl)."""
    rounds = [r for r in history if "reported" in r and "sampled" in r]
    if not rounds:
        return {}
    sampled = sum(int(r["sampled"]) for r in rounds)
    return {
        "rounds": len(rounds),
        "rounds_skipped": sum(bool(r["skipped"]) for r in rounds),
        "mean_reported": sum(int(r["reported"]) for r in rounds) / len(rounds),
        "dropout_rate": sum(int(r["dropped"]) for r in rounds) / sampled if sampled else 0.0,
        "dropped": sum(int(r["dropped"]) for r in rounds),
        "stragglers": sum(int(r["stragglers"]) for r in rounds),
        "unused": sum(int(r["unused"]) for r in rounds),
        "simulated_seconds": round(sum(float(r["simulated_seconds"]) for r in rounds), 6),
    }
