"""Bytes each client sends and receives per round, and the run's communication and
participation summary.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow_federated as tff

from tff_apps.learning import participation


def bytes_per_client(weights: tff.learning.models.ModelWeights, federation=None) -> dict[str, int]:
    """One client's share of a round's exchange: it downloads the model weights (trainable and
    not) and uploads its update of the trainable ones plus its weight (a float32).

    `federation` (a `federation.Federation`, None = defaults): with [communication]
    compression the update goes up as TFF's encoder packs it (`compression.upload_bytes`, and
    the encoder's broadcast parameters come down), and "bytes_up_uncompressed" keeps the
    float32 figure; `robustness.aggregation = "clip_zero"` adds its bounds and norm records
    (`aggregators.clip_zero_bytes`).
    """
    from tff_apps.learning import aggregators, compression

    down = sum(np.asarray(w).nbytes for w in (*weights.trainable, *weights.non_trainable))
    update = sum(np.asarray(w).nbytes for w in weights.trainable)
    weight = np.dtype(np.float32).itemsize
    sent = {"bytes_up": update + weight, "bytes_down": down}
    section = getattr(federation, "communication", None)
    if compression.is_compressed(section):
        encoded = compression.upload_bytes(section, sum(int(np.size(w)) for w in weights.trainable))
        sent = {"bytes_up": encoded["up"] + weight, "bytes_down": down + encoded["down"],
                "bytes_up_uncompressed": update + weight}
    if federation is not None and federation.robustness.aggregation == "clip_zero":
        extra = aggregators.clip_zero_bytes()
        sent = {key: value + extra["down" if key == "bytes_down" else "up"] for key, value in sent.items()}
    return {key: int(value) for key, value in sent.items()}


def communication(history: list[dict[str, Any]], federation=None) -> dict[str, Any]:
    """Total bytes up (clients to server) and down over the rounds of a run's history; with
    [communication] compression (`federation`) also the float32 upload it replaced, the ratio
    and the setting."""
    totals: dict[str, Any] = {
        key: sum(int(r.get(key, 0)) for r in history) for key in ("bytes_up", "bytes_down")
    }
    section = getattr(federation, "communication", None)
    if section is not None and section.compression != "none":
        uncompressed = sum(int(r.get("bytes_up_uncompressed", r.get("bytes_up", 0))) for r in history)
        totals.update(
            compression=section.compression,
            bits=int(section.bits),
            bytes_up_uncompressed=uncompressed,
            upload_ratio=round(uncompressed / totals["bytes_up"], 3) if totals["bytes_up"] else None,
        )
    return totals


def rounds_summary(history: list[dict[str, Any]], federation=None, engine: str | None = None) -> dict[str, Any]:
    """summary.json's `communication` (bytes up and down, `communication`) and `participation`
    (rounds skipped, clients reporting, dropout, stragglers, unused: `participation.summary`),
    and the `engine` that ran the rounds (`train.engine = "auto"` resolves to one)."""
    summary = {"communication": communication(history, federation), "participation": participation.summary(history)}
    return summary if engine is None else {"engine": engine, **summary}
