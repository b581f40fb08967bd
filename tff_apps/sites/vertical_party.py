"""A vertical-FL party's steps at its own site, played by the site's gateway: its side of the
PSI with every other party and the alignment that follows (`tff_apps.v1.VerticalParty`, on
the gateway's mutual-TLS port, with the same policy, job descriptor and audit log as its
TFF executor calls).

The coordinator relays, it does not compute: each request and answer is one JSON message
(`shared.secagg_wire`'s encoding), the PSI's group elements as base64.

  Psi    {peer, step, message}  the party's next `shared.psi.PsiParty` step with `peer`
                                (salt -> its salt share; blinded -> its blinded IDs;
                                double_blind -> the peer's set blinded again; finish ->
                                the count of customers it shares with the peer)
  Align  {partners, ...}        at the lender: the customers every partner shares, one
                                "kept" bit per pairwise-shared customer for each partner,
                                the held-out split (positions in the common order);
                                at a partner: {keep, train, test} from the lender.
                                Each party then encodes its own rows of the aligned customers
                                into the run's folder at the site; the answer is its width
                                and row counts.
  Export {tag, model, card}     the party's SavedModel, written at its site from its final
                                weights there (`finance.site_export`); the answer is its path.
  Masks  {step, ...}            the pairwise masks of the secure sum across sites
                                (`tff_apps.sites.vertical_masks`): advertise -> the party's
                                public key for the run; write {keys, index, purpose, length,
                                bits} -> its mask file written in the run's folder at its site.
  Score  {step, ...}            `tff-apps score` across sites: open -> the party's own CSV
                                (a path at its site) scored by its export, its IDs the set of
                                the session's PSI (then Align keeps the shared customers' scores
                                for the secure sum); write (lender) -> its IDs and sigmoid(z)
                                written to a CSV at its site.

What leaves a site: PSI messages (blinded values, the shared count), at the lender the kept
bits and the split positions (which the partners need), each party's encoded width, its
masks' public key and the path of its export at the site.
No ID, row or column name leaves. Blinding scalars and the pairwise rows stay in this
process's memory, per run, until the alignment is written. Does not import TensorFlow.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from shared import secagg_wire as wire
from shared.errors import UserError
from shared.psi import Message, PsiParty
from tff_apps.sites import vertical_masks
from tff_apps.sites.policy import Job

SERVICE = "tff_apps.v1.VerticalParty"
METHODS = ("Psi", "Align", "Export", "Masks", "Score")
LENDER = "lender"
_RUNS_KEPT = 8
_ELEMENT_BYTES = 32


class ProtocolError(ValueError):
    """A request out of the protocol's order, or for a run this site does not know."""


def message_to_json(message: Message) -> dict[str, Any]:
    payload = message.payload if isinstance(message.payload, bytes) else b"".join(message.payload)
    return {"sender": message.sender, "receiver": message.receiver, "kind": message.kind,
            "list": not isinstance(message.payload, bytes), "payload": wire.b64(payload)}


def message_from_json(obj: Any) -> Message:
    if not isinstance(obj, dict) or not {"sender", "receiver", "kind", "payload"} <= set(obj):
        raise wire.WireError("PSI: the message needs sender, receiver, kind and payload")
    payload = wire.unb64(obj["payload"], "PSI payload")
    if obj.get("list"):
        if len(payload) % _ELEMENT_BYTES:
            raise wire.WireError(f"PSI: a list payload is a multiple of {_ELEMENT_BYTES} bytes")
        payload = [payload[i : i + _ELEMENT_BYTES] for i in range(0, len(payload), _ELEMENT_BYTES)]
    return Message(str(obj["sender"]), str(obj["receiver"]), str(obj["kind"]), payload)


def bits_to_json(keep: np.ndarray) -> dict[str, Any]:
    return {"n": int(len(keep)), "bits": wire.b64(np.packbits(keep.astype(bool)).tobytes())}


