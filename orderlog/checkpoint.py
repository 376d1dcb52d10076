"""Signed checkpoints: a hash chain anchored outside the shop (docs/protocol.md section 5, "Anchored chain").

Theory of operation. Anyone who can write the database can rewrite history and recompute every
hash after the change, so the chain alone proves nothing. A checkpoint is a compact JWS, signed
with Ed25519 (JWS `alg` "EdDSA"), whose payload is `{"log_id", "seq", "hash", "iat"}`: "this
log's event `seq` had hash `hash` at time `iat`". Whoever keeps a checkpoint (an auditor, out of
the shop's reach) can later prove that the log still holds that event with that hash, and so,
the chain being intact, every event before it unchanged.

Pure: JSON, PyJWT and the key objects of `cryptography`; no files, no clock (`iat` comes in as an
argument). The one exception is `new_key_pair`, which draws a random key.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "EdDSA"  # Ed25519; the only algorithm a checkpoint is ever checked with
PAYLOAD_KEYS = frozenset({"log_id", "seq", "hash", "iat"})
_HASH = re.compile(r"[0-9a-f]{64}\Z")
MAX_JWS_CHARS = 4096  # a checkpoint is about 300 characters; anything much longer is not one


class BadCheckpoint(Exception):
    """A checkpoint that does not verify, or is not a checkpoint (one line, says why)."""


class BadKey(Exception):
    """Key material that is not an Ed25519 key of the kind asked for."""


@attrs.frozen
class Checkpoint:
    """What a checkpoint attests: event `seq` of log `log_id` had hash `hash`, at UNIX time `iat`."""

    log_id: str
    seq: int
    hash: str
    iat: int

    def payload(self) -> dict[str, Any]:
        return {"log_id": self.log_id, "seq": self.seq, "hash": self.hash, "iat": self.iat}


def sign(checkpoint: Checkpoint, private_key: Ed25519PrivateKey) -> str:
    """The compact JWS of `checkpoint`."""
    return jwt.api_jws.encode(json.dumps(checkpoint.payload(), separators=(",", ":")).encode(), private_key,
                              algorithm=ALGORITHM)


def verify(token: Any, public_key: Ed25519PublicKey) -> Checkpoint:
    """The checkpoint in `token` if its signature verifies with `public_key`; else BadCheckpoint."""
    if not isinstance(token, str) or not token.strip():
        raise BadCheckpoint("not a checkpoint (expected a compact JWS: three base64url parts joined by dots)")
    token = token.strip()
    if len(token) > MAX_JWS_CHARS or token.count(".") != 2:
        raise BadCheckpoint("not a checkpoint (expected a compact JWS: three base64url parts joined by dots)")
    try:
        decoded = jwt.api_jws.decode_complete(token, public_key, algorithms=[ALGORITHM])
    except jwt.InvalidAlgorithmError:
        raise BadCheckpoint(f"the checkpoint is not signed with {ALGORITHM} (Ed25519)") from None
    except jwt.InvalidSignatureError:
        raise BadCheckpoint("the checkpoint's signature does not verify with this public key "
                            "(signed with another key, or altered)") from None
    except (jwt.InvalidTokenError, ValueError, TypeError) as exc:
        raise BadCheckpoint(f"not a checkpoint ({exc})") from None
    return parse_payload(decoded["payload"])


def parse_payload(raw: bytes) -> Checkpoint:
    """The Checkpoint of a signed payload; BadCheckpoint unless it has exactly the four fields."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadCheckpoint("the checkpoint's payload is not JSON") from None
    if not isinstance(body, dict) or set(body) != PAYLOAD_KEYS:
        raise BadCheckpoint(f"the checkpoint's payload must have exactly {', '.join(sorted(PAYLOAD_KEYS))}")
    log_id, seq, hash_, iat = body["log_id"], body["seq"], body["hash"], body["iat"]
    if not isinstance(log_id, str) or not log_id:
        raise BadCheckpoint("the checkpoint's log_id is not a non-empty string")
    if type(seq) is not int or seq < 1:
        raise BadCheckpoint("the checkpoint's seq is not a whole number >= 1")
    if not isinstance(hash_, str) or not _HASH.match(hash_):
        raise BadCheckpoint("the checkpoint's hash is not 64 lower-case hex digits")
    if type(iat) is not int or iat < 0:
        raise BadCheckpoint("the checkpoint's iat is not a whole number of seconds >= 0")
    return Checkpoint(log_id, seq, hash_, iat)


# -- keys --------------------------------------------------------------------------------------


def new_key_pair() -> tuple[str, str]:
    """A fresh Ed25519 key pair as PEM text: (private PKCS#8, public SubjectPublicKeyInfo)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private.decode(), public.decode()


def private_key(pem: str) -> Ed25519PrivateKey:
    """The Ed25519 private key in `pem` (unencrypted PKCS#8); BadKey otherwise."""
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise BadKey(f"not an unencrypted PEM private key ({_first_line(exc)})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadKey(f"an {type(key).__name__.lstrip('_')}, not an Ed25519 private key")
    return key


def public_key(pem: str) -> Ed25519PublicKey:
    """The Ed25519 public key in `pem`; BadKey otherwise."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise BadKey(f"not a PEM public key ({_first_line(exc)})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BadKey(f"an {type(key).__name__.lstrip('_')}, not an Ed25519 public key")
    return key


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
