"""Masked secure aggregation, the ring and its randomness: the protocol's constants and
config, fixed-point quantization into Z_{2^k}, and the masks and keys derived with
`cryptography`'s X25519, HKDF and ChaCha20 (protocol: `shared.secagg`).

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

Modular rings (``modular = True``): distributed DP hands the protocol integer vectors that
are already residues mod 2^k (TFF's DistributedDpSumFactory clips them modularly into its
field of k = `bits` bits, 20 by default), and its decoding expects their sum mod 2^k, wraps
included. Then k is any width from 2 to 64, inputs are integers taken mod 2^k (no clipping,
no scaling: scale_bits = 0), masks are reduced mod 2^k (a ChaCha20 word mod 2^k is uniform,
as 2^k divides the word's range) and the sum is returned as the signed residue in
[-2^(k-1), 2^(k-1)). Words travel in the smallest of uint32 / uint64 that holds k bits.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.errors import UserError

DOMAIN = b"tff-apps-secagg-v1"
KEY_BYTES = 32  # X25519 keys, HKDF outputs
SECRET_BYTES = 16  # b_u, and the seed of s_u^SK: one Shamir secret / share each
NONCE_BYTES = 12
ID_BYTES = 4  # a client id on the wire
RING_BITS = (32, 64)
ROUND_NAMES = ("advertise_keys", "share_keys", "masked_input", "unmask")


class SecAggError(RuntimeError):
    """A secure-aggregation round could not complete (too few clients, a protocol
    violation); no sum is returned."""


def is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SecAggConfig:
    """Protocol parameters, validated on construction (a bad value is a `UserError`).

    n_clients: clients in the round (>= 2); client ids are 0 .. n_clients - 1.
    threshold: t, shares needed to reconstruct a secret; n_clients / 2 < t <= n_clients.
      At most n_clients - t clients may drop out.
    bound: inputs are clipped to [-bound, bound].
    scale_bits: fixed-point precision, scale = 2**scale_bits.
    ring_bits: masks and sums live in Z_{2^ring_bits}; 32 or 64 (2..64 when modular).
    modular: inputs are integer residues whose sum is wanted mod 2^ring_bits (module
      docstring, "Modular rings"); scale_bits must be 0 and bound is unused.
    """

    n_clients: int
    threshold: int
    bound: float
    scale_bits: int
    ring_bits: int = 32
    modular: bool = False

    def __post_init__(self) -> None:
        for name in ("n_clients", "threshold", "scale_bits", "ring_bits"):
            value = getattr(self, name)
            if not is_int(value):
                raise UserError(f"secure aggregation {name}: expected an integer, got {value!r}")
        n, t = self.n_clients, self.threshold
        if n < 2:
            raise UserError(f"secure aggregation n_clients: expected at least 2 clients, got {n}")
        if not n < 2 * t <= 2 * n:
            raise UserError(
                f"secure aggregation threshold: expected n_clients/2 < threshold <= n_clients "
                f"({n / 2:g} < t <= {n}), got {t}"
            )
        if self.modular:
            if not 2 <= self.ring_bits <= 64 or self.scale_bits != 0:
                raise UserError(
                    f"secure aggregation (modular ring): expected 2 <= ring_bits <= 64 and scale_bits = 0, got "
                    f"ring_bits = {self.ring_bits}, scale_bits = {self.scale_bits}"
                )
            return  # the sum wraps by design: no bound, no overflow check
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
        """The ring's numpy dtype (arithmetic wraps mod 2**word bits; `reduce` then takes
        it mod 2**ring_bits)."""
        return np.uint32 if self.ring_bits <= 32 else np.uint64

    @property
    def word_bits(self) -> int:
        return 32 if self.ring_bits <= 32 else 64

    @property
    def _signed(self) -> type[np.signedinteger]:
        return np.int32 if self.ring_bits <= 32 else np.int64

    def reduce(self, words: np.ndarray) -> np.ndarray:
        """Ring words mod 2**ring_bits (a no-op for a full-word ring)."""
        if self.ring_bits == self.word_bits:
            return words
        return words & self.dtype((1 << self.ring_bits) - 1)


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
    if cfg.modular:  # integer residues: taken mod 2^k as they are
        if np.any(x != np.rint(x)) or np.any(np.abs(x) >= 2.0**63):
            raise ValueError("quantize: a modular ring takes integer inputs; got a fraction or a too large value")
        return cfg.reduce(x.astype(np.int64).view(np.uint64).astype(cfg.dtype))
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
    if not is_int(n_summed) or not 1 <= n_summed <= cfg.n_clients:
        raise ValueError(f"dequantize: expected 1 <= n_summed <= {cfg.n_clients}, got {n_summed!r}")
    if cfg.modular:  # the sum mod 2^k as its signed residue
        residues = cfg.reduce(total).astype(np.int64)
        half = 1 << (cfg.ring_bits - 1)
        return np.where(residues >= half, residues - (half << 1), residues).astype(np.float64)
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
    rounding of a 64-bit integer when ring_bits = 64). A modular ring's sum is exact."""
    if cfg.modular:
        return 0.0
    conversion = n_summed * cfg.max_level * 2.0**-53 / cfg.scale if cfg.ring_bits == 64 else 0.0
    return n_summed * 0.5 / cfg.scale + conversion


