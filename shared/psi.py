"""Two-party private set intersection (ECDH-PSI on ristretto255) to align vertical-FL rows.

A lender and a data partner each hold a table keyed by customer ID. Vertical federated
learning needs the rows of the customers they share, in the same order on both sides,
without either party learning the other's non-shared IDs (not even hashes of them).
This is the Diffie-Hellman PSI of FATE's ECDH-PSI and NVFlare's DH-PSI, in the prime-order
group ristretto255 (RFC 9496) from libsodium, through the `rbcl` bindings (which bundle
libsodium); the hashes are SHA-256 and SHA-512 from `hashlib`. No primitive is home-made.

Normalization (`normalize_id`)
------------------------------
IDs are strings (Python or NumPy integers are accepted and written in decimal; floats,
missing values and other types are refused, because ``1.0`` and ``"1"`` would silently
differ). A raw ID is NFKC-normalized, stripped of surrounding whitespace, case-folded,
and NFKC-normalized once more. The last NFKC makes the rule idempotent: without it,
about 50 strings (e.g. ``"ß" + U+0301``) normalize to a key that normalizes again to a
different key, so a party that pre-normalized its IDs would miss matches. Examples:
``"  Cust-01 "`` -> ``"cust-01"``; full-width ``"ＣＵＳＴ－０１"`` -> ``"cust-01"``.
An ID that is empty after normalization, or two rows of one party with the same
normalized ID, is a `UserError` naming the party and the rows.

Protocol (semi-honest parties; A = initiator, the lender; B = responder, the partner)
----------------------------------------------------------------------------------
1. Salt. A sends 16 random bytes s_A, B sends 16 random bytes s_B;
   both compute ``salt = SHA-256(s_A || s_B)``. Blinded values are bound to the session.
2. Hash to the group. ``H(x) = from_hash(SHA-512(b"tff-apps-psi-v2" || salt ||
   utf8(normalize(x))))``, where ``from_hash`` is libsodium's
   ``crypto_core_ristretto255_from_hash``: RFC 9496's element derivation from 64 uniform
   bytes (two Elligator maps, added), so H behaves as a random oracle into the group
   (`hash_to_group`). ristretto255 has prime order
   L = 2^252 + 27742317777372353535851937790883648493: no cofactor, no twist, and each
   element has exactly one 32-byte encoding.
3. Blind. Each party draws a fresh secret scalar a, uniform in [1, L)
   (``crypto_core_ristretto255_scalar_random``, `random_scalar`), computes ``a·H(x_i)``
   (``crypto_scalarmult_ristretto255``, `blind`) for its own IDs, shuffles that list with
   a secret random permutation, and sends it ("blinded"). Scalar multiplication in one
   group commutes: ``a·(b·P) = b·(a·P) = (ab)·P``.
4. Double-blind. Each party checks every value it received (`is_group_element`: the
   canonical RFC 9496 encoding of a group element other than the identity; anything
   else is a protocol violation and raises a `RuntimeError` naming the message and the
   index), multiplies it by its own scalar and returns the list IN THE ORDER RECEIVED
   ("double_blinded"). It keeps these values: they are the double-blinded values of the
   other party's set.
5. Intersect. Each party checks the returned values the same way, un-shuffles them, so
   it holds ``a·b·H(x_i)`` for each of its own rows i, and keeps the rows whose value is
   among the double-blinded values of the other party's set. Both parties then order
   their shared rows by the normalized ID, which each knows for its own rows, so both
   end in the same order without further messages, and the order is the same in every
   session.

Messages, in order: salt A->B, salt B->A, blinded A->B, blinded B->A,
double_blinded B->A, double_blinded A->B. Bytes exchanged:
``32 + 64 · (n_A + n_B)`` (16 per salt share, 32 per element per pass, two passes).
Hashing, checks and multiplications run in one thread per CPU (rbcl calls libsodium
through ctypes, which releases the GIL).

What each party learns: its own rows that are shared (hence the intersection size),
the other party's set size, the session salt, and the double-blinded values of both
sets. The group has prime order, so every element other than the identity generates
it, and for a uniform secret scalar a, ``a·H(x)`` is a uniform non-identity element
whatever x is: no public test (like X25519's curve-or-twist test on a raw hash, which
blinding preserved) splits the blinded values by a property of the IDs. Under the
decisional Diffie-Hellman assumption in ristretto255, with H a random oracle, the
singly- and doubly-blinded values of the other party's non-shared IDs look random:
without the other party's scalar they cannot be linked to any ID or hash, and fresh
scalars and salt make them unlinkable across sessions. Each party checks every element
it receives, so a malformed or tampered message stops the protocol instead of being
multiplied or matched. Because each party shuffles what it sends, neither learns the
other's row numbers of the shared customers.
Limits: this is security against semi-honest parties. A party that stuffs its list
with guessed IDs learns which guesses the other holds (inherent in any PSI; bound the
list size by contract or audit); the protocol does not prove the parties used the
same IDs as in their tables.

`intersect` runs both parties in this process through `PsiParty` objects; the only
things that cross between them are `Message` objects, recorded in the transcript.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import rbcl

from shared.errors import UserError

DOMAIN = b"tff-apps-psi-v2"
PROTOCOL = "ECDH-PSI on ristretto255 (shared.psi)"
SALT_SHARE_BYTES = 16
POINT_BYTES = 32  # a ristretto255 element
NORMALIZATION = "normalization: NFKC, surrounding whitespace stripped, case-folded, NFKC again"
IDENTITY = bytes(POINT_BYTES)  # the encoding of the identity element, never a valid message value

# progress(step_name, done, total), called after each chunk of a long step.
Progress = Callable[[str, int, int], None]
_CHUNK = 10_000
_WORKERS = max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 16))
_MAX_ROWS_SHOWN = 5
_MAX_ID_CHARS = 60


@dataclass(frozen=True)
class Message:
    """One message between the parties. `payload` is bytes, or a list of 32-byte values."""

    sender: str
    receiver: str
    kind: str
    payload: bytes | list[bytes]

    @property
    def size(self) -> int:
        """Bytes on the wire for the payload (framing not counted)."""
        if isinstance(self.payload, bytes):
            return len(self.payload)
        return sum(map(len, self.payload))


@dataclass
class PsiResult:
    rows_a: np.ndarray  # indices into party A's ID list, in the common order
    rows_b: np.ndarray  # indices into party B's ID list; rows_a[k], rows_b[k]: same customer
    match_count: int
    match_rate_a: float  # match_count / len(ids_a)
    match_rate_b: float  # match_count / len(ids_b)
    seconds: float
    bytes_exchanged: int  # sum of the payload sizes of every message in the transcript
    transcript: list[Message]  # every message sent, in order


# --- normalization ----------------------------------------------------------------


def normalize_id(raw: object) -> str:
    """The documented key of a customer ID (see the module docstring).

    Returns "" for an ID that is blank after normalization; `intersect` refuses those.
    """
    if isinstance(raw, str):
        if raw.isascii():  # NFKC is the identity on ASCII: same result, faster
            return raw.strip().lower()
        text = unicodedata.normalize("NFKC", raw).strip().casefold()
        return unicodedata.normalize("NFKC", text)
    if isinstance(raw, (int, np.integer)) and not isinstance(raw, (bool, np.bool_)):
        return str(int(raw))
    if _is_missing(raw):
        raise UserError(f"PSI: a customer ID is missing ({raw!r}); fill in or drop the rows without an ID")
    raise UserError(
        f"PSI: a customer ID is a {type(raw).__name__} ({_short(raw)}), expected a string or an "
        "integer; convert the ID column to strings, e.g. df[column].astype(str)"
    )


def _is_missing(raw: object) -> bool:
    try:
        return bool(pd.isna(raw))
    except (TypeError, ValueError):  # array-like values are not "missing", just wrong
        return False


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_ID_CHARS else text[: _MAX_ID_CHARS - 3] + "..."


def _rows_text(rows: list[int]) -> str:
    shown = ", ".join(map(str, rows[:_MAX_ROWS_SHOWN]))
    return shown + (f" and {len(rows) - _MAX_ROWS_SHOWN} more" if len(rows) > _MAX_ROWS_SHOWN else "")


def _normalize_party_ids(ids: Sequence, party: str) -> list[str]:
    """Normalized IDs of one party, refusing blank, non-string and duplicate IDs."""
    if isinstance(ids, (str, bytes)):
        raise UserError(f"PSI: the {party}'s IDs are one {type(ids).__name__}, expected a sequence of IDs (one per row)")
    values = list(ids)
    if not values:
        raise UserError(f"PSI: the {party}'s ID list is empty; pass the ID column of its table")
    normalized = []
    append = normalized.append
    for row, raw in enumerate(values):
        if type(raw) is str and raw.isascii():
            append(raw.strip().lower())
            continue
        try:
            append(normalize_id(raw))
        except UserError as error:
            message = str(error).removeprefix("PSI: a customer ID")
            raise UserError(f"PSI: the {party}'s customer ID at row {row} (0-based){message}") from None
    blank = [row for row, key in enumerate(normalized) if not key]
    if blank:
        raise UserError(
            f"PSI: the {party}'s customer ID is empty after normalization at row(s) {_rows_text(blank)} "
            f"(0-based; {NORMALIZATION}); fill in or drop the rows without an ID"
        )
    if len(set(normalized)) != len(normalized):
        raise UserError(_duplicate_message(normalized, party))
    return normalized


def _duplicate_message(normalized: list[str], party: str) -> str:
    rows_of: dict[str, list[int]] = {}
    for row, key in enumerate(normalized):
        rows_of.setdefault(key, []).append(row)
    duplicated = [(key, rows) for key, rows in rows_of.items() if len(rows) > 1]
    key, rows = duplicated[0]  # the first duplicated ID by first row, since dicts keep order
    more = f" ({len(duplicated) - 1} more IDs are duplicated)" if len(duplicated) > 1 else ""
    return (
        f"PSI: the {party}'s customer ID {_short(key)} appears at rows {_rows_text(rows)} (0-based; "
        f"{NORMALIZATION}){more}; each customer must appear once, so merge or drop the duplicate rows"
    )


# --- the group: ristretto255 from libsodium, through rbcl --------------------------


def _remove_library_copy() -> None:
    """Delete the copy of libsodium that rbcl writes to the temp folder on import.

    rbcl loads its bundled libsodium from a temporary file that it never removes (about
    2.7 MB per process); once loaded, the mapping no longer needs the file.
    """
    path = getattr(sys.modules.get("rbcl._sodium"), "lib_path", None)
    if isinstance(path, str):
        with contextlib.suppress(OSError):  # e.g. Windows, where a loaded library stays locked
            os.unlink(path)


_remove_library_copy()
assert rbcl.crypto_core_ristretto255_BYTES == rbcl.crypto_scalarmult_ristretto255_BYTES == POINT_BYTES
_from_hash = rbcl.crypto_core_ristretto255_from_hash
_is_valid_point = rbcl.crypto_core_ristretto255_is_valid_point
_scalarmult = rbcl.crypto_scalarmult_ristretto255


def hash_to_group(normalized: str, salt: bytes) -> bytes:
    """H(x): the ristretto255 element of a normalized ID in a session (module docstring, step 2)."""
    digest = hashlib.sha512(DOMAIN + salt + normalized.encode("utf-8", "surrogatepass")).digest()
    return _from_hash(digest)


def random_scalar() -> bytes:
    """A fresh secret scalar, uniform in [1, L) (libsodium never returns zero)."""
    return rbcl.crypto_core_ristretto255_scalar_random()


def blind(scalar: bytes, element: bytes) -> bytes:
    """scalar·element in ristretto255; libsodium refuses an invalid element or an identity result."""
    return _scalarmult(scalar, element)


def is_group_element(value: object) -> bool:
    """True for the canonical 32-byte encoding of a ristretto255 element other than the identity."""
    return isinstance(value, bytes) and len(value) == POINT_BYTES and _is_element(value)


def _is_element(value: bytes) -> bool:
    # libsodium 1.0.18 (bundled in rbcl) ignores bit 255 when decoding, so a value with it set
    # would be a second encoding of an element; RFC 9496 rejects it, and so do we.
    return value[-1] < 0x80 and value != IDENTITY and _is_valid_point(value)


def _check_elements(values: list[bytes], message: Message, start: int) -> None:
    for offset, value in enumerate(values):
        if not _is_element(value):
            raise RuntimeError(
                f"PSI: {message.kind} message from {message.sender} holds an invalid element at index "
                f"{start + offset} (0-based): not the canonical encoding of a ristretto255 group element "
                "other than the identity. This is a protocol violation (a corrupted or tampered message), "
                "not a problem with the IDs; rerun the alignment"
            )


def _check_values(message: Message, expected_count: int | None) -> list[bytes]:
    """The message's values, if it is a list of 32-byte strings of the expected length."""
    values = message.payload
    if not isinstance(values, list) or any(type(value) is not bytes or len(value) != POINT_BYTES for value in values):
        raise RuntimeError(f"PSI: {message.kind} message from {message.sender} is not a list of 32-byte values")
    if expected_count is not None and len(values) != expected_count:
        raise RuntimeError(
            f"PSI: {message.sender} returned {len(values)} double-blinded values for the {expected_count} sent"
        )
    return values


