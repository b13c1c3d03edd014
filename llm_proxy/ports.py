"""The ports of a proxied call: what :class:`llm_proxy.call.CallPipeline` is given.

The proxy passes in the real ones (the Redis guard, the outbox writer, the ``openai``
SDK's client, the wall clock); the unit tests pass in-memory ones, so the whole call
path runs in process without a network.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from contracts.commands import Charge
from kernel.settings import ModelAlias

Source = Literal["redis", "postgres", "policy", "skipped"]
ChargePath = Literal["outbox", "duplicate", "kafka", "spool"]
Clock = Callable[[], int]  # epoch milliseconds


@dataclass(frozen=True, slots=True)
class Decision:
    """The guard's answer to a hold."""

    allowed: bool
    source: Source
    balance_micro: int | None = None
    held_micro: int | None = None
    field: str | None = None  # the holds field this call's hold lives in (Redis only)

    @property
    def available_micro(self) -> int | None:
        if self.balance_micro is None:
            return None
        return self.balance_micro - (self.held_micro or 0)


class Guard(Protocol):
    """Holds a call's estimated cost until its charge is folded (``llm_proxy.guard``)."""

    async def hold(self, user_id: str, event_id: str, amount_micro: int,
                   fingerprint: str | None) -> Decision: ...  # fmt: skip

    async def release(self, user_id: str, event_id: str, field: str | None) -> None: ...

    async def settle(self, user_id: str, event_id: str, field: str | None, amount_micro: int,
                     *, recorded: bool) -> None: ...  # fmt: skip

    async def release_if_folded(self, user_id: str, event_id: str) -> None: ...


class ChargeSink(Protocol):
    """Makes a charge durable before the answer ends (``llm_proxy.charges``). Raises
    :class:`~outbox.enqueue.OutboxConflict` for an event id taken by another call, and
    OSError when no path (outbox, Kafka, spool) took it."""

    async def write(self, charge: Charge, fingerprint: str) -> ChargePath: ...


class UpstreamBroke(Exception):
    """Upstream's answer broke off while it was being read."""


class UpstreamAnswer(Protocol):
    """An answer whose status was 2xx; its body is read once, whole or as chunks."""

    @property
    def headers(self) -> Mapping[str, str]: ...

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class Upstream(Protocol):
    """Sends a body to a model alias's upstream; a refusal or a failure is a ProxyError
    (429 and the client's own mistakes passed through, the rest 502/504)."""

    # What reading an answer's chunks raises when the answer broke off, besides
    # UpstreamBroke: the transport's own errors, so that no chunk pays for a wrapper.
    broken: tuple[type[Exception], ...]

    async def post(self, alias: ModelAlias, route: str, body: bytes) -> UpstreamAnswer: ...