def hkdf(ikm: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=DOMAIN + info).derive(ikm)


def pair_label(u: int, v: int) -> bytes:
    """The unordered pair {u, v}, so both ends derive the same key."""
    return struct.pack("<II", min(u, v), max(u, v))


def direction_label(sender: int, recipient: int) -> bytes:
    return struct.pack("<II", sender, recipient)


def prg_words(seed: bytes, purpose: bytes, length: int, cfg: SecAggConfig) -> np.ndarray:
    """`length` ring elements of ChaCha20 keystream under a key derived from `seed`."""
    key = hkdf(seed, b"/prg/" + purpose)
    # Each key expands exactly one stream, so a fixed nonce is safe.
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    stream = encryptor.update(bytes(length * cfg.word_bits // 8))
    return cfg.reduce(np.frombuffer(stream, dtype=np.dtype(cfg.dtype).newbyteorder("<")).astype(cfg.dtype))


def self_mask(seed: bytes, length: int, cfg: SecAggConfig) -> np.ndarray:
    return prg_words(seed, b"self", length, cfg)


def pairwise_mask(
    own: X25519PrivateKey, peer_public: bytes, u: int, v: int, length: int, cfg: SecAggConfig
) -> np.ndarray:
    """PRG(s_uv) with s_uv = HKDF(X25519(s_u^SK, s_v^PK)); the same for (u, v) and (v, u)."""
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return prg_words(hkdf(shared, b"/pair-seed/" + pair_label(u, v)), b"pair", length, cfg)


def share_cipher(own: X25519PrivateKey, peer_public: bytes, u: int, v: int) -> ChaCha20Poly1305:
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return ChaCha20Poly1305(hkdf(shared, b"/share-key/" + pair_label(u, v)))


def mask_key_from_seed(seed: bytes) -> X25519PrivateKey:
    """s_u^SK from the 16-byte seed that is Shamir-shared in its place: one secret to share
    instead of the key's two 16-byte halves (as libsodium's seeded key pairs, a hash of a seed)."""
    return X25519PrivateKey.from_private_bytes(hkdf(seed, b"/mask-key"))


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


class Randomness:
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
        return hkdf(self._seed, b"/seeded/" + label.encode(), n)


def require_quorum(where: str, count: int, expected: int, threshold: int) -> None:
    if count < threshold:
        raise SecAggError(
            f"secure aggregation failed at {where}: {count} of {expected} clients responded, "
            f"the threshold is {threshold}; no sum is returned"
        )
