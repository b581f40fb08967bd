"""The client side of masked secure aggregation (`shared.secagg` describes the rounds):
keys, Shamir shares of its secrets, its masked input, and its answers to the unmask request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from shared.secagg_messages import (
    EncryptedShares,
    KeyAdvertisement,
    KeyList,
    MaskedInput,
    ShareInbox,
    ShareUpload,
    UnmaskRequest,
    UnmaskResponse,
)
from shared.secagg_ring import (
    DOMAIN,
    ID_BYTES,
    KEY_BYTES,
    NONCE_BYTES,
    SECRET_BYTES,
    Randomness,
    SecAggConfig,
    SecAggError,
    direction_label,
    is_int,
    mask_key_from_seed,
    pairwise_mask,
    public_bytes,
    quantize,
    require_quorum,
    self_mask,
    share_cipher,
)


@dataclass(frozen=True)
class _HeldShares:
    self_mask: bytes
    mask_seed: bytes  # of s^SK (`mask_key_from_seed`)


class SecAggClient:
    """One client: call advertise_keys, share_keys, masked_input, unmask, in order.

    `seed` (tests only) makes keys and b_u reproducible; see `shared.secagg`, "Randomness".
    """

    def __init__(self, client_id: int, cfg: SecAggConfig, *, seed: bytes | None = None) -> None:
        if not is_int(client_id) or not 0 <= client_id < cfg.n_clients:
            raise ValueError(f"SecAggClient: expected a client id in 0..{cfg.n_clients - 1}, got {client_id!r}")
        self._id = int(client_id)
        self._cfg = cfg
        self._random = Randomness(seed)
        self._cipher_key = X25519PrivateKey.from_private_bytes(self._random.draw("cipher key", KEY_BYTES))
        self._mask_seed: bytes | None = self._random.draw("mask key seed", SECRET_BYTES)
        self._mask_key: X25519PrivateKey | None = mask_key_from_seed(self._mask_seed)
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
        self._advertised = KeyAdvertisement(self._id, public_bytes(self._cipher_key), public_bytes(self._mask_key))
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
        require_quorum(f"client {u} in round 1 (share keys)", len(keys), cfg.n_clients, cfg.threshold)
        self._peer_keys = keys

        self._self_seed = self._random.draw("self-mask seed", SECRET_BYTES)
        splits = [Shamir.split(cfg.threshold, cfg.n_clients, secret) for secret in (self._self_seed, self._mask_seed)]
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
            plaintext = direction_label(u, v) + bundle.self_mask + bundle.mask_seed
            nonce = os.urandom(NONCE_BYTES)
            cipher = share_cipher(self._cipher_key, keys[v].cipher_public_key, u, v)
            ciphertext = cipher.encrypt(nonce, plaintext, DOMAIN + direction_label(u, v))
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
            cipher = share_cipher(self._cipher_key, self._peer_keys[v].cipher_public_key, u, v)
            try:
                plaintext = cipher.decrypt(item.nonce, item.ciphertext, DOMAIN + direction_label(v, u))
            except InvalidTag:
                raise SecAggError(f"client {u}: the shares from client {v} fail authentication") from None
            if plaintext[: 2 * ID_BYTES] != direction_label(v, u) or len(plaintext) != 2 * ID_BYTES + 2 * SECRET_BYTES:
                raise SecAggError(f"client {u}: malformed share bundle from client {v}")
            body = plaintext[2 * ID_BYTES :]
            self._held[v] = _HeldShares(body[:SECRET_BYTES], body[SECRET_BYTES:])
        self._u2 = frozenset(self._held)
        require_quorum(f"client {u} in round 2 (masked input)", len(self._u2), len(self._peer_keys), cfg.threshold)

        y = quantize(x, cfg)
        y = y + self_mask(self._self_seed, y.size, cfg)
        for v in sorted(self._u2 - {u}):
            mask = pairwise_mask(self._mask_key, self._peer_keys[v].mask_public_key, u, v, y.size, cfg)
            y = y + mask if v > u else y - mask
        y = cfg.reduce(y)  # a modular ring narrower than its words: uniform in Z_{2^k}, top bits 0
        # b_u and m_u (with the key derived from it) are no longer needed: only shares remain with the clients.
        self._self_seed = None
        self._mask_seed = self._mask_key = None
        return MaskedInput(u, y)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Round 3, answered once: b-shares of survivors, s^SK-shares of dropped clients."""
        self._advance("masked", "done", "unmask")
        u = self._id
        survivors = set(request.survivors)
        if len(survivors) != len(request.survivors) or not survivors <= self._u2 or u not in survivors:
            raise SecAggError(f"client {u}: the survivor list must be distinct clients of U2 including this one")
        require_quorum(f"client {u} in round 3 (unmask)", len(survivors), len(self._u2), self._cfg.threshold)
        dropped = self._u2 - survivors
        return UnmaskResponse(
            u,
            tuple((w, self._held[w].self_mask) for w in sorted(survivors)),
            tuple((v, self._held[v].mask_seed) for v in sorted(dropped)),
        )