def _map_chunks(
    work: Callable[[int, list], list], items: list, step: str | None, progress: Progress | None
) -> list:
    """work(start, items[start:end]) over chunks of items, in threads, results concatenated in order.

    ctypes releases the GIL while libsodium runs, so one thread per CPU works in parallel.
    Chunks are at most `_CHUNK` long; progress(step, done, total) follows each chunk, in order.
    """
    total = len(items)
    size = max(1, min(_CHUNK, -(-total // _WORKERS)))
    chunks = [(start, items[start : start + size]) for start in range(0, total, size)]
    out: list = []
    with ThreadPoolExecutor(max_workers=max(1, min(_WORKERS, len(chunks)))) as pool:
        for result in pool.map(lambda chunk: work(*chunk), chunks):
            out.extend(result)
            if progress is not None and step is not None:
                progress(step, len(out), total)
    return out


# --- one party --------------------------------------------------------------------


class PsiParty:
    """One side of the protocol: its own IDs, secret scalar, salt share and secret shuffle.

    Call the steps in this order (see `run_protocol`): `salt_message`, `receive_salt`,
    `blinded_message`, `double_blind`, `receive_double_blinded`, `shared_rows`.
    A party reads only its own attributes and the `Message` objects handed to it.
    """

    def __init__(self, name: str, ids: Sequence, *, initiator: bool, progress: Progress | None = None):
        self.name = name
        self.initiator = initiator
        self._ids = _normalize_party_ids(ids, name)
        self._scalar = random_scalar()
        self._progress = progress
        self._salt_share = os.urandom(SALT_SHARE_BYTES)
        self._salt: bytes | None = None
        self._order: np.ndarray | None = None  # secret shuffle: sent position -> own row
        self._other_double: set[bytes] | None = None  # double-blinded values of the other set
        self._own_double: list[bytes] | None = None  # a·b·H(x_i) for own row i

    def __len__(self) -> int:
        return len(self._ids)

    def salt_message(self, receiver: str) -> Message:
        return Message(self.name, receiver, "salt", self._salt_share)

    def receive_salt(self, message: Message) -> None:
        self._expect(message, "salt")
        if not isinstance(message.payload, bytes) or len(message.payload) != SALT_SHARE_BYTES:
            raise RuntimeError(f"PSI: salt share from {message.sender} is not {SALT_SHARE_BYTES} bytes")
        first, second = (self._salt_share, message.payload) if self.initiator else (message.payload, self._salt_share)
        self._salt = hashlib.sha256(first + second).digest()

    def blinded_message(self, receiver: str) -> Message:
        """Own IDs hashed to the group, blinded with the secret scalar, in a secret random order."""
        salt = self._salt
        if salt is None:
            raise RuntimeError("PSI: blinded_message called before the salt exchange")
        # A uniformly random permutation from the OS CSPRNG (64-bit random sort keys).
        keys = np.frombuffer(os.urandom(8 * len(self._ids)), dtype=np.uint64)
        self._order = np.argsort(keys, kind="stable")
        shuffled = [self._ids[row] for row in self._order.tolist()]
        scalar = self._scalar

        def work(start: int, chunk: list[str]) -> list[bytes]:
            return [blind(scalar, hash_to_group(key, salt)) for key in chunk]

        blinded = _map_chunks(work, shuffled, f"{self.name}: blind own IDs", self._progress)
        return Message(self.name, receiver, "blinded", blinded)

    def double_blind(self, message: Message) -> Message:
        """The other party's blinded elements, checked, times own scalar, in the order received."""
        self._expect(message, "blinded")
        values = _check_values(message, None)
        scalar = self._scalar

        def work(start: int, chunk: list[bytes]) -> list[bytes]:
            _check_elements(chunk, message, start)
            return [blind(scalar, value) for value in chunk]

        doubled = _map_chunks(work, values, f"{self.name}: double-blind {message.sender}'s IDs", self._progress)
        self._other_double = set(doubled)
        return Message(self.name, message.sender, "double_blinded", doubled)

    def receive_double_blinded(self, message: Message) -> None:
        self._expect(message, "double_blinded")
        if self._order is None:
            raise RuntimeError("PSI: double-blinded values arrived before this party sent its own")
        values = _check_values(message, len(self._ids))

        def work(start: int, chunk: list[bytes]) -> list[bytes]:
            _check_elements(chunk, message, start)
            return chunk

        _map_chunks(work, values, None, None)
        own = [b""] * len(values)
        for position, row in enumerate(self._order.tolist()):
            own[row] = values[position]
        self._own_double = own

    def shared_rows(self) -> np.ndarray:
        """Own rows whose customer the other party also holds, ordered by normalized ID."""
        if self._own_double is None or self._other_double is None:
            raise RuntimeError("PSI: shared_rows called before both double-blinded lists were exchanged")
        other = self._other_double
        rows = [row for row, value in enumerate(self._own_double) if value in other]
        ids = self._ids
        rows.sort(key=ids.__getitem__)
        return np.asarray(rows, dtype=np.int64)

    def _expect(self, message: Message, kind: str) -> None:
        if message.receiver != self.name or message.kind != kind:
            raise RuntimeError(
                f"PSI: {self.name} expected a {kind} message addressed to it, "
                f"got {message.kind} for {message.receiver} from {message.sender}"
            )


# --- both parties, in this process -------------------------------------------------


def run_protocol(initiator: PsiParty, responder: PsiParty) -> list[Message]:
    """Run every step between two parties; returns the transcript (every message, in order)."""
    transcript: list[Message] = []

    def send(message: Message) -> Message:
        transcript.append(message)
        return message

    a, b = initiator, responder
    salt_a = send(a.salt_message(b.name))
    salt_b = send(b.salt_message(a.name))
    a.receive_salt(salt_b)
    b.receive_salt(salt_a)
    blinded_a = send(a.blinded_message(b.name))
    blinded_b = send(b.blinded_message(a.name))
    a.receive_double_blinded(send(b.double_blind(blinded_a)))
    b.receive_double_blinded(send(a.double_blind(blinded_b)))
    return transcript


def intersect(
    ids_a: Sequence,
    ids_b: Sequence,
    *,
    party_a: str = "lender",
    party_b: str = "partner",
    progress: Progress | None = None,
) -> PsiResult:
    """Align two parties' rows on their shared customer IDs by ECDH-PSI (module docstring).

    Returns, per party, the indices of its shared rows in one common order (sorted by
    normalized ID), so `ids_a[rows_a[k]]` and `ids_b[rows_b[k]]` are the same customer.
    """
    if party_a == party_b:
        raise UserError(f"PSI: both parties are named {party_a!r}; give the two parties different names")
    start = time.perf_counter()
    first = PsiParty(party_a, ids_a, initiator=True, progress=progress)
    second = PsiParty(party_b, ids_b, initiator=False, progress=progress)
    transcript = run_protocol(first, second)
    rows_a, rows_b = first.shared_rows(), second.shared_rows()
    seconds = time.perf_counter() - start
    if len(rows_a) != len(rows_b):
        raise RuntimeError(f"PSI: the parties disagree on the intersection size ({len(rows_a)} vs {len(rows_b)})")
    if len(rows_a) == 0:
        raise UserError(
            f"PSI: the {party_a} and the {party_b} share no customer ID; check that both ID columns "
            f"hold the same identifiers ({NORMALIZATION})"
        )
    count = len(rows_a)
    return PsiResult(
        rows_a=rows_a,
        rows_b=rows_b,
        match_count=count,
        match_rate_a=count / len(first),
        match_rate_b=count / len(second),
        seconds=seconds,
        bytes_exchanged=sum(message.size for message in transcript),
        transcript=transcript,
    )


def expected_bytes(n_a: int, n_b: int) -> int:
    """Bytes exchanged for sets of n_a and n_b IDs: two salt shares, two passes of 32-byte values."""
    return 2 * SALT_SHARE_BYTES + 2 * POINT_BYTES * (n_a + n_b)
