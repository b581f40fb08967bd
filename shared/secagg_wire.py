"""The masked protocol's messages (`shared.secagg_messages`) as bytes, for parties on
different machines (across sites: the coordinator and each site's gateway, over the
gateway's mutual-TLS gRPC channel).

A message is one JSON object (UTF-8): ids and counts as numbers, keys, nonces, ciphertexts
and shares as base64, a masked vector as the base64 of its little-endian ring words. This
is an encoding only: confidentiality and authentication of the channel are TLS's, and the
shares inside are already encrypted end to end (ChaCha20-Poly1305, `shared.secagg_client`).
A malformed message raises `WireError` (a ValueError) naming what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np

from shared import secagg_messages as msg
from shared.secagg_ring import SecAggConfig


class WireError(ValueError):
    """A protocol message that does not parse."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise WireError(f"{what}: expected base64 text") from None


def dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


def loads(data: bytes, *required: str) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WireError("the message is not a JSON object") from None
    if not isinstance(obj, dict):
        raise WireError("the message is not a JSON object")
    missing = [key for key in required if key not in obj]
    if missing:
        raise WireError(f"the message has no {', '.join(repr(m) for m in missing)}")
    return obj


_CONFIG_KEYS = {"n_clients", "threshold", "bound", "scale_bits", "ring_bits"}


def config_to_json(cfg: SecAggConfig) -> dict[str, Any]:
    obj = {"n_clients": cfg.n_clients, "threshold": cfg.threshold, "bound": cfg.bound,
           "scale_bits": cfg.scale_bits, "ring_bits": cfg.ring_bits}
    return {**obj, "modular": True} if cfg.modular else obj


def config_from_json(obj: Any) -> SecAggConfig:
    """The protocol's parameters; SecAggConfig validates them (a UserError when invalid)."""
    if not isinstance(obj, dict) or set(obj) - {"modular"} != _CONFIG_KEYS or obj.get("modular", False) not in (True, False):
        raise WireError("config: expected n_clients, threshold, bound, scale_bits, ring_bits (and modular: true or false)")
    return SecAggConfig(**obj)


def advert_to_json(advert: msg.KeyAdvertisement) -> dict[str, Any]:
    return {"id": advert.client_id, "c": b64(advert.cipher_public_key), "s": b64(advert.mask_public_key)}


def advert_from_json(obj: dict[str, Any]) -> msg.KeyAdvertisement:
    return msg.KeyAdvertisement(int(obj["id"]), unb64(obj["c"], "cipher key"), unb64(obj["s"], "mask key"))


def key_list_to_json(key_list: msg.KeyList) -> list[dict[str, Any]]:
    return [advert_to_json(k) for k in key_list.keys]


def key_list_from_json(items: Any) -> msg.KeyList:
    if not isinstance(items, list):
        raise WireError("keys: expected a list")
    return msg.KeyList(tuple(advert_from_json(item) for item in items))


def _shares_to_json(shares: tuple[msg.EncryptedShares, ...]) -> list[dict[str, Any]]:
    return [{"from": s.sender, "to": s.recipient, "nonce": b64(s.nonce), "ct": b64(s.ciphertext)} for s in shares]


def _shares_from_json(items: Any) -> tuple[msg.EncryptedShares, ...]:
    if not isinstance(items, list):
        raise WireError("shares: expected a list")
    return tuple(
        msg.EncryptedShares(int(s["from"]), int(s["to"]), unb64(s["nonce"], "nonce"), unb64(s["ct"], "ciphertext"))
        for s in items
    )


def upload_to_json(upload: msg.ShareUpload) -> dict[str, Any]:
    return {"sender": upload.sender, "shares": _shares_to_json(upload.shares)}


def upload_from_json(obj: dict[str, Any]) -> msg.ShareUpload:
    return msg.ShareUpload(int(obj["sender"]), _shares_from_json(obj["shares"]))


def inbox_to_json(inbox: msg.ShareInbox) -> dict[str, Any]:
    return {"recipient": inbox.recipient, "shares": _shares_to_json(inbox.shares)}


def inbox_from_json(obj: dict[str, Any]) -> msg.ShareInbox:
    return msg.ShareInbox(int(obj["recipient"]), _shares_from_json(obj["shares"]))


def masked_to_json(masked: msg.MaskedInput) -> dict[str, Any]:
    words = masked.masked.astype(masked.masked.dtype.newbyteorder("<"), copy=False)
    return {"sender": masked.sender, "bits": masked.masked.dtype.itemsize * 8, "y": b64(words.tobytes())}


def masked_from_json(obj: dict[str, Any], cfg: SecAggConfig) -> msg.MaskedInput:
    if obj.get("bits") != cfg.word_bits:  # the words' width (a modular ring may be narrower)
        raise WireError(f"masked input: expected {cfg.word_bits}-bit ring words, got {obj.get('bits')!r}")
    raw = unb64(obj["y"], "masked input")
    if len(raw) % (cfg.word_bits // 8):
        raise WireError("masked input: its length is not a whole number of ring words")
    words = np.frombuffer(raw, dtype=np.dtype(cfg.dtype).newbyteorder("<")).astype(cfg.dtype)
    if np.any(cfg.reduce(words) != words):
        raise WireError(f"masked input: a word lies outside the {cfg.ring_bits}-bit ring")
    return msg.MaskedInput(int(obj["sender"]), words)


def request_to_json(request: msg.UnmaskRequest) -> list[int]:
    return list(request.survivors)


def request_from_json(items: Any) -> msg.UnmaskRequest:
    if not isinstance(items, list):
        raise WireError("survivors: expected a list")
    return msg.UnmaskRequest(tuple(int(i) for i in items))


def response_to_json(response: msg.UnmaskResponse) -> dict[str, Any]:
    return {
        "sender": response.sender,
        "b": [[w, b64(share)] for w, share in response.self_mask_shares],
        "s": [[v, b64(share)] for v, share in response.mask_key_shares],
    }


def response_from_json(obj: dict[str, Any]) -> msg.UnmaskResponse:
    try:
        return msg.UnmaskResponse(
            int(obj["sender"]),
            tuple((int(w), unb64(share, "share")) for w, share in obj["b"]),
            tuple((int(v), unb64(share, "share")) for v, share in obj["s"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, WireError):
            raise
        raise WireError(f"unmask response: malformed ({err})") from None
