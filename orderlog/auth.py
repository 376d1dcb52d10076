"""Tokens and permissions: `verify(token, keys, now) -> Claims`, `can_query(principal)`.

Pure: the clock comes in as `now` (seconds since the epoch). Tokens are verified with PyJWT
against ONE configured algorithm; `alg: none` and every other algorithm are refused. Nothing
here logs, and no error message repeats a token.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import attrs
import jwt

from .domain import ROLES, Principal, Role

ALGORITHMS = ("HS256", "RS256", "ES256")
MAX_TOKEN_BYTES = 16 * 1024  # longer tokens are refused unparsed
MAX_SUB_LENGTH = 256
# exp and nbf beyond this (9999-12-31T23:59:59Z) have no RFC 3339 form: the token is invalid.
MAX_TIMESTAMP = 253_402_300_799

# The exact close reasons of docs/protocol.md section 1 (all with close code 4001).
INVALID = "invalid token"
EXPIRED = "token expired"
TIMEOUT = "authentication timeout"
REQUIRED = "authentication required"
SUBJECT_CHANGED = "token subject changed"
AUTH_CLOSE_CODE = 4001


class AuthError(Exception):
    """A token refused; `reason` is the exact close reason to send with 4001."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@attrs.frozen(repr=False)
class Keys:
    """How tokens are checked: one algorithm and its key (a secret or a public key)."""

    algorithm: str
    verify_key: Any
    audience: str | None = None
    issuer: str | None = None

    def __repr__(self) -> str:  # never show a secret
        return f"Keys(algorithm={self.algorithm!r}, audience={self.audience!r}, issuer={self.issuer!r})"


@attrs.frozen
class Claims:
    principal: Principal
    expires_at: float  # the token's exp, seconds since the epoch


def verify(token: Any, keys: Keys, now: float) -> Claims:
    """Check a token's signature, algorithm and claims at time `now`; raise AuthError."""
    if not isinstance(token, str) or not token:
        raise AuthError(INVALID, "no token string")
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthError(INVALID, "token too long")
    if not _valid_unicode(token):  # a lone surrogate (from a \ud800 escape) has no UTF-8 form
        raise AuthError(INVALID, "token is not valid Unicode")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise AuthError(INVALID, "malformed token") from None
    if header.get("alg") != keys.algorithm:
        raise AuthError(INVALID, f"algorithm {str(header.get('alg'))[:16]!r} not accepted")
    try:
        claims = jwt.decode(
            token,
            keys.verify_key,
            algorithms=[keys.algorithm],
            audience=keys.audience,
            issuer=keys.issuer,
            # exp and nbf are checked below against `now`, so this function stays pure.
            options={"require": ["exp", "sub"], "verify_exp": False, "verify_nbf": False,
                     "verify_aud": keys.audience is not None, "verify_iss": keys.issuer is not None},
        )
    except jwt.PyJWTError as exc:
        raise AuthError(INVALID, type(exc).__name__) from None
    exp = claims.get("exp")
    if not _timestamp(exp):
        raise AuthError(INVALID, "exp is not a time")
    nbf = claims.get("nbf")
    if nbf is not None:
        if not _timestamp(nbf):
            raise AuthError(INVALID, "nbf is not a time")
        if nbf > now:
            raise AuthError(INVALID, "not valid yet (nbf)")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not 1 <= len(sub) <= MAX_SUB_LENGTH or not _valid_unicode(sub):
        raise AuthError(INVALID, "sub must be a non-empty string")
    role = claims.get("role", Role.CUSTOMER)
    if role not in ROLES:
        raise AuthError(INVALID, "unknown role")
    if exp <= now:
        raise AuthError(EXPIRED)
    return Claims(Principal(sub, role), float(exp))


def _timestamp(value: Any) -> bool:
    """A number of seconds that a datetime can hold. The range test comes first: it also refuses
    NaN and the infinities, and never converts a huge int (2**1100) to a float, which overflows."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return -MAX_TIMESTAMP <= value <= MAX_TIMESTAMP


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def rfc3339(seconds: float) -> str:
    """A time as RFC 3339 UTC with a Z (milliseconds only when the time has them)."""
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond // 1000:03d}"
    return text + "Z"


def mint(sub: str, role: str, ttl: float, now: float, key: Any, algorithm: str = "HS256",
         audience: str | None = None, issuer: str | None = None) -> str:
    """A signed token for development and tests (`orderlog token`)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    # What verify() would refuse is refused here, so no tool mints a token that cannot work.
    if not 1 <= len(sub) <= MAX_SUB_LENGTH or not _valid_unicode(sub):
        raise ValueError(f"sub must be 1..{MAX_SUB_LENGTH} characters of valid Unicode")
    if not _timestamp(now + ttl):
        raise ValueError("ttl too long: the token would expire after 9999-12-31")
    claims: dict[str, Any] = {"sub": sub, "role": role, "iat": int(now), "exp": int(now + ttl)}
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, key, algorithm=algorithm)


# -- permissions ------------------------------------------------------------------------------


def can_query(principal: Principal) -> bool:
    """`query` is for staff and auditors."""
    return principal.role in (Role.STAFF, Role.AUDITOR)

