"""Pairwise-masked secure aggregation (Bonawitz et al., CCS 2017) on numpy vectors.

TFF's open runtime only simulates secure sum (it replaces it by a plain sum). This module
is a real protocol after Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage,
Segal, Seth, "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS 2017): the server learns the sum of the surviving clients' vectors and nothing
else about any single vector, even when some clients drop out mid-protocol.
No primitive is home-made: X25519, HKDF-SHA256, ChaCha20 and ChaCha20-Poly1305 come
from `cryptography`; Shamir secret sharing over GF(2^128) from `pycryptodome`. The only
arithmetic done here is addition in the masking ring Z_{2^k} (numpy uint32 / uint64
wrap-around), which is the protocol's ring, not a primitive.

Quantization (`quantize`, `dequantize`, `quantization_error_bound`)
-------------------------------------------------------------------
Masks live in Z_{2^k} (k = ``ring_bits``, 32 or 64), so inputs are fixed point:
``q(x) = round(clip(x, -bound, bound) * 2**scale_bits)`` as a signed integer in two's
complement mod 2^k. Values outside ``[-bound, bound]`` are CLIPPED, silently and by
design (the sum is then the sum of clipped vectors); NaN or infinite values are refused
with ``ValueError`` (they signal a diverged update that clipping would hide). The sum of
n clients is decoded correctly when it cannot wrap: the config requires
``n_clients * round(bound * 2**scale_bits) <= 2**(k-1) - 1``. Each client's rounding
error is at most ``2**-scale_bits / 2`` per entry, so the dequantized sum of ``m``
clients differs from the exact sum of their clipped inputs by at most
``m * 2**-(scale_bits + 1)`` per entry (for k = 64, plus ``m * bound * 2**-53`` for
converting a 64-bit integer to float64; for k = 32 the conversion is exact).

Rounds (U1 ⊇ U2 ⊇ U3 ⊇ U4 are the clients heard from in each round)
-----------------------------------------------------------------
0. Advertise keys. Client u draws two X25519 key pairs: c_u (to encrypt the shares it
   sends to other clients) and s_u (to agree pairwise mask seeds), and sends
   ``(u, c_u^PK, s_u^PK)``. The server broadcasts the list from U1 (|U1| >= t).
1. Share keys. Client u checks the list (its own keys present, >= t clients, no repeated
   key), draws a self-mask seed b_u (16 random bytes), and splits with Shamir
   (threshold t, n shares, share index v + 1 for client v) three 16-byte secrets: b_u,
   and the two halves of s_u^SK (32 bytes). The three shares for client v travel in one
   ChaCha20-Poly1305 ciphertext under ``k_uv = HKDF(X25519(c_u^SK, c_v^PK))`` with a
   fresh random nonce and the direction (u, v) as associated data; the server relays
   ciphertexts it cannot read. U2 = clients whose shares arrived (>= t).
2. Masked input. Client u decrypts and checks its shares from U2, quantizes x_u, and
   sends ``y_u = q(x_u) + PRG(b_u) + sum_{v in U2, v > u} PRG(s_uv)
   - sum_{v in U2, v < u} PRG(s_uv) mod 2^k``, with
   ``s_uv = HKDF(X25519(s_u^SK, s_v^PK))`` (= s_vu) and PRG = ChaCha20 keystream under
   an HKDF-derived key, read as little-endian k-bit words. Clients may drop out here:
   U3 = clients whose masked input arrived (>= t). The server adds the y_u up at once
   and keeps no individual y_u.
3. Unmask. The server sends U3. Each client in U3 checks U3 ⊆ U2, |U3| >= t, u in U3,
   and that it has not answered before, then returns its share of b_w for every w in
   U3 and its shares of s_v^SK for every v in U2 \\ U3 - never both kinds for one
   client. With t responses (U4, >= t) the server reconstructs each b_w and removes
   PRG(b_w), and each dropped s_v^SK and removes the masks PRG(s_uv) that survivors
   u added for v. What remains is sum_{u in U3} q(x_u), which it dequantizes.
A round with fewer than t clients raises `SecAggError` (a RuntimeError) naming how many
responded and the threshold, and no sum is produced.

Threat model
------------
Honest-but-curious (semi-honest) server and clients: everyone follows the protocol, but
the server, possibly together with fewer than t clients, tries to learn individual
inputs from everything it sees and keeps. Against that adversary the protocol reveals
nothing about honest clients' inputs beyond the sum of the survivors' inputs
(Bonawitz et al., honest-but-curious security): every y_u is masked by PRG(b_u), whose
seed only t shares reveal, and the server asks for b-shares only of clients whose input
is counted; for a dropped client it gets s_v^SK (so it can strip v's pairwise masks),
but b_v stays secret, so a late y_v still looks uniform. Shares are relayed encrypted
and authenticated, so the relaying server cannot read or alter them.
Threshold: we require n/2 < t <= n. Semi-honest security alone needs only coalitions
smaller than t; the majority threshold is a margin against the one deviation that
would unmask a client, a server claiming to some clients that u dropped (they send
s_u shares) and to others that u survived (they send b_u shares): each client answers
one unmask request, so that needs two disjoint groups of >= t responders, impossible
when 2t > n. Not covered: a malicious server (no PKI or signatures, so it could
substitute public keys; no consistency-check round; Sybil clients), malicious clients
(a client can add any vector: bound the damage with clipping and DP upstream), and what
the sum itself reveals (with one honest survivor, the sum is its input; across rounds,
differences of sums; use differential privacy for that).

Randomness: keys and b_u come from ``os.urandom``. Passing ``seed`` (tests only) derives
them with HKDF from the seed instead, so masked inputs become reproducible - and anyone
who knows the seed can unmask every input; never seed a real run. Shamir polynomials
(pycryptodome's own RNG) and encryption nonces are always fresh. The unmasked sum does
not depend on any randomness: masks cancel exactly, so the same inputs always give the
same total, seeded or not.

`secure_sum` runs every client and the server in this process; only the message
dataclasses below cross between them, and `SecAggResult` reports the bytes and time of
each round. `SecAggClient` / `SecAggServer` are the parts to place on real machines.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.errors import UserError

DOMAIN = b"tff-apps-secagg-v1"
KEY_BYTES = 32  # X25519 keys, HKDF outputs
SECRET_BYTES = 16  # b_u, and each half of s_u^SK: one Shamir secret / share each
NONCE_BYTES = 12
ID_BYTES = 4  # a client id on the wire
RING_BITS = (32, 64)
ROUND_NAMES = ("advertise_keys", "share_keys", "masked_input", "unmask")


class SecAggError(RuntimeError):
    """A secure-aggregation round could not complete (too few clients, a protocol
    violation); no sum is returned."""


# --- configuration and quantization ----------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SecAggConfig:
    """Protocol parameters, validated on construction (a bad value is a `UserError`).

    n_clients: clients in the round (>= 2); client ids are 0 .. n_clients - 1.
    threshold: t, shares needed to reconstruct a secret; n_clients / 2 < t <= n_clients.
      At most n_clients - t clients may drop out.
    bound: inputs are clipped to [-bound, bound].
    scale_bits: fixed-point precision, scale = 2**scale_bits.
    ring_bits: masks and sums live in Z_{2^ring_bits}; 32 or 64.
    """

    n_clients: int
    threshold: int
    bound: float
    scale_bits: int
    ring_bits: int = 32

    def __post_init__(self) -> None:
        for name in ("n_clients", "threshold", "scale_bits", "ring_bits"):
            value = getattr(self, name)
            if not _is_int(value):
                raise UserError(f"secure aggregation {name}: expected an integer, got {value!r}")
        n, t = self.n_clients, self.threshold
        if n < 2:
            raise UserError(f"secure aggregation n_clients: expected at least 2 clients, got {n}")
        if not n < 2 * t <= 2 * n:
            raise UserError(
                f"secure aggregation threshold: expected n_clients/2 < threshold <= n_clients "
                f"({n / 2:g} < t <= {n}), got {t}"
            )
        if self.ring_bits not in RING_BITS:
            raise UserError(f"secure aggregation ring_bits: expected 32 or 64, got {self.ring_bits}")
        if not 0 <= self.scale_bits <= self.ring_bits - 2:
            raise UserError(
                f"secure aggregation scale_bits: expected 0 <= scale_bits <= {self.ring_bits - 2}, "
                f"got {self.scale_bits}"
            )
        if not (isinstance(self.bound, (int, float, np.number)) and np.isfinite(self.bound) and self.bound > 0):
            raise UserError(f"secure aggregation bound: expected a finite number > 0, got {self.bound!r}")
        if self.max_level < 1:
            raise UserError(
                f"secure aggregation scale_bits: bound * 2**scale_bits = {self.bound * self.scale:g} "
                f"rounds to 0, so every input would quantize to 0; raise scale_bits"
            )
        limit = 2 ** (self.ring_bits - 1) - 1
        if n * self.max_level > limit:
            raise UserError(
                f"secure aggregation: n_clients * round(bound * 2**scale_bits) = {n} * "
                f"{self.max_level} = {n * self.max_level} exceeds 2**{self.ring_bits - 1} - 1, so "
                f"the sum could wrap around; lower scale_bits or bound"
                + (", or use ring_bits = 64" if self.ring_bits == 32 else "")
            )

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    @property
    def max_level(self) -> int:
        """The largest quantized magnitude, round(bound * scale)."""
        return int(np.rint(float(self.bound) * self.scale))

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """The ring's numpy dtype (arithmetic wraps mod 2**ring_bits)."""
        return np.uint32 if self.ring_bits == 32 else np.uint64

    @property
    def _signed(self) -> type[np.signedinteger]:
        return np.int32 if self.ring_bits == 32 else np.int64