def bits_from_json(obj: Any) -> np.ndarray:
    if not isinstance(obj, dict) or "n" not in obj or "bits" not in obj:
        raise wire.WireError("Align: keep needs n and bits")
    bits = np.unpackbits(np.frombuffer(wire.unb64(obj["bits"], "keep bits"), np.uint8))
    return bits[: int(obj["n"])].astype(bool)


def positions(obj: Any, what: str) -> np.ndarray:
    if not isinstance(obj, list) or not all(isinstance(v, int) for v in obj):
        raise wire.WireError(f"Align: {what} must be a list of positions")
    return np.asarray(obj, np.int64)


class _Run:
    def __init__(self) -> None:
        self.ids: np.ndarray | None = None  # a scoring session's IDs (else the party's table's)
        self.psi: dict[str, PsiParty] = {}
        self.shared: dict[str, np.ndarray] = {}  # peer -> own rows shared with it, common order


class VerticalPartyService:
    """One site's party. `party` is the app's party at this site (`finance.site_folder.PartySite`:
    name, is_lender, table (ids, labels), split(labels, fraction, seed), encode(run, rows, train, test))."""

    def __init__(self, site: str, party) -> None:
        self._site, self._party = site, party
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._lock = threading.Lock()

    def handle(self, method: str, request: bytes, job: Job, timeout: float | None = None) -> bytes:
        """One call; raises wire.WireError / ProtocolError / UserError (refusals)."""
        body = wire.loads(request)
        run = self._run(job.run_id)
        handlers: dict[str, Callable[[_Run, dict, Job], dict]] = {
            "Psi": self._psi, "Align": self._align, "Export": self._export, "Masks": self._masks,
            "Score": self._score}
        if method not in handlers:
            raise ProtocolError(f"site {self._site}: no method {method!r}")
        return wire.dumps(handlers[method](run, body, job))

    def _run(self, run_id: str) -> _Run:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                run = self._runs[run_id] = _Run()
                while len(self._runs) > _RUNS_KEPT:
                    self._runs.popitem(last=False)
            return run

    def _psi(self, run: _Run, body: dict, job: Job) -> dict:
        peer, step = str(body.get("peer", "")), body.get("step")
        if step == "salt":  # a new session with this peer (a re-run starts over)
            own = self._party
            ids = run.ids if run.ids is not None else own.table.ids
            run.psi[peer] = PsiParty(own.name, ids, initiator=own.is_lender)
            return {"message": message_to_json(run.psi[peer].salt_message(peer))}
        party = run.psi.get(peer)
        if party is None:
            raise ProtocolError(f"site {self._site}: no PSI session with {peer!r} in run {job.run_id}; start with salt")
        message = message_from_json(body.get("message"))
        try:
            if step == "blinded":
                party.receive_salt(message)
                return {"message": message_to_json(party.blinded_message(peer))}
            if step == "double_blind":
                return {"message": message_to_json(party.double_blind(message))}
            if step == "finish":
                party.receive_double_blinded(message)
                run.shared[peer] = party.shared_rows()
                del run.psi[peer]  # the scalar goes with it
                return {"shared": int(len(run.shared[peer]))}
        except RuntimeError as err:  # shared.psi's protocol violations
            raise ProtocolError(f"site {self._site}: {err}") from None
        raise ProtocolError(f"site {self._site}: PSI step {step!r} is not salt, blinded, double_blind or finish")

    def _align(self, run: _Run, body: dict, job: Job) -> dict:
        party = self._party
        if party.is_lender:
            return self._align_lender(run, body, job)
        rows = run.shared.get(LENDER)
        if rows is None:
            raise ProtocolError(f"site {self._site}: Align before the PSI with the lender finished in run {job.run_id}")
        keep = bits_from_json(body.get("keep"))
        if len(keep) != len(rows):
            raise ProtocolError(f"site {self._site}: {len(keep)} kept bits for {len(rows)} shared customers")
        if run.ids is not None:  # a scoring session: its partial scores of the shared customers
            return {"rows": party.align_scoring(job.run_id, rows[keep])}
        encoded = party.encode(job.run_id, rows[keep], positions(body.get("train"), "train"),
                               positions(body.get("test"), "test"))
        return {"encoded": encoded}

    def _export(self, run: _Run, body: dict, job: Job) -> dict:
        """The party's export, written at its site from its final weights there."""
        needed = {"tag", "kind", "width", "hidden_units", "score_bound", "card"}
        if not needed <= set(body):
            raise wire.WireError(f"Export: the message needs {', '.join(sorted(needed))}")
        return {"export": self._party.export(job.run_id, {key: body[key] for key in needed})}

    def _masks(self, run: _Run, body: dict, job: Job) -> dict:
        """The party's key for the run's masks, or its mask file of one purpose (`vertical_masks`)."""
        folder = self._party.run_dir(job.run_id)
        step = body.get("step")
        if step == "advertise":
            return {"public": wire.b64(vertical_masks.public_key(folder))}
        if step == "write":
            return vertical_masks.write_masks(folder, body)
        raise ProtocolError(f"site {self._site}: Masks step {step!r} is not advertise or write")

    def _score(self, run: _Run, body: dict, job: Job) -> dict:
        """`tff-apps score` across sites: open the party's CSV (its export scores every row; the
        IDs are the session's PSI set), or, at the lender, write the probabilities of z."""
        step = body.get("step")
        if step == "open":
            if not isinstance(body.get("input"), str) or not isinstance(body.get("model_run"), str):
                raise wire.WireError("Score open: the message needs input and model_run")
            run.ids, bound = self._party.open_scoring(job.run_id, body["model_run"], body["input"])
            return {"rows": int(len(run.ids)), "score_bound": bound}
        if step == "write" and self._party.is_lender:
            z = np.frombuffer(wire.unb64(body.get("z"), "z"), "<f4")
            return {"rows": self._party.write_scores(job.run_id, z, str(body.get("output", "")))}
        raise ProtocolError(f"site {self._site}: Score step {step!r} is not open (or write, at the lender)")

    def _align_lender(self, run: _Run, body: dict, job: Job) -> dict:
        partners = body.get("partners")
        if not isinstance(partners, list) or not partners or any(p not in run.shared for p in partners):
            raise ProtocolError(f"site {self._site}: Align needs the PSI with every partner first (run {job.run_id})")
        common = set.intersection(*(set(run.shared[p].tolist()) for p in partners))
        if not common:
            raise UserError(f"site {self._site}: PSI: no customer is held by every party; check the ID columns")
        keep = {p: np.isin(run.shared[p], list(common)) for p in partners}
        rows = run.shared[partners[0]][keep[partners[0]]]  # ordered by normalized ID, as every pairwise list
        kept = {p: bits_to_json(k) for p, k in keep.items()}
        if run.ids is not None:  # a scoring session
            return {"keep": kept, "rows": self._party.align_scoring(job.run_id, rows)}
        train, test = party_split(party=self._party, rows=rows, body=body)
        encoded = self._party.encode(job.run_id, rows, train, test)
        return {"keep": kept, "train": train.tolist(), "test": test.tolist(), "encoded": encoded}


def party_split(party, rows: np.ndarray, body: dict) -> tuple[np.ndarray, np.ndarray]:
    """The lender's held-out split of the aligned customers (the job's test fraction and seed)."""
    fraction, seed = body.get("test_fraction"), body.get("seed")
    if not isinstance(fraction, (int, float)) or not isinstance(seed, int):
        raise wire.WireError("Align: the lender needs test_fraction and seed")
    return party.split(rows, float(fraction), seed)


def refusal_code(err: Exception) -> str | None:
    """The gRPC status name for an error of `handle`, or None if it is not one of its own."""
    if isinstance(err, (wire.WireError, UserError)):
        return "INVALID_ARGUMENT"
    if isinstance(err, ProtocolError):
        return "FAILED_PRECONDITION"
    return None
