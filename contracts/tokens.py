"""The bearer tokens of the company's HTTP APIs (the credit store, the plan plaza), pure.

A token is ``base64url(payload).base64url(HMAC-SHA256)``, payload ``{sub, role, exp}``,
signed with ``store.token_secret``. One format and one verifier for every API that takes
them, so a user signed in to one is the same principal in the other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Literal

import orjson

from contracts.fields import ID
from kernel.errors import Invalid, Unauthenticated

Role = Literal["user", "admin", "service"]

TOKEN = re.compile(r"[A-Za-z0-9_-]{1,2048}\.[A-Za-z0-9_-]{43}")  # payload . 32-byte MAC


@dataclass(frozen=True)
class Principal:
    user_id: str
    role: Role
    expires_at: int  # unix seconds


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mac(secret: bytes, message: bytes) -> bytes:
    return hmac.new(secret, message, hashlib.sha256).digest()


def sign_token(secret: bytes, user_id: str, role: Role, expires_at: int) -> str:
    """``<payload>.<mac>``, both base64url: payload = {"sub", "role", "exp"}."""
    if not ID.ok(user_id):
        raise Invalid("invalid_user_id", f"a user id is {ID.description}")
    payload = b64(orjson.dumps({"sub": user_id, "role": role, "exp": expires_at}))
    return f"{payload}.{b64(mac(secret, payload.encode()))}"


def verify_token(secret: bytes, token: str, now: int) -> Principal:
    """The token's principal; Unauthenticated when malformed, tampered with or expired.

    Decoded strictly: base64url without padding, in its one canonical spelling (Python's
    decoder skips foreign characters and ignores unused bits, which gave one token many
    spellings)."""
    if not TOKEN.fullmatch(token):
        raise Unauthenticated("invalid_token", "the bearer token is malformed")
    payload, _dot, given_mac = token.partition(".")
    given = unb64(given_mac)
    if b64(given) != given_mac or b64(unb64(payload)) != payload:
        raise Unauthenticated("invalid_token", "the bearer token is malformed")
    if not hmac.compare_digest(given, mac(secret, payload.encode())):
        raise Unauthenticated("invalid_token", "the bearer token's signature does not match")
    try:
        claims = orjson.loads(unb64(payload))
        user_id, role, expires_at = claims["sub"], claims["role"], claims["exp"]
    except (ValueError, KeyError, TypeError) as exc:
        raise Unauthenticated("invalid_token", "the bearer token's payload is malformed") from exc
    if role not in ("user", "admin", "service") or not isinstance(expires_at, int) \
            or not isinstance(user_id, str):  # fmt: skip
        raise Unauthenticated("invalid_token", "the bearer token's payload is malformed")
    if expires_at <= now:
        raise Unauthenticated("token_expired", "the bearer token has expired")
    return Principal(user_id, role, expires_at)


def bearer(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not authorization:
        raise Unauthenticated("missing_token", "send 'Authorization: Bearer <token>'")
    scheme, _space, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("invalid_token", "the Authorization header must be "
                              "'Bearer <token>'")  # fmt: skip
    return token.strip()