def quantize(x: np.ndarray, cfg: SecAggConfig) -> np.ndarray:
    """Clip a 1-D float vector to [-bound, bound] and map it to the ring (fixed point).

    Returns ``round(clip(x) * 2**scale_bits)`` in two's complement as ``cfg.dtype``.
    NaN or infinite values raise ValueError.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"quantize: expected a non-empty 1-D vector, got shape {x.shape}; flatten it first")
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise ValueError(f"quantize: {bad} of {x.size} values are NaN or infinite; expected finite values")
    levels = np.rint(np.clip(x, -cfg.bound, cfg.bound) * cfg.scale)
    return levels.astype(cfg._signed).view(cfg.dtype)


def dequantize(total: np.ndarray, cfg: SecAggConfig, n_summed: int) -> np.ndarray:
    """Decode a ring vector holding the sum of `n_summed` quantized vectors, as float64.

    Raises ValueError when an entry lies outside ±n_summed * max_level, i.e. the vector
    cannot be such a sum (wrong n_summed, or masks that were not removed).
    """
    total = np.asarray(total)
    if total.dtype != cfg.dtype or total.ndim != 1:
        raise ValueError(
            f"dequantize: expected a 1-D {np.dtype(cfg.dtype).name} vector, got {total.dtype} {total.shape}"
        )
    if not _is_int(n_summed) or not 1 <= n_summed <= cfg.n_clients:
        raise ValueError(f"dequantize: expected 1 <= n_summed <= {cfg.n_clients}, got {n_summed!r}")
    signed = total.view(cfg._signed)
    limit = n_summed * cfg.max_level
    outside = int(np.count_nonzero((signed > limit) | (signed < -limit)))
    if outside:
        raise ValueError(
            f"dequantize: {outside} of {total.size} entries lie outside ±{limit} = n_summed * "
            f"max_level, so this is not a sum of {n_summed} quantized vectors"
        )
    return signed.astype(np.float64) / cfg.scale


def quantization_error_bound(cfg: SecAggConfig, n_summed: int) -> float:
    """Max abs error, per entry, of the dequantized sum of `n_summed` clients against the
    exact sum of their clipped inputs: half a quantization step per client (plus float64
    rounding of a 64-bit integer when ring_bits = 64)."""
    conversion = n_summed * cfg.max_level * 2.0**-53 / cfg.scale if cfg.ring_bits == 64 else 0.0
    return n_summed * 0.5 / cfg.scale + conversion


# --- primitives, all from `cryptography` ------------------------------------------


def _hkdf(ikm: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=DOMAIN + info).derive(ikm)


def _pair(u: int, v: int) -> bytes:
    """The unordered pair {u, v}, so both ends derive the same key."""
    return struct.pack("<II", min(u, v), max(u, v))


def _direction(sender: int, recipient: int) -> bytes:
    return struct.pack("<II", sender, recipient)


def _prg(seed: bytes, purpose: bytes, length: int, cfg: SecAggConfig) -> np.ndarray:
    """`length` ring elements of ChaCha20 keystream under a key derived from `seed`."""
    key = _hkdf(seed, b"/prg/" + purpose)
    # Each key expands exactly one stream, so a fixed nonce is safe.
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    stream = encryptor.update(bytes(length * cfg.ring_bits // 8))
    return np.frombuffer(stream, dtype=np.dtype(cfg.dtype).newbyteorder("<")).astype(cfg.dtype)


def _self_mask(seed: bytes, length: int, cfg: SecAggConfig) -> np.ndarray:
    return _prg(seed, b"self", length, cfg)


def _pairwise_mask(
    own: X25519PrivateKey, peer_public: bytes, u: int, v: int, length: int, cfg: SecAggConfig
) -> np.ndarray:
    """PRG(s_uv) with s_uv = HKDF(X25519(s_u^SK, s_v^PK)); the same for (u, v) and (v, u)."""
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return _prg(_hkdf(shared, b"/pair-seed/" + _pair(u, v)), b"pair", length, cfg)


def _share_cipher(own: X25519PrivateKey, peer_public: bytes, u: int, v: int) -> ChaCha20Poly1305:
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return ChaCha20Poly1305(_hkdf(shared, b"/share-key/" + _pair(u, v)))


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


class _Randomness:
    """os.urandom, or (tests only) bytes derived from a seed with HKDF, one per label."""

    def __init__(self, seed: bytes | None) -> None:
        self._seed = seed
        self._used: set[str] = set()

    def draw(self, label: str, n: int) -> bytes:
        if self._seed is None:
            return os.urandom(n)
        if label in self._used:
            raise RuntimeError(f"seeded randomness: label {label!r} drawn twice")
        self._used.add(label)
        return _hkdf(self._seed, b"/seeded/" + label.encode(), n)


# --- messages (the only things that cross between clients and server) --------------


@dataclass(frozen=True)
class KeyAdvertisement:
    """Round 0, client -> server: the client's two public keys."""

    client_id: int
    cipher_public_key: bytes  # c_u^PK, to encrypt shares sent to u
    mask_public_key: bytes  # s_u^PK, to agree pairwise mask seeds with u

    @property
    def nbytes(self) -> int:
        return ID_BYTES + 2 * KEY_BYTES


