"""Training and evaluation across sites: the learning process's round runs at the sites on
data they open themselves, and evaluation returns score histograms, never rows.

`SiteProcess` wraps a learning process built as for a simulation (`factory.
build_learning_process`): its `next` takes, per site, the site's data folder and the round's
row order (`round_reference`), and a computation at the site turns them into the very
dataset a simulation would have built (`site_computations.round_dataset_fn`). The row order
depends on (seed, round, site, row count) only, so the coordinator sends no data and the
sites' round inputs equal the simulation's, batch for batch.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow_federated as tff

from tff_apps.learning.client_data import round_order
from tff_apps.runtime.mergeable import placed_on
from tff_apps.sites import site_computations


@dataclass(frozen=True)
class SiteClient:
    """A client of the round loop that is a site: its name, training rows and data folder."""

    name: str
    rows: int
    folder: str


def round_reference(client: SiteClient, train, seed: int) -> collections.OrderedDict:
    """What the coordinator sends a site for a round: its folder and the row order."""
    order = round_order(client.rows, train, seed).astype(np.int32)
    return collections.OrderedDict(folder=client.folder, order=order)


def poisson_reference(client: SiteClient, train, seed: int) -> collections.OrderedDict:
    """Record-level DP: the site draws its Poisson batches itself (`poisson_round_fn`); the
    coordinator sends only q and the number of steps, which the accountant uses too."""
    from tff_apps.privacy import dp_config

    q = min(1.0, train.batch_size / client.rows)
    steps = dp_config.record_steps_per_round(train, client.rows)
    return collections.OrderedDict(folder=client.folder, q=np.float32(q), steps=np.int32(steps))


class SiteProcess:
    """A learning process whose round inputs are opened at the sites.

    A site that stops answering during a round (`WorkerLost`) is left out from then on and the
    round runs again with the sites left, if at least `quorum` of the round's sites remain
    (`[clients] quorum`); `last_dropped` names the sites a round lost. Fewer than the quorum:
    the WorkerLost goes up (one line naming the site; the run id resumes from its checkpoint).
    """

    def __init__(self, process, open_round, clients: Sequence[SiteClient], addresses: Sequence[str] = (), quorum: int = 1):
        self._process = process
        self.weights_type = process.get_model_weights.type_signature.result  # for `SiteEvaluation`
        self._worker_of = {c.folder: index for index, c in enumerate(clients)}  # site i = worker i
        self._name_of = {c.folder: c.name for c in clients}
        self._index_of_address = {address: index for index, address in enumerate(addresses)}
        self._quorum = max(1, quorum)
        self.lost: set[int] = set()
        self.last_dropped: list[str] = []
        state_type = process.next.type_signature.parameter[0]
        references = tff.FederatedType(open_round.type_signature.parameter, tff.CLIENTS)

        @tff.federated_computation(state_type, references)
        def next_at_sites(state, refs):
            return process.next(state, tff.federated_map(open_round, refs))

        self._next = next_at_sites

    def initialize(self):
        return self._process.initialize()

    def next(self, state, references):
        """One round with the sites of `references` (a round may sample some of them), each
        on its own worker; the folders of the sites it lost are in `last_dropped`."""
        from tff_apps.runtime.context import WorkerLost

        while True:
            live = [r for r in references if self._worker_of[r["folder"]] not in self.lost]
            self.last_dropped = [self._name_of[r["folder"]] for r in references if self._worker_of[r["folder"]] in self.lost]
            try:
                with placed_on([self._worker_of[r["folder"]] for r in live]):
                    return self._next(state, live)
            except WorkerLost as lost:
                index = self._index_of_address.get(lost.address)
                if index is None or len(live) - 1 < self._quorum:
                    raise
                self.lost.add(index)
                name = next(n for folder, n in self._name_of.items() if self._worker_of[folder] == index)
                logging.getLogger(__name__).warning(
                    "site %s (%s) stopped answering; the round runs again with the %d sites left (clients.quorum = %d), "
                    "and later rounds leave it out", name, lost.address, len(live) - 1, self._quorum,
                )

    def get_model_weights(self, state):
        return self._process.get_model_weights(state)

    def set_model_weights(self, state, weights):
        return self._process.set_model_weights(state, weights)


class SiteEvaluation:
    """Per round: each site's test-score histogram (`site_computations.score_histograms`)."""

    def __init__(self, process, model_fn, preprocessor, n_features: int, folders: list[str]):
        # a process across sites (`SiteProcess`, `masked_rounds.MaskedSiteProcess`) names its weights' type
        weights_type = getattr(process, "weights_type", None) or process.get_model_weights.type_signature.result
        self._histograms = site_computations.score_histograms(model_fn, preprocessor, n_features, weights_type)
        self._folders = list(folders)

    def scores(self, weights, skip=()) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Site index -> (labels, scores), exact to the bin width, for every site not in `skip`
        (the sites a run lost)."""
        live = [index for index in range(len(self._folders)) if index not in skip]
        with placed_on(live):
            histograms = self._histograms(weights, [self._folders[index] for index in live])
        return {index: site_computations.scores_from_histogram(h) for index, h in zip(live, histograms)}

    def site_scores(self, weights, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels, scores) of one site's test rows under `weights`, computed at that site."""
        with placed_on([index]):
            (histogram,) = self._histograms(weights, [self._folders[index]])
        return site_computations.scores_from_histogram(histogram)


