"""Tests for shared.psi: ECDH-PSI on ristretto255 for aligning vertical-FL rows."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pandas as pd
import pytest
import rbcl

from shared.errors import UserError
from shared.psi import (
    Message,
    PsiParty,
    blind,
    expected_bytes,
    hash_to_group,
    intersect,
    is_group_element,
    normalize_id,
    random_scalar,
    run_protocol,
)

N = 2_000
OVERLAP = 0.8


def overlapping_ids(n: int, overlap: float, seed: int) -> tuple[list[str], list[str], set[str]]:
    """Two shuffled ID lists of n each sharing round(overlap * n) IDs; IDs are >= 16 characters."""
    rng = np.random.default_rng(seed)
    shared = round(overlap * n)
    pool = [f"customer-{value:012d}" for value in rng.choice(10**12, size=2 * n - shared, replace=False)]
    ids_a = pool[:n]
    ids_b = pool[:shared] + pool[n:]
    rng.shuffle(ids_a)
    rng.shuffle(ids_b)
    return ids_a, ids_b, set(pool[:shared])


@pytest.fixture(scope="module")
def aligned():
    ids_a, ids_b, truth = overlapping_ids(N, OVERLAP, seed=1)
    return ids_a, ids_b, truth, intersect(ids_a, ids_b)


def session_salt(transcript: list[Message]) -> bytes:
    """The documented salt, recomputed from the two salt messages (initiator's share first)."""
    shares = [message.payload for message in transcript if message.kind == "salt"]
    assert len(shares) == 2 and all(len(share) == 16 for share in shares)
    return hashlib.sha256(shares[0] + shares[1]).digest()


def digest(normalized: str, salt: bytes) -> bytes:
    """The documented 64 bytes behind H(id): SHA-512("tff-apps-psi-v2" || salt || utf8(normalized id))."""
    return hashlib.sha512(b"tff-apps-psi-v2" + salt + normalized.encode()).digest()


def point(normalized: str, salt: bytes) -> bytes:
    """H(id) as documented, through libsodium directly: ristretto255 from_hash of the digest."""
    return rbcl.crypto_core_ristretto255_from_hash(digest(normalized, salt))


def times(scalar: bytes, element: bytes) -> bytes:
    """scalar·element, through libsodium directly (a reference independent of shared.psi)."""
    return rbcl.crypto_scalarmult_ristretto255(scalar, element)


def payload_chunks(transcript: list[Message]) -> list[bytes]:
    chunks = []
    for message in transcript:
        chunks.extend([message.payload] if isinstance(message.payload, bytes) else message.payload)
    return chunks


# --- correctness ------------------------------------------------------------------


def test_finds_exactly_the_true_intersection(aligned):
    ids_a, ids_b, truth, result = aligned
    assert {ids_a[row] for row in result.rows_a} == truth
    assert {ids_b[row] for row in result.rows_b} == truth
    assert result.match_count == len(truth) == 1_600
    assert len(set(result.rows_a.tolist())) == len(result.rows_a)  # no row twice


def test_rows_align_in_one_common_order(aligned):
    ids_a, ids_b, _, result = aligned
    assert result.rows_a.dtype == np.int64 and result.rows_b.dtype == np.int64
    assert [ids_a[row] for row in result.rows_a] == [ids_b[row] for row in result.rows_b]
    # The common order is by normalized ID, which each party knows for its own rows.
    in_order = [normalize_id(ids_a[row]) for row in result.rows_a]
    assert in_order == sorted(in_order)


def test_match_rates_and_timing(aligned):
    _, _, _, result = aligned
    assert result.match_rate_a == pytest.approx(0.8)
    assert result.match_rate_b == pytest.approx(0.8)
    assert result.seconds > 0


def test_unequal_sizes_and_pandas_and_integer_ids():
    ids_a = pd.Series([f"id-{i}" for i in range(300)])
    ids_b = np.array([f"ID-{i}" for i in range(250, 1000)])
    result = intersect(ids_a, ids_b, party_a="bank", party_b="telco")
    assert result.match_count == 50
    assert result.match_rate_a == pytest.approx(50 / 300)
    assert result.match_rate_b == pytest.approx(50 / 750)
    assert [ids_a[row] for row in result.rows_a] == [ids_b[row].lower() for row in result.rows_b]

    numbers = intersect(np.arange(10, dtype=np.int64), ["7", "8", " 9 ", "10"])
    assert numbers.rows_a.tolist() == [7, 8, 9] and numbers.rows_b.tolist() == [0, 1, 2]


def test_hash_to_group_is_the_documented_ristretto255_derivation():
    salt = os.urandom(32)
    for key in ["cust-01", "straße", "s\u015b", "42"]:
        assert hash_to_group(key, salt) == point(key, salt)
        assert hash_to_group(key, salt) != hash_to_group(key, os.urandom(32))  # bound to the session salt


def test_blinding_commutes_with_the_modules_own_functions():
    """The protocol's premise: a·(b·H(x)) == b·(a·H(x)), and both equal (ab)·H(x)."""
    salt = os.urandom(32)
    for i in range(50):
        a, b = random_scalar(), random_scalar()
        assert a != b and any(a) and any(b)
        element = hash_to_group(f"customer-{i}", salt)
        ab = blind(a, blind(b, element))
        assert ab == blind(b, blind(a, element))
        assert ab == times(rbcl.crypto_core_ristretto255_scalar_mul(a, b), element)
        assert ab != blind(a, element) != element and is_group_element(ab)
    # Blinding is a bijection (an inverse scalar undoes it): nothing is lost or merged.
    a = random_scalar()
    assert blind(rbcl.crypto_core_ristretto255_scalar_invert(a), blind(a, element)) == element


# --- normalization ----------------------------------------------------------------


def test_normalization_trims_and_casefolds():
    assert normalize_id("  Cust-01 ") == "cust-01"
    assert normalize_id("\tSTRASSE\n") == "strasse"
    assert normalize_id("Straße") == "strasse"  # casefold, not lower
    result = intersect(["  Cust-01 ", "other-1"], ["cust-01", "other-2"])
    assert result.rows_a.tolist() == [0] and result.rows_b.tolist() == [0]


def test_normalization_nfkc_full_width_and_compatibility_forms():
    full_width = "ＣＵＳＴ－０１"  # full-width letters, hyphen and digits (U+FF23 ...)
    assert normalize_id(full_width) == "cust-01"
    assert normalize_id("\u3000cust\u201101\u00a0") == "cust\u201001"  # ideographic/no-break spaces trimmed
    assert normalize_id("ﬁle-①") == "file-1"  # ligature and circled digit
    assert normalize_id("Cafe\u0301") == normalize_id("Café")  # composed and decomposed accents
    result = intersect([full_width, "x-1"], ["cust-01", "x-2"])
    assert result.rows_a.tolist() == [0] and result.rows_b.tolist() == [0]


def test_normalization_is_idempotent_where_plain_nfkc_casefold_is_not():
    raw = "\u00df\u0301"  # ß + combining acute: casefold gives "ss" + U+0301, which NFKC composes to "sś"
    once = normalize_id(raw)
    assert normalize_id(once) == once == "s\u015b"
    for sample in ["ǰ", "ΐ", "ﬃ", "  Ａｂｃ  ", "İstanbul", "\u1e9e\u0301"]:
        assert normalize_id(normalize_id(sample)) == normalize_id(sample)


def test_integer_ids_are_decimal_strings_and_other_types_refused():
    assert normalize_id(42) == "42" and normalize_id(np.int32(-7)) == "-7"
    with pytest.raises(UserError, match="float"):
        normalize_id(1.0)
    with pytest.raises(UserError, match="bool"):
        normalize_id(True)
    with pytest.raises(UserError, match="missing"):
        normalize_id(None)


# --- transcript privacy -----------------------------------------------------------


def test_transcript_holds_no_id_hash_or_fragment_of_either(aligned):
    ids_a, ids_b, _, result = aligned
    chunks = payload_chunks(result.transcript)
    salt = session_salt(result.transcript)
    normalized = [normalize_id(raw) for raw in ids_a + ids_b]

    # No raw or normalized ID (all >= 16 characters) inside any payload.
    texts = {raw.encode() for raw in ids_a + ids_b} | {key.encode() for key in normalized}
    assert all(len(text) >= 16 for text in texts)
    for chunk in chunks:
        assert not any(text in chunk for text in texts)
    blob = b"".join(chunks)
    for text in texts:  # nor across payload boundaries
        assert text not in blob

    # No hash of an ID, salted (the protocol's h) or not, and no 8-byte piece of an ID or of a hash
    # (a whole hash or ID would contain such a piece).
    hashes = []
    for key in normalized:
        hashes += [
            point(key, salt),
            digest(key, salt),
            hashlib.sha256(key.encode()).digest(),
            hashlib.sha512(key.encode()).digest(),
            hashlib.sha256(b"tff-apps-psi-v1" + salt + key.encode()).digest(),
        ]
    pieces = {item[i : i + 8] for item in hashes + list(texts) for i in range(len(item) - 7)}
    for chunk in chunks:
        assert not any(chunk[i : i + 8] in pieces for i in range(len(chunk) - 7))


def test_singly_blinded_values_are_links_only_with_the_secret_scalar():
    ids_a, ids_b, truth = overlapping_ids(300, 0.5, seed=3)
    lender = PsiParty("lender", ids_a, initiator=True)
    partner = PsiParty("partner", ids_b, initiator=False)
    transcript = run_protocol(lender, partner)
    assert sorted(ids_a[row] for row in lender.shared_rows()) == sorted(truth)

    salt = session_salt(transcript)
    sent_by_partner = next(m for m in transcript if m.kind == "blinded" and m.sender == "partner").payload
    non_shared = [normalize_id(raw) for raw in ids_b if raw not in truth]
    hashed = [point(key, salt) for key in non_shared]

    # What the lender received is not H(y), nor H(y) under any other scalar ...
    assert not set(hashed) & set(sent_by_partner)
    stranger = random_scalar()
    assert not {times(stranger, h) for h in hashed} & set(sent_by_partner)
    # ... but it is exactly b·H(y) (white-box: the test uses the partner's secret scalar).
    partner_scalar = partner._scalar
    assert {times(partner_scalar, h) for h in hashed} <= set(sent_by_partner)
    # The lender's own double-blinding of those values matches none of its rows.
    lender_scalar = lender._scalar
    assert not {times(lender_scalar, times(partner_scalar, h)) for h in hashed} & set(
        next(m for m in transcript if m.kind == "double_blinded" and m.sender == "partner").payload
    )


def test_sent_lists_are_shuffled_so_row_positions_do_not_leak():
    ids = [f"customer-{i:012d}" for i in range(500)]
    lender = PsiParty("lender", ids, initiator=True)
    partner = PsiParty("partner", ids, initiator=False)
    transcript = run_protocol(lender, partner)
    salt = session_salt(transcript)
    in_row_order = [times(lender._scalar, point(key, salt)) for key in ids]
    sent = next(m for m in transcript if m.kind == "blinded" and m.sender == "lender").payload
    assert sorted(sent) == sorted(in_row_order) and sent != in_row_order


def test_two_sessions_differ_in_every_message_but_give_the_same_alignment():
    ids_a, ids_b, _ = overlapping_ids(500, 0.8, seed=2)
    first, second = intersect(ids_a, ids_b), intersect(ids_a, ids_b)
    np.testing.assert_array_equal(first.rows_a, second.rows_a)
    np.testing.assert_array_equal(first.rows_b, second.rows_b)
    assert session_salt(first.transcript) != session_salt(second.transcript)
    seen_first = set(payload_chunks(first.transcript))
    assert not seen_first & set(payload_chunks(second.transcript))


# --- size accounting --------------------------------------------------------------


def test_bytes_exchanged_is_the_sum_of_payloads_and_32_bytes_per_value_per_pass(aligned):
    _, _, _, result = aligned
    transcript = result.transcript
    assert [(m.sender, m.receiver, m.kind) for m in transcript] == [
        ("lender", "partner", "salt"),
        ("partner", "lender", "salt"),
        ("lender", "partner", "blinded"),
        ("partner", "lender", "blinded"),
        ("partner", "lender", "double_blinded"),
        ("lender", "partner", "double_blinded"),
    ]
    total = sum(len(m.payload) if isinstance(m.payload, bytes) else sum(map(len, m.payload)) for m in transcript)
    assert result.bytes_exchanged == total == expected_bytes(N, N) == 2 * 16 + 2 * 32 * (N + N)
    assert all(len(value) == 32 for m in transcript if isinstance(m.payload, list) for value in m.payload)


def test_progress_callback_reports_each_step_to_completion():
    calls = []
    ids_a, ids_b, _ = overlapping_ids(2_500, 0.5, seed=4)
    intersect(ids_a, ids_b, progress=lambda step, done, total: calls.append((step, done, total)))
    finals = {step: (done, total) for step, done, total in calls}
    assert set(finals) == {
        "lender: blind own IDs",
        "partner: blind own IDs",
        "partner: double-blind lender's IDs",
        "lender: double-blind partner's IDs",
    }
    assert all(done == total == 2_500 for done, total in finals.values())


# --- user errors ------------------------------------------------------------------


def one_line_error(call) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message.startswith("PSI: ")
    return message


def test_duplicate_ids_after_normalization_name_party_rows_and_id():
    message = one_line_error(lambda: intersect(["x", "y"], ["b0", "A1", "b2", " a1"]))
    assert "partner" in message and "'a1'" in message and "rows 1, 3" in message


def test_empty_id_after_normalization_names_party_and_row():
    message = one_line_error(lambda: intersect(["x", " \u3000 ", "z"], ["x"]))
    assert "lender" in message and "row(s) 1" in message and "empty" in message


def test_missing_or_non_string_id_names_party_and_row():
    message = one_line_error(lambda: intersect(["x", "y"], ["x", None]))
    assert "partner" in message and "row 1" in message and "missing" in message
    message = one_line_error(lambda: intersect(["x", 2.0], ["x"]))
    assert "lender" in message and "row 1" in message and "float" in message


def test_empty_intersection_is_a_user_error():
    message = one_line_error(lambda: intersect(["a-1", "a-2"], ["b-1", "b-2"], party_a="bank", party_b="telco"))
    assert message.startswith("PSI: the bank and the telco share no customer ID; check that both ID columns")
    assert "NFKC" in message


def test_empty_lists_same_names_and_bare_strings_are_user_errors():
    assert "lender" in one_line_error(lambda: intersect([], ["x"]))
    assert "different names" in one_line_error(lambda: intersect(["x"], ["x"], party_a="p", party_b="p"))
    assert "sequence" in one_line_error(lambda: intersect("abc", ["a"]))


# --- group elements on the wire (the X25519 twist leak, issue: hash into a prime-order group)


# The order of ristretto255: prime, so every element but the identity has order exactly L.
L = 2**252 + 27742317777372353535851937790883648493


def has_order_l(element: bytes) -> bool:
    """(L-1)·P + P is the identity, i.e. L·P = 0: P lies in the prime-order group."""
    minus = times((L - 1).to_bytes(32, "little"), element)
    return rbcl.crypto_core_ristretto255_add(minus, element) == bytes(32)


def test_every_transmitted_element_is_a_valid_ristretto255_point():
    """X25519 sent raw u-coordinates, about half on the twist, a side anyone could test and
    blinding kept; now every element sent is a canonical encoding in the prime-order group."""
    ids_a, ids_b, truth = overlapping_ids(300, 0.5, seed=5)
    result = intersect(ids_a, ids_b)
    assert {ids_a[row] for row in result.rows_a} == truth
    lists = [m for m in result.transcript if m.kind in ("blinded", "double_blinded")]
    assert len(lists) == 4 and all(len(m.payload) == 300 for m in lists)
    for message in lists:
        for value in message.payload:
            assert type(value) is bytes and len(value) == 32
            assert rbcl.crypto_core_ristretto255_is_valid_point(value) and value != bytes(32)
            assert is_group_element(value)
        assert len(set(message.payload)) == len(message.payload)
    sample = [m.payload[i] for m in lists for i in range(0, 300, 30)]
    assert all(has_order_l(value) for value in sample)


def test_hashing_maps_distinct_ids_to_distinct_valid_points():
    salt = os.urandom(32)
    keys = [f"customer-{i:06d}" for i in range(2_000)]
    keys += [normalize_id(raw) for raw in ["Straße", "ＣＵＳＴ－０１", "7"]]
    elements = [hash_to_group(key, salt) for key in keys]
    assert len(set(elements)) == len(keys)
    assert all(len(e) == 32 and rbcl.crypto_core_ristretto255_is_valid_point(e) and e != bytes(32) for e in elements)
    assert all(has_order_l(e) for e in elements[:50])
    # Each hash is a canonical encoding: random 32-byte strings mostly are not (about 1 in 8 is).
    random_valid = sum(rbcl.crypto_core_ristretto255_is_valid_point(os.urandom(32)) for _ in range(2_000))
    assert 100 < random_valid < 500


def test_is_group_element_refuses_non_canonical_identity_and_wrong_length():
    element = hash_to_group("x", bytes(32))
    assert is_group_element(element)
    assert not is_group_element(b"\xff" * 32)  # not a canonical field element
    assert not is_group_element(bytes(32))  # the identity
    assert not is_group_element(element[:31]) and not is_group_element(bytearray(element))
    # The top bit is never set in a canonical encoding; libsodium 1.0.18 ignores it, the module does not.
    flipped = element[:-1] + bytes([element[-1] | 0x80])
    assert rbcl.crypto_core_ristretto255_is_valid_point(flipped)
    assert not is_group_element(flipped)


def started_pair(ids_a: list[str], ids_b: list[str]) -> tuple[PsiParty, PsiParty, Message, Message]:
    lender = PsiParty("lender", ids_a, initiator=True)
    partner = PsiParty("partner", ids_b, initiator=False)
    lender.receive_salt(partner.salt_message("lender"))
    partner.receive_salt(lender.salt_message("partner"))
    return lender, partner, lender.blinded_message("partner"), partner.blinded_message("lender")


@pytest.mark.parametrize("bad", ["ff", "identity", "odd", "top bit"])
def test_tampered_blinded_message_is_refused_naming_message_and_index(bad):
    lender, _, _, from_partner = started_pair(["x", "y", "z"], ["x", "y", "w"])
    real = from_partner.payload[0]
    bad = {
        "ff": b"\xff" * 32,  # not a canonical field element
        "identity": bytes(32),
        "odd": bytes([1]) + bytes(31),  # a negative field element
        "top bit": real[:-1] + bytes([real[-1] | 0x80]),  # a second encoding of a real element
    }[bad]
    tampered = Message("partner", "lender", "blinded", from_partner.payload[:2] + [bad] + from_partner.payload[2:])
    with pytest.raises(RuntimeError, match=r"^PSI: blinded message from partner holds an invalid element at index 2 "):
        lender.double_blind(tampered)
    assert lender._other_double is None  # nothing was kept
    # The untampered message goes through.
    assert len(lender.double_blind(from_partner).payload) == 3


def test_tampered_double_blinded_message_is_refused_naming_message_and_index():
    lender, partner, from_lender, from_partner = started_pair(["x", "y", "z"], ["x", "y", "w"])
    lender.double_blind(from_partner)
    returned = partner.double_blind(from_lender).payload
    tampered = Message("partner", "lender", "double_blinded", [returned[0], b"\xff" * 32, returned[2]])
    with pytest.raises(RuntimeError, match="double_blinded message from partner holds an invalid element at index 1"):
        lender.receive_double_blinded(tampered)
    too_long = Message("partner", "lender", "double_blinded", [returned[0], b"\x01" * 33, returned[2]])
    with pytest.raises(RuntimeError, match="not a list of 32-byte values"):
        lender.receive_double_blinded(too_long)
    lender.receive_double_blinded(Message("partner", "lender", "double_blinded", returned))
    assert lender.shared_rows().tolist() == [0, 1]