@dataclass(frozen=True)
class KeyList:
    """Round 0, server -> every client in U1 (broadcast)."""

    keys: tuple[KeyAdvertisement, ...]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes for k in self.keys)


@dataclass(frozen=True)
class EncryptedShares:
    """One client's three Shamir shares (b, s^SK low half, s^SK high half) for another,
    encrypted so only the recipient can read them."""

    sender: int
    recipient: int
    nonce: bytes
    ciphertext: bytes

    @property
    def nbytes(self) -> int:
        return 2 * ID_BYTES + len(self.nonce) + len(self.ciphertext)


@dataclass(frozen=True)
class ShareUpload:
    """Round 1, client -> server: encrypted shares for every other client in U1."""

    sender: int
    shares: tuple[EncryptedShares, ...]

    @property
    def nbytes(self) -> int:
        return ID_BYTES + sum(s.nbytes for s in self.shares)


@dataclass(frozen=True)
class ShareInbox:
    """Round 1, server -> client: the encrypted shares addressed to it, from U2."""

    recipient: int
    shares: tuple[EncryptedShares, ...]

    @property
    def nbytes(self) -> int:
        return ID_BYTES + sum(s.nbytes for s in self.shares)


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Round 2, client -> server: y_u, uniformly distributed on the ring to the server."""

    sender: int
    masked: np.ndarray

    def __post_init__(self) -> None:
        masked = np.array(self.masked, copy=True)
        masked.flags.writeable = False
        object.__setattr__(self, "masked", masked)

    @property
    def nbytes(self) -> int:
        return ID_BYTES + self.masked.nbytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 2, server -> every client in U3: who survived (U3). Clients work out who
    dropped (U2 minus U3) themselves."""

    survivors: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return ID_BYTES * (1 + len(self.survivors))