def local_only_scores(process, initial_weights, evaluation: SiteEvaluation, clients, train, seed: int, skip=()) -> dict:
    """The local-only baseline at the sites: each site trains a model of its own from
    `initial_weights[i]` on its own rows (one round of `process`, a FedAvg whose only client is
    that site, `train.local_epochs` epochs, so the result is the site's own model), scored on its
    own test rows. Site index -> (labels, scores), for the sites not in `skip` (lost ones); no
    model leaves a site but through its scores."""
    from tff_apps.learning.client_data import round_seed

    results = {}
    for index, client in enumerate(clients):
        if index in skip:
            continue
        state = process.set_model_weights(process.initialize(), initial_weights[index])
        with placed_on([index]):
            state = process.next(state, [round_reference(client, train, round_seed(seed, 1, index))]).state
        results[index] = evaluation.site_scores(process.get_model_weights(state), index)
    return results


def describe_sites(sites, manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """For the summary and model card: where the run trained."""
    return {
        site.name: {"address": site.address, "train_rows": m["rows"]["train"], "test_rows": m["rows"]["test"]}
        for site, m in zip(sites, manifests)
    }


def personalize_at_sites(
    model_fn, metrics_fn, section, train, seed: int, preprocessor, n_features: int, clients, open_splits=None,
) -> dict:
    """[personalization] at the sites: each site fine-tunes the global model on its training
    rows and evaluates both models on its test rows, all at the site
    (`personalization.evaluation_computation`); site -> {"before": ..., "after": ...}.
    `open_splits`: the computation that opens a site's {train_data, test_data} (default: a
    tabular site's rows under `preprocessor`)."""
    from tff_apps.learning import personalization

    computation = personalization.evaluation_computation(
        model_fn, metrics_fn, section, train, seed, shuffle_buffer=max(c.rows for c in clients)
    )
    open_splits = open_splits or site_computations.split_datasets_fn(preprocessor, n_features)

    @tff.federated_computation(computation.type_signature.parameter[0], tff.FederatedType(np.str_, tff.CLIENTS))
    def at_sites(weights, folders):
        return computation(weights, tff.federated_map(open_splits, folders))

    def personalize(weights, skip=()) -> dict:  # skip: the sites a run lost
        results = {}
        for index, client in enumerate(clients):
            if index in skip:
                continue
            with placed_on([index]):
                results[client.name] = personalization.before_after(at_sites(weights, [client.folder]))
        model_fn()  # Keras' layer classes back to eager (see `personalization.personalize`)
        return results

    return personalize
