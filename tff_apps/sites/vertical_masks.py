"""Pairwise masks for the vertical secure sum across sites, made by each party's gateway.

Across sites TFF's open runtime runs `federated_secure_sum_bitwidth` as a plain sum at the
coordinator, so without masks the coordinator would see every party's fixed-point partial
scores. Each party instead adds a mask before its values leave its worker:

    m_i = sum_{j > i} PRG(s_ij, purpose) - sum_{j < i} PRG(s_ij, purpose)   (mod 2^bits)

with s_ij = HKDF(X25519(sk_i, pk_j)) the seed parties i and j agree on (the same for both
ends), PRG = ChaCha20 keystream (`shared.secagg_ring.prg_words`), 2^bits the ring the sum of
all parties' values fits in. The masks of all parties add up to 0 mod 2^bits, so the decoded
sum is exact; any one party's masked values are uniform in the ring to whoever lacks its
pair seeds. Unlike Bonawitz et al. (`shared.secagg`) there is no self-mask and no secret
sharing: in vertical FL every party is needed for every batch (a party that drops stops the
run, which resumes from its checkpoint), so there is no dropout to recover from.

`purpose` names one use of the masks (`train-e3`: epoch 3's training rows, `test-e3`: the
held-out rows scored with epoch 3's weights, `score`: a scoring session); one mask is never
used on two different vectors: within a purpose a party's values are fixed by its state
(a resumed epoch replays the same values), and each run (and scoring session) has its own
key pair. Threat model: a semi-honest coordinator (it relays the public keys; a coordinator
that swaps them, or reuses a purpose on other weights, is outside it). The private key is a
file in the run's folder at the site, never sent; the coordinator gets the public key only.

The mask file (`masks-<purpose>.i64`, little-endian int64 ring elements in the purpose's row
order) is read by the party's TensorFlow on its worker (`learning.vertical_sites`).
Does not import TensorFlow.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from shared import secagg_wire as wire
from shared.secagg_ring import SecAggConfig, hkdf, pair_label, prg_words, private_bytes, public_bytes

KEY_FILE = "mask_key"
PURPOSE = re.compile(r"(train|test)-e\d{1,9}|score")
MAX_BITS = 56  # P values below 2^56 add up in int64 for P < 128 parties
MAX_LENGTH = 10**9


def mask_file(purpose: str) -> str:
    return f"masks-{purpose}.i64"


def public_key(folder: Path) -> bytes:
    """The party's public key for the run whose folder this is (the key pair made on first use)."""
    return public_bytes(_private_key(folder))


def _private_key(folder: Path) -> X25519PrivateKey:
    path = folder / KEY_FILE
    if not path.exists():
        partial = path.with_name(KEY_FILE + ".partial")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as out:
            out.write(private_bytes(X25519PrivateKey.generate()))
        os.replace(partial, path)
    return X25519PrivateKey.from_private_bytes(path.read_bytes())


def party_mask(own: X25519PrivateKey, keys: list[bytes], index: int, purpose: str, length: int,
               bits: int) -> np.ndarray:
    """m_index (module docstring) as ring elements in [0, 2^bits)."""
    ring = SecAggConfig(n_clients=len(keys), threshold=len(keys), bound=1.0, scale_bits=0, ring_bits=bits,
                        modular=True)
    total = np.zeros(length, ring.dtype)
    for peer, key in enumerate(keys):
        if peer == index:
            continue
        shared = own.exchange(X25519PublicKey.from_public_bytes(key))
        seed = hkdf(shared, b"/vertical-pair-seed/" + pair_label(index, peer))
        words = prg_words(seed, purpose.encode(), length, ring)
        total = total + words if index < peer else total - words  # wraps in the word's ring
    return ring.reduce(total)


def write_masks(folder: Path, body: dict) -> dict:
    """The gateway's `Masks` write step: checks the request, writes the party's mask file."""
    keys, index, purpose, length, bits = _checked(body)
    own = _private_key(folder)
    if keys[index] != public_bytes(own):
        raise wire.WireError(f"Masks: key {index} of the list is not this party's key for the run")
    masks = party_mask(own, keys, index, purpose, length, bits)
    path = folder / mask_file(purpose)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(masks.astype("<i8").tobytes())
    os.replace(partial, path)
    return {"file": path.name}


def _checked(body: dict) -> tuple[list[bytes], int, str, int, int]:
    raw, index, purpose = body.get("keys"), body.get("index"), body.get("purpose")
    length, bits = body.get("length"), body.get("bits")
    if not isinstance(raw, list) or len(raw) < 2:
        raise wire.WireError("Masks: keys must list every party's public key (at least 2)")
    keys = [wire.unb64(key, "public key") for key in raw]
    if len(set(keys)) != len(keys) or any(len(key) != 32 for key in keys):
        raise wire.WireError("Masks: the public keys must be distinct 32-byte X25519 keys")
    if not isinstance(index, int) or not 0 <= index < len(keys):
        raise wire.WireError(f"Masks: index must be this party's position in keys (0..{len(keys) - 1})")
    if not isinstance(purpose, str) or not PURPOSE.fullmatch(purpose):
        raise wire.WireError("Masks: purpose must be train-e<N>, test-e<N> or score")
    if not isinstance(length, int) or not 0 < length <= MAX_LENGTH:
        raise wire.WireError(f"Masks: length must be a row count in 1..{MAX_LENGTH}")
    if not isinstance(bits, int) or not 2 <= bits <= MAX_BITS:
        raise wire.WireError(f"Masks: bits must be in 2..{MAX_BITS}")
    return keys, index, purpose, length, bits