@dataclass(frozen=True)
class UnmaskResponse:
    """Round 3, client -> server: shares of b_w for survivors w, and of s_v^SK (two
    halves) for dropped v; never both for one client."""

    sender: int
    self_mask_shares: tuple[tuple[int, bytes], ...]  # (owner w, share of b_w)
    mask_key_shares: tuple[tuple[int, bytes, bytes], ...]  # (owner v, share of s_v^SK[:16], of [16:])

    @property
    def nbytes(self) -> int:
        return (
            ID_BYTES
            + len(self.self_mask_shares) * (ID_BYTES + SECRET_BYTES)
            + len(self.mask_key_shares) * (ID_BYTES + 2 * SECRET_BYTES)
        )


# --- client ----------------------------------------------------------------------


@dataclass(frozen=True)
class _HeldShares:
    self_mask: bytes
    mask_key_low: bytes
    mask_key_high: bytes


class SecAggClient:
    """One client: call advertise_keys, share_keys, masked_input, unmask, in order.

    `seed` (tests only) makes keys and b_u reproducible; see the module docstring.
    """

    def __init__(self, client_id: int, cfg: SecAggConfig, *, seed: bytes | None = None) -> None:
        if not _is_int(client_id) or not 0 <= client_id < cfg.n_clients:
            raise ValueError(f"SecAggClient: expected a client id in 0..{cfg.n_clients - 1}, got {client_id!r}")
        self._id = int(client_id)
        self._cfg = cfg
        self._random = _Randomness(seed)
        self._cipher_key = X25519PrivateKey.from_private_bytes(self._random.draw("cipher key", KEY_BYTES))
        self._mask_key: X25519PrivateKey | None = X25519PrivateKey.from_private_bytes(
            self._random.draw("mask key", KEY_BYTES)
        )
        self._stage = "new"
        self._advertised: KeyAdvertisement | None = None
        self._peer_keys: dict[int, KeyAdvertisement] = {}  # U1
        self._self_seed: bytes | None = None  # b_u, forgotten after round 2
        self._held: dict[int, _HeldShares] = {}  # shares this client holds, by owner
        self._u2: frozenset[int] = frozenset()

    @property
    def client_id(self) -> int:
        return self._id

    def _advance(self, expected: str, new: str, call: str) -> None:
        if self._stage != expected:
            raise SecAggError(f"client {self._id}: {call} called at stage {self._stage!r}, expected {expected!r}")
        self._stage = new

    def advertise_keys(self) -> KeyAdvertisement:
        """Round 0: the two public keys."""
        self._advance("new", "advertised", "advertise_keys")
        self._advertised = KeyAdvertisement(self._id, _public_bytes(self._cipher_key), _public_bytes(self._mask_key))
        return self._advertised

    def share_keys(self, key_list: KeyList) -> ShareUpload:
        """Round 1: Shamir-share b_u and s_u^SK, one encrypted bundle per other client."""
        self._advance("advertised", "shared", "share_keys")
        cfg, u = self._cfg, self._id
        keys = {k.client_id: k for k in key_list.keys}
        if len(keys) != len(key_list.keys) or not set(keys) <= set(range(cfg.n_clients)):
            raise SecAggError(f"client {u}: the key list has repeated or unknown client ids")
        if keys.get(u) != self._advertised:
            raise SecAggError(f"client {u}: the key list does not hold this client's own keys")
        publics = [p for k in keys.values() for p in (k.cipher_public_key, k.mask_public_key)]
        if len(set(publics)) != len(publics):
            raise SecAggError(f"client {u}: the key list repeats a public key")
        _require_quorum(f"client {u} in round 1 (share keys)", len(keys), cfg.n_clients, cfg.threshold)
        self._peer_keys = keys

        self._self_seed = self._random.draw("self-mask seed", SECRET_BYTES)
        mask_secret = _private_bytes(self._mask_key)
        splits = [
            Shamir.split(cfg.threshold, cfg.n_clients, secret)
            for secret in (self._self_seed, mask_secret[:SECRET_BYTES], mask_secret[SECRET_BYTES:])
        ]
        bundles = {}
        for position, per_secret in enumerate(zip(*splits)):
            indices = {index for index, _ in per_secret}
            assert indices == {position + 1}, "pycryptodome numbers shares 1..n"
            bundles[position] = _HeldShares(*(share for _, share in per_secret))
        self._held = {u: bundles[u]}

        encrypted = []
        for v in sorted(keys):
            if v == u:
                continue
            bundle = bundles[v]
            plaintext = _direction(u, v) + bundle.self_mask + bundle.mask_key_low + bundle.mask_key_high
            nonce = os.urandom(NONCE_BYTES)
            cipher = _share_cipher(self._cipher_key, keys[v].cipher_public_key, u, v)
            ciphertext = cipher.encrypt(nonce, plaintext, DOMAIN + _direction(u, v))
            encrypted.append(EncryptedShares(u, v, nonce, ciphertext))
        return ShareUpload(u, tuple(encrypted))

    def masked_input(self, x: np.ndarray, inbox: ShareInbox) -> MaskedInput:
        """Round 2: decrypt the shares from U2, then send y_u (quantized x plus masks)."""
        self._advance("shared", "masked", "masked_input")
        cfg, u = self._cfg, self._id
        if inbox.recipient != u:
            raise SecAggError(f"client {u}: received the share inbox of client {inbox.recipient}")
        for item in inbox.shares:
            v = item.sender
            if item.recipient != u or v == u or v not in self._peer_keys or v in self._held:
                raise SecAggError(f"client {u}: unexpected share bundle from {v} to {item.recipient}")
            cipher = _share_cipher(self._cipher_key, self._peer_keys[v].cipher_public_key, u, v)
            try:
                plaintext = cipher.decrypt(item.nonce, item.ciphertext, DOMAIN + _direction(v, u))
            except InvalidTag:
                raise SecAggError(f"client {u}: the shares from client {v} fail authentication") from None
            if plaintext[: 2 * ID_BYTES] != _direction(v, u) or len(plaintext) != 2 * ID_BYTES + 3 * SECRET_BYTES:
                raise SecAggError(f"client {u}: malformed share bundle from client {v}")
            body = plaintext[2 * ID_BYTES :]
            self._held[v] = _HeldShares(body[:SECRET_BYTES], body[SECRET_BYTES:-SECRET_BYTES], body[-SECRET_BYTES:])
        self._u2 = frozenset(self._held)
        _require_quorum(f"client {u} in round 2 (masked input)", len(self._u2), len(self._peer_keys), cfg.threshold)

        y = quantize(x, cfg)
        y = y + _self_mask(self._self_seed, y.size, cfg)
        for v in sorted(self._u2 - {u}):
            mask = _pairwise_mask(self._mask_key, self._peer_keys[v].mask_public_key, u, v, y.size, cfg)
            y = y + mask if v > u else y - mask
        # b_u and s_u^SK are no longer needed: only shares of them remain with the clients.
        self._self_seed = None
        self._mask_key = None
        return MaskedInput(u, y)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Round 3, answered once: b-shares of survivors, s^SK-shares of dropped clients."""
        self._advance("masked", "done", "unmask")
        u = self._id
        survivors = set(request.survivors)
        if len(survivors) != len(request.survivors) or not survivors <= self._u2 or u not in survivors:
            raise SecAggError(f"client {u}: the survivor list must be distinct clients of U2 including this one")
        _require_quorum(f"client {u} in round 3 (unmask)", len(survivors), len(self._u2), self._cfg.threshold)
        dropped = self._u2 - survivors
        return UnmaskResponse(
            u,
            tuple((w, self._held[w].self_mask) for w in sorted(survivors)),
            tuple((v, self._held[v].mask_key_low, self._held[v].mask_key_high) for v in sorted(dropped)),
        )


# --- server ----------------------------------------------------------------------


def _require_quorum(where: str, count: int, expected: int, threshold: int) -> None:
    if count < threshold:
        raise SecAggError(
            f"secure aggregation failed at {where}: {count} of {expected} clients responded, "
            f"the threshold is {threshold}; no sum is returned"
        )


def _unique_senders(senders: Sequence[int], allowed: set[int] | frozenset[int], round_name: str) -> set[int]:
    seen = set()
    for s in senders:
        if s in seen or s not in allowed:
            raise SecAggError(f"server in round {round_name}: unexpected or repeated message from client {s}")
        seen.add(s)
    return seen


class SecAggServer:
    """The aggregator: collect_keys, route_shares, collect_masked_inputs, unmask, in order.

    It sees only messages. Its state is its view of the protocol (public keys, the
    running masked sum, the secrets it reconstructs in round 3); it never holds an
    unmasked individual vector.
    """

    def __init__(self, cfg: SecAggConfig) -> None:
        self._cfg = cfg
        self._stage = 0
        self._keys: dict[int, KeyAdvertisement] = {}  # U1
        self._u2: frozenset[int] = frozenset()
        self._u3: frozenset[int] = frozenset()
        self._masked_sum: np.ndarray | None = None
        self._self_mask_seeds: dict[int, bytes] = {}  # b_w of survivors, after round 3
        self._dropped_mask_keys: dict[int, bytes] = {}  # s_v^SK of dropped clients, after round 3

    def _advance(self, expected: int, call: str) -> None:
        if self._stage != expected:
            raise SecAggError(f"server: {call} called out of order (after round {self._stage - 1})")
        self._stage += 1

    @property
    def survivors(self) -> tuple[int, ...]:
        """U3: clients whose masked input is in the sum."""
        return tuple(sorted(self._u3))

    @property
    def dropped(self) -> tuple[int, ...]:
        """U2 minus U3: clients that shared keys but whose masked input never arrived."""
        return tuple(sorted(self._u2 - self._u3))

    def collect_keys(self, adverts: Sequence[KeyAdvertisement]) -> KeyList:
        """Round 0: returns the key list to broadcast to every client in it."""
        self._advance(0, "collect_keys")
        cfg = self._cfg
        _unique_senders([a.client_id for a in adverts], set(range(cfg.n_clients)), "0 (advertise keys)")
        _require_quorum("round 0 (advertise keys)", len(adverts), cfg.n_clients, cfg.threshold)
        self._keys = {a.client_id: a for a in adverts}
        return KeyList(tuple(self._keys[u] for u in sorted(self._keys)))

    def route_shares(self, uploads: Sequence[ShareUpload]) -> dict[int, ShareInbox]:
        """Round 1: relays the encrypted shares; returns each client's inbox (U2 only)."""
        self._advance(1, "route_shares")
        u1 = set(self._keys)
        u2 = _unique_senders([up.sender for up in uploads], u1, "1 (share keys)")
        _require_quorum("round 1 (share keys)", len(u2), len(u1), self._cfg.threshold)
        for up in uploads:
            recipients = [s.recipient for s in up.shares]
            if any(s.sender != up.sender for s in up.shares) or sorted(recipients) != sorted(u1 - {up.sender}):
                raise SecAggError(
                    f"server in round 1: client {up.sender} did not address one share bundle to each other client"
                )
        self._u2 = frozenset(u2)
        inboxes: dict[int, list[EncryptedShares]] = {v: [] for v in u2}
        for up in sorted(uploads, key=lambda up: up.sender):
            for item in up.shares:
                if item.recipient in inboxes:  # bundles for clients that dropped in round 1 are discarded
                    inboxes[item.recipient].append(item)
        return {v: ShareInbox(v, tuple(items)) for v, items in inboxes.items()}

    def collect_masked_inputs(self, masked: Sequence[MaskedInput]) -> UnmaskRequest:
        """Round 2: adds up the masked inputs; returns the survivor list (U3) to send."""
        self._advance(2, "collect_masked_inputs")
        cfg = self._cfg
        u3 = _unique_senders([m.sender for m in masked], self._u2, "2 (masked input)")
        _require_quorum("round 2 (masked input)", len(u3), len(self._u2), cfg.threshold)
        length = masked[0].masked.shape
        for m in masked:
            if m.masked.dtype != cfg.dtype or m.masked.ndim != 1 or m.masked.shape != length:
                raise SecAggError(
                    f"server in round 2: client {m.sender} sent a {m.masked.dtype} vector of shape "
                    f"{m.masked.shape}, expected {np.dtype(cfg.dtype).name} of shape {length}"
                )
        total = np.zeros(length, dtype=cfg.dtype)
        for m in masked:
            total += m.masked  # wraps mod 2**ring_bits
        self._masked_sum = total
        self._u3 = frozenset(u3)
        return UnmaskRequest(self.survivors)

    def unmask(self, responses: Sequence[UnmaskResponse]) -> np.ndarray:
        """Round 3: reconstructs b_w of survivors and s_v^SK of dropped clients from t
        shares each, removes their masks, and returns the float64 sum of U3's inputs."""
        self._advance(3, "unmask")
        cfg = self._cfg
        u4 = _unique_senders([r.sender for r in responses], self._u3, "3 (unmask)")
        _require_quorum("round 3 (unmask)", len(u4), len(self._u3), cfg.threshold)
        dropped = self._u2 - self._u3
        for r in responses:
            owners_b = [w for w, _ in r.self_mask_shares]
            owners_s = [v for v, _, _ in r.mask_key_shares]
            if owners_b != sorted(self._u3) or owners_s != sorted(dropped):
                raise SecAggError(f"server in round 3: client {r.sender} answered for the wrong clients")
        # pycryptodome's combine takes exactly t shares; use those of the t lowest ids.
        quorum = sorted(responses, key=lambda r: r.sender)[: cfg.threshold]
        total = self._masked_sum.copy()
        length = total.size
        for i, w in enumerate(sorted(self._u3)):
            seed = Shamir.combine([(r.sender + 1, r.self_mask_shares[i][1]) for r in quorum])
            self._self_mask_seeds[w] = seed
            total -= _self_mask(seed, length, cfg)
        for i, v in enumerate(sorted(dropped)):
            low = Shamir.combine([(r.sender + 1, r.mask_key_shares[i][1]) for r in quorum])
            high = Shamir.combine([(r.sender + 1, r.mask_key_shares[i][2]) for r in quorum])
            self._dropped_mask_keys[v] = low + high
            key = X25519PrivateKey.from_private_bytes(low + high)
            for u in sorted(self._u3):
                mask = _pairwise_mask(key, self._keys[u].mask_public_key, v, u, length, cfg)
                # survivor u added +mask for v > u and -mask for v < u; undo that
                total = total - mask if v > u else total + mask
        try:
            return dequantize(total, cfg, n_summed=len(self._u3))
        except ValueError as error:
            raise SecAggError(f"server in round 3: unmasking failed ({error})") from None


