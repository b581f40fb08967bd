"""One client's training rows and its round input: every round's data depend only on
(seed, round, client), so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from tff_apps.config import TrainSection


@dataclass
class ClientTrainData:
    """One client's preprocessed training arrays (they stay with the client's dataset)."""

    name: str
    x: np.ndarray
    y: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class RoundRows:
    """One client's round input as arrays: its rows in the order `client_dataset` batches them.
    The grouped engine stacks these (`grouped_data`) without a tf.data pipeline, which costs
    about 0.8 ms a client and round to build (1,000 clients: 0.80 s against 0.034 s)."""

    x: np.ndarray
    y: np.ndarray
    batch_size: int


def client_round_rows(client: ClientTrainData, train: TrainSection, seed: int) -> RoundRows:
    """One client's round input: `local_epochs` seeded shuffles of its rows; or, with
    `local_steps`, that many batches of rows drawn without replacement (seeded).

    The rows are chosen here, at the client, so only this round's rows are handed to the
    TFF runtime, not the client's whole table.
    """
    order = round_order(len(client.x), train, seed)
    return RoundRows(client.x[order].astype(np.float32), client.y[order].astype(np.float32), int(train.batch_size))


def client_dataset(client: ClientTrainData, train: TrainSection, seed: int) -> tf.data.Dataset:
    """`client_round_rows`, batched, as the stock engine's tf.data round input."""
    rows = client_round_rows(client, train, seed)
    return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=rows.x, y=rows.y)).batch(rows.batch_size)


def round_order(rows: int, train: TrainSection, seed: int) -> np.ndarray:
    """The row order of a client's round input: `local_epochs` seeded shuffles, or with
    `local_steps` that many batches of rows drawn without replacement (seeded). It depends
    on the row count only, so a site can be sent it without anything of its data."""
    rng = np.random.default_rng(seed)
    if train.local_steps > 0:
        wanted = train.local_steps * train.batch_size
        passes = -(-wanted // rows)  # ceil: a small client cycles through its rows
        return np.concatenate([rng.permutation(rows) for _ in range(passes)])[:wanted]
    return np.concatenate([rng.permutation(rows) for _ in range(train.local_epochs)])


def round_seed(seed: int, round_number: int, client_index: int) -> int:
    return int(np.random.SeedSequence([seed, round_number, client_index]).generate_state(1)[0])
