"""The messages of masked secure aggregation, one dataclass per message (`shared.secagg`
describes the rounds); only these cross between the clients and the server.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.secagg_ring import ID_BYTES, KEY_BYTES, SECRET_BYTES


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
    """One client's two Shamir shares (of b and of the seed of s^SK) for another,
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
    """Round 3, client -> server: shares of b_w for survivors w, and of the seed of s_v^SK
    for dropped v; never both for one client."""

    sender: int
    self_mask_shares: tuple[tuple[int, bytes], ...]  # (owner w, share of b_w)
    mask_key_shares: tuple[tuple[int, bytes], ...]  # (owner v, share of s_v^SK's seed)

    @property
    def nbytes(self) -> int:
        return (
            ID_BYTES
            + len(self.self_mask_shares) * (ID_BYTES + SECRET_BYTES)
            + len(self.mask_key_shares) * (ID_BYTES + SECRET_BYTES)
        )