# --- the whole protocol in one process ----------------------------------------------


@dataclass(frozen=True)
class RoundStats:
    """Traffic and wall time of one round (client and server compute, all in-process).
    Bytes are payloads (ids 4 bytes, keys 32, vectors 4 or 8 per entry), no framing."""

    name: str
    bytes_to_server: int
    bytes_from_server: int
    seconds: float


@dataclass(frozen=True, eq=False)
class SecAggResult:
    """The outcome of `secure_sum`.

    total: float64 sum of the survivors' clipped inputs, within
      `quantization_error_bound(cfg, len(survivors))` of the exact one.
    masked_inputs: what the server received in round 2, by client id (for tests).
    """

    total: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    masked_inputs: dict[int, np.ndarray]
    rounds: tuple[RoundStats, ...]
    seconds: float

    @property
    def bytes_per_round(self) -> dict[str, int]:
        return {r.name: r.bytes_to_server + r.bytes_from_server for r in self.rounds}


def secure_sum(
    vectors: Sequence[np.ndarray],
    cfg: SecAggConfig,
    *,
    dropouts_after_sharing: Sequence[int] = (),
    dropouts_after_masking: Sequence[int] = (),
    seed: int | None = None,
) -> SecAggResult:
    """Run the four rounds for `cfg.n_clients` clients (client i holds vectors[i]).

    dropouts_after_sharing: clients that vanish after round 1 (their masked input never
      arrives; their input is not in the sum).
    dropouts_after_masking: clients whose masked input arrives but that do not answer
      the unmask request (their input is in the sum).
    seed: tests only; see the module docstring. Raises SecAggError when a round has
    fewer than `cfg.threshold` clients.
    """
    n = cfg.n_clients
    if len(vectors) != n:
        raise ValueError(f"secure_sum: expected {n} vectors (cfg.n_clients), got {len(vectors)}")
    shapes = {np.shape(v) for v in vectors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"secure_sum: expected 1-D vectors of one length, got shapes {sorted(shapes)}")
    after_sharing, after_masking = set(dropouts_after_sharing), set(dropouts_after_masking)
    if not (after_sharing | after_masking) <= set(range(n)) or after_sharing & after_masking:
        raise ValueError(f"secure_sum: dropouts must be distinct client ids in 0..{n - 1}")

    start = time.perf_counter()
    rounds = []
    clients = [
        SecAggClient(i, cfg, seed=None if seed is None else DOMAIN + f"/secure_sum/{seed}/{i}".encode())
        for i in range(n)
    ]
    server = SecAggServer(cfg)

    def record(name: str, clock: float, up: int, down: int) -> None:
        rounds.append(RoundStats(name, up, down, time.perf_counter() - clock))

    clock = time.perf_counter()
    adverts = [c.advertise_keys() for c in clients]
    key_list = server.collect_keys(adverts)
    record(ROUND_NAMES[0], clock, sum(a.nbytes for a in adverts), key_list.nbytes * len(key_list.keys))

    clock = time.perf_counter()
    uploads = [c.share_keys(key_list) for c in clients]
    inboxes = server.route_shares(uploads)
    record(ROUND_NAMES[1], clock, sum(u.nbytes for u in uploads), sum(b.nbytes for b in inboxes.values()))

    clock = time.perf_counter()
    active = [c for c in clients if c.client_id not in after_sharing]
    masked = [c.masked_input(vectors[c.client_id], inboxes[c.client_id]) for c in active]
    request = server.collect_masked_inputs(masked)
    record(ROUND_NAMES[2], clock, sum(m.nbytes for m in masked), request.nbytes * len(request.survivors))

    clock = time.perf_counter()
    responses = [c.unmask(request) for c in active if c.client_id not in after_masking]
    total = server.unmask(responses)
    record(ROUND_NAMES[3], clock, sum(r.nbytes for r in responses), 0)

    return SecAggResult(
        total=total,
        survivors=server.survivors,
        dropped=server.dropped,
        masked_inputs={m.sender: m.masked for m in masked},
        rounds=tuple(rounds),
        seconds=time.perf_counter() - start,
    )


if __name__ == "__main__":  # benchmark: uv run python -m shared.secagg
    _cfg = SecAggConfig(n_clients=10, threshold=6, bound=1.0, scale_bits=24)
    _vectors = [np.random.default_rng(i).uniform(-1, 1, 10_000) for i in range(10)]
    for _dropouts in ((), (0, 9)):
        _result = secure_sum(_vectors, _cfg, dropouts_after_sharing=_dropouts)
        print(f"10 clients x 10 000 floats, dropouts {list(_dropouts)}: {_result.seconds:.3f} s total")
        for _r in _result.rounds:
            print(
                f"  {_r.name:15s} {_r.seconds:7.3f} s  "
                f"up {_r.bytes_to_server:9,d} B  down {_r.bytes_from_server:9,d} B"
            )
