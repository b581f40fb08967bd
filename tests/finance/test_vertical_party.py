"""A party's PSI and alignment at its own site (`tff_apps.sites.vertical_party`), played
in-process: each party's service on its own site folder, the coordinator's `Relay` between
them. What each party writes for training must be exactly the simulation's encoded rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from finance.alignment import align, aligned, split_aligned
from finance.data import load
from finance.model import PartyEncoder
from finance.site_folder import PartySite, write_demo_parties, write_party_folder
from finance.sites import Relay
from shared import secagg_wire as wire
from shared.errors import UserError
from tests.finance.three_parties import write_party_csvs
from tff_apps.program.job import resolve_job
from tff_apps.sites.connect import job_descriptor
from tff_apps.sites.vertical_party import ProtocolError, VerticalPartyService

NAMES = ["lender", "partner", "partner2"]


@pytest.fixture(scope="module")
def parties(tmp_path_factory):
    base = tmp_path_factory.mktemp("parties")
    _, cfg = resolve_job("finance", str(write_party_csvs(base)), ['job.run_id="r1"'])
    for name in NAMES:
        write_party_folder(cfg, base / name, name)
    return base, cfg


def local_calls(services, job):
    def call(index, method, body):
        return wire.loads(services[index].handle(method, wire.dumps(body), job))

    return call


def test_each_party_writes_the_simulations_encoded_rows_of_the_aligned_customers(parties):
    base, cfg = parties
    services = [VerticalPartyService(name, PartySite(base / name)) for name in NAMES]
    relay = Relay(local_calls(services, job_descriptor(cfg)), NAMES)
    shared = {name: relay.psi(name) for name in NAMES[1:]}
    encoded = relay.align(cfg.evaluate.test_fraction, cfg.job.seed)

    data = load(cfg.data, cfg.job.seed)  # the simulation of the same files
    alignment = align(data)
    assert shared == alignment.pairwise
    tables = aligned(data, alignment)
    train, test = split_aligned(tables[0].labels, cfg.evaluate.test_fraction, cfg.job.seed)
    for name, table in zip(NAMES, tables):
        run = base / name / "runs" / "r1"
        encoder = PartyEncoder.fit(table.features.iloc[train], table.categorical)
        assert encoded[name] == {"width": encoder.n_outputs, "train": len(train), "test": len(test)}
        for split, rows in (("train", train), ("test", test)):
            written = np.fromfile(run / f"{split}_x.f32", "<f4").reshape(len(rows), -1)
            np.testing.assert_array_equal(written, encoder.transform(table.features.iloc[rows]))
        assert (run / "train_y.f32").exists() == (name == "lender")
    np.testing.assert_array_equal(np.fromfile(base / "lender" / "runs" / "r1" / "test_y.f32", "<f4"),
                                  tables[0].labels[test])


def test_what_leaves_a_site_names_no_id_and_no_column(parties):
    base, cfg = parties
    services = [VerticalPartyService(name, PartySite(base / name)) for name in NAMES]
    seen = []

    def recording(index, method, body):
        answer = services[index].handle(method, wire.dumps(body), job_descriptor(cfg))
        seen.append(answer)
        return wire.loads(answer)

    relay = Relay(recording, NAMES)
    for name in NAMES[1:]:
        relay.psi(name)
    relay.align(0.3, 0)
    text = b"".join(seen)
    for secret in (b"C00042", b"c00042", b"income", b"grade", b"tenure"):
        assert secret not in text


def test_steps_out_of_order_and_no_shared_customer_are_refused_in_one_line(parties, tmp_path):
    base, cfg = parties
    job = job_descriptor(cfg)
    partner = VerticalPartyService("partner", PartySite(base / "partner"))
    with pytest.raises(ProtocolError, match="Align before the PSI with the lender"):
        partner.handle("Align", wire.dumps({"keep": {"n": 0, "bits": ""}, "train": [], "test": []}), job)
    with pytest.raises(ProtocolError, match="no PSI session with 'lender'"):
        partner.handle("Psi", wire.dumps({"peer": "lender", "step": "blinded", "message": {}}), job)
    other = tmp_path / "other.csv"
    other.write_text("id,z\nnobody,1.0\nnoone,2.0\n")
    _, cfg2 = resolve_job("finance", None, ['data.source="csv"', 'data.label_column="y"',
                                            f'data.parties={{partner = {{csv = "{other}"}}}}'])
    write_party_folder(cfg2, tmp_path / "partner", "partner")
    services = [VerticalPartyService("lender", PartySite(base / "lender")),
                VerticalPartyService("partner", PartySite(tmp_path / "partner"))]
    relay = Relay(local_calls(services, job), ["lender", "partner"])
    with pytest.raises(UserError, match="PSI: no customer is held by every party") as refused:
        relay.psi("partner")
        relay.align(0.3, 0)
    assert "\n" not in str(refused.value)


def test_the_coordinator_relays_public_keys_and_each_party_writes_masks_that_cancel(parties):
    """`finance.sites.PartyMasks` over every party's `Masks` step: what the coordinator sees is
    each party's public key; the masks stay in the parties' run folders and sum to 0 in the ring."""
    from finance.sites import PartyMasks

    base, cfg = parties
    services = [VerticalPartyService(name, PartySite(base / name)) for name in NAMES]
    seen = []

    def call(index, method, body):
        answer = local_calls(services, job_descriptor(cfg))(index, method, body)
        seen.append(answer)
        return answer

    masks = PartyMasks(call, len(NAMES))
    assert all(set(answer) == {"public"} for answer in seen)  # the advertise step: a public key only
    name = masks("test-e2", 50, 20)
    written = [np.fromfile(base / party / "runs" / "r1" / name, "<i8") for party in NAMES]
    assert all(len(w) == 50 for w in written) and np.all(np.sum(written, axis=0) % 2**20 == 0)
    assert masks("test-e2", 50, 20) == name  # the same purpose again: the same file, the same masks
    assert np.array_equal(np.fromfile(base / "lender" / "runs" / "r1" / name, "<i8"), written[0])
    with pytest.raises(ProtocolError, match="Masks step 'unmask' is not advertise or write"):
        services[0].handle("Masks", wire.dumps({"step": "unmask"}), job_descriptor(cfg))


def test_the_demos_party_folders_hold_each_partys_own_table_as_loaded(tmp_path):
    _, cfg = resolve_job("finance", None, ["data.partners=2"])
    data = load(cfg.data, cfg.job.seed)
    names = write_demo_parties(data, cfg, tmp_path)
    assert names == data.names == ["lender", "partner", "partner2"]
    for party in data.parties:
        table = PartySite(tmp_path / party.name).table
        assert list(table.ids) == list(party.ids) and table.categorical == party.categorical
        assert (table.labels is None) == (party.labels is None)
        if party.labels is not None:
            np.testing.assert_array_equal(table.labels, party.labels)
        pd.testing.assert_frame_equal(table.features, party.features, check_dtype=False)
