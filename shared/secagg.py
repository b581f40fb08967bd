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


Rounds (U1 ⊇ U2 ⊇ U3 ⊇ U4 are the clients heard from in each round)
-----------------------------------------------------------------
0. Advertise keys. Client u draws two X25519 key pairs: c_u (to encrypt the shares it
   sends to other clients) and s_u (to agree pairwise mask seeds), and sends
   ``(u, c_u^PK, s_u^PK)``. The server broadcasts the list from U1 (|U1| >= t).
1. Share keys. Client u checks the list (its own keys present, >= t clients, no repeated
   key), draws a self-mask seed b_u (16 random bytes), and splits with Shamir
   (threshold t, n shares, share index v + 1 for client v) two 16-byte secrets: b_u, and
   m_u, the seed s_u^SK was derived from (s_u^SK = HKDF(m_u): a 32-byte key would be two
   secrets to share). The two shares for client v travel in one
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
   U3 and its shares of m_v (the seed of s_v^SK) for every v in U2 \\ U3 - never both kinds for one
   client. With t responses (U4, >= t) the server reconstructs each b_w and removes
   PRG(b_w), and each dropped m_v, derives s_v^SK and removes the masks PRG(s_uv) that survivors
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

Randomness: keys, m_u and b_u come from ``os.urandom``. Passing ``seed`` (tests only) derives
them with HKDF from the seed instead, so masked inputs become reproducible - and anyone
who knows the seed can unmask every input; never seed a real run. Shamir polynomials
(pycryptodome's own RNG) and encryption nonces are always fresh. The unmasked sum does
not depend on any randomness: masks cancel exactly, so the same inputs always give the
same total, seeded or not.

`secure_sum` runs every client and the server in this process; only the message
dataclasses of `shared.secagg_messages` cross between them, and `SecAggResult` reports the
bytes and time of each round. `SecAggClient` / `SecAggServer` are the parts to place on real machines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir

from shared.secagg_client import SecAggClient
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
    ROUND_NAMES,
    SecAggConfig,
    SecAggError,
    dequantize,
    mask_key_from_seed,
    pairwise_mask,
    private_bytes,
    require_quorum,
    self_mask,
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
        require_quorum("round 0 (advertise keys)", len(adverts), cfg.n_clients, cfg.threshold)
        self._keys = {a.client_id: a for a in adverts}
        return KeyList(tuple(self._keys[u] for u in sorted(self._keys)))

    def route_shares(self, uploads: Sequence[ShareUpload]) -> dict[int, ShareInbox]:
        """Round 1: relays the encrypted shares; returns each client's inbox (U2 only)."""
        self._advance(1, "route_shares")
        u1 = set(self._keys)
        u2 = _unique_senders([up.sender for up in uploads], u1, "1 (share keys)")
        require_quorum("round 1 (share keys)", len(u2), len(u1), self._cfg.threshold)
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
        require_quorum("round 2 (masked input)", len(u3), len(self._u2), cfg.threshold)
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
        require_quorum("round 3 (unmask)", len(u4), len(self._u3), cfg.threshold)
        dropped = self._u2 - self._u3
        for r in responses:
            owners_b = [w for w, _ in r.self_mask_shares]
            owners_s = [v for v, _ in r.mask_key_shares]
            if owners_b != sorted(self._u3) or owners_s != sorted(dropped):
                raise SecAggError(f"server in round 3: client {r.sender} answered for the wrong clients")
        # pycryptodome's combine takes exactly t shares; use those of the t lowest ids.
        quorum = sorted(responses, key=lambda r: r.sender)[: cfg.threshold]
        total = self._masked_sum.copy()
        length = total.size
        for i, w in enumerate(sorted(self._u3)):
            seed = Shamir.combine([(r.sender + 1, r.self_mask_shares[i][1]) for r in quorum])
            self._self_mask_seeds[w] = seed
            total -= self_mask(seed, length, cfg)
        for i, v in enumerate(sorted(dropped)):
            key = mask_key_from_seed(Shamir.combine([(r.sender + 1, r.mask_key_shares[i][1]) for r in quorum]))
            self._dropped_mask_keys[v] = private_bytes(key)
            for u in sorted(self._u3):
                mask = pairwise_mask(key, self._keys[u].mask_public_key, v, u, length, cfg)
                # survivor u added +mask for v > u and -mask for v < u; undo that
                total = total - mask if v > u else total + mask
        total = cfg.reduce(total)
        try:
            return dequantize(total, cfg, n_summed=len(self._u3))
        except ValueError as error:
            raise SecAggError(f"server in round 3: unmasking failed ({error})") from None


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
