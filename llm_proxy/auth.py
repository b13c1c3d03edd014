"""Service authentication: which service is calling, and what it may bill (pure).

Each calling service has its own API key. The proxy keeps only the SHA-256 of
each key: the keys are long random tokens (`creditledger proxy new-key`), so a
fast hash is enough to make a leaked config useless, and a slow password hash
would add milliseconds to every call.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

from kernel.errors import ConfigError, ProxyError
from kernel.settings import ServiceKey
from llm_proxy.billing import SKIP_HEADER, BillingContext, header_title

KEY_PREFIX = "clp-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh service key and its sha256 (the value for the config)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key)


class ServiceRegistry:
    def __init__(self, services: Iterable[ServiceKey]) -> None:
        self._by_hash: dict[str, ServiceKey] = {}
        for service in services:
            if service.key_sha256 in self._by_hash:
                other = self._by_hash[service.key_sha256].name
                raise ConfigError(f"proxy.services: {service.name!r} and {other!r} share a key")
            self._by_hash[service.key_sha256] = service

    def __len__(self) -> int:
        return len(self._by_hash)

    def authenticate(self, authorization: str | None) -> ServiceKey:
        """``Authorization: Bearer <key>`` -> the service; 401 when unknown or absent."""
        scheme, _, key = (authorization or "").strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise ProxyError(401, "invalid_api_key",
                             "missing API key: send 'Authorization: Bearer <service key>'",
                             kind="authentication_error")  # fmt: skip
        service = self._by_hash.get(hash_key(key))
        if service is None:
            raise ProxyError(401, "invalid_api_key", "incorrect API key provided",
                             kind="authentication_error")  # fmt: skip
        return service

    @staticmethod
    def authorize(service: ServiceKey, ctx: BillingContext) -> None:
        """403 when the service may not bill this scene, or may not skip the charge."""
        if "*" not in service.scenes and ctx.scene not in service.scenes:
            raise ProxyError(403, "scene_not_allowed",
                             f"service {service.name!r} may not bill scene {ctx.scene!r}",
                             param="X-Billing-Scene", kind="permission_error")  # fmt: skip
        if ctx.skip_charge and not service.may_skip_charge:
            raise ProxyError(403, "skip_charge_not_allowed",
                             f"service {service.name!r} may not set {header_title(SKIP_HEADER)}",
                             param=header_title(SKIP_HEADER), kind="permission_error")  # fmt: skip
