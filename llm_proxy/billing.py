"""BillingContext: who pays for a call, and under which idempotency key (pure).

It travels as HTTP headers between a service and the proxy, and as a
``contextvars`` value inside a Python service (see :mod:`llm_proxy.client`).
Both sides normalise the same way (whitespace trimmed, empty = absent), so a
value reads back exactly as the proxy will bill it.

It never carries prompt text or model parameters: those stay in the request
body, which the billing path does not log or copy into an event.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from contracts.fields import ID
from kernel.errors import ProxyError

USER_HEADER = "x-billing-user-id"
EVENT_HEADER = "x-billing-event-id"
SCENE_HEADER = "x-billing-scene"
REQUEST_HEADER = "x-request-id"
CONVERSATION_HEADER = "x-conversation-id"
SKIP_HEADER = "x-billing-skip-charge"

TRUE_VALUES = {"1", "true", "yes"}
FALSE_VALUES = {"", "0", "false", "no"}


@dataclass(frozen=True, slots=True)
class BillingContext:
    user_id: str
    scene: str
    event_id: str
    request_id: str | None = None
    conversation_id: str | None = None
    skip_charge: bool = False
    # True when the caller sent no event id and the proxy made one up: a retry of
    # such a call cannot be recognised, so it is charged again.
    event_id_generated: bool = False


def normalise(value: str | None) -> str | None:
    """Trim whitespace; an empty value is an absent one."""
    if value is None:
        return None
    value = value.strip()
    return value or None


def check_id(header: str, value: str) -> str:
    """Every id header follows the one id rule (:data:`contracts.fields.ID`), the rule the
    store and the fold use too: what the proxy accepts, every projection can store."""
    if not ID.ok(value):
        raise ProxyError(400, "invalid_billing_header",
                         f"header {header_title(header)} must be {ID.description}",
                         param=header_title(header))  # fmt: skip
    return value


def ledger_event_id(service: str, client_event_id: str) -> str:
    """The ledger's event id of a call: in the namespace of the proxy (``llm:``) and of the
    calling service, so no caller can collide with another service's ids or produce an id
    of the credit store (``order:``, ``reward:``)."""
    return f"llm:{service}:{client_event_id}"


def header_title(header: str) -> str:
    """``x-billing-user-id`` -> ``X-Billing-User-Id`` (as the docs spell it)."""
    return "-".join(part.capitalize() for part in header.split("-"))


def parse_skip(value: str | None) -> bool:
    text = (normalise(value) or "").lower()
    if text in TRUE_VALUES:
        return True
    if text in FALSE_VALUES:
        return False
    raise ProxyError(400, "invalid_billing_header",
                     f"header {header_title(SKIP_HEADER)} must be true or false, got {value!r}",
                     param=header_title(SKIP_HEADER))  # fmt: skip


def from_headers(headers: Mapping[str, str]) -> BillingContext:
    """Read and validate the billing headers (keys lower-case); 400 names the bad header."""
    values: dict[str, str | None] = {}
    for header in (USER_HEADER, SCENE_HEADER, EVENT_HEADER, REQUEST_HEADER,
                   CONVERSATION_HEADER):  # fmt: skip
        value = normalise(headers.get(header))
        if value is None and header in (USER_HEADER, SCENE_HEADER):
            raise ProxyError(400, "missing_billing_header",
                             f"header {header_title(header)} is required",
                             param=header_title(header))  # fmt: skip
        values[header] = None if value is None else check_id(header, value)
    event_id = values[EVENT_HEADER]
    user_id, scene = values[USER_HEADER], values[SCENE_HEADER]
    assert user_id is not None and scene is not None
    return BillingContext(
        user_id=user_id, scene=scene, event_id=event_id or f"llm-{uuid.uuid4().hex}",
        request_id=values[REQUEST_HEADER], conversation_id=values[CONVERSATION_HEADER],
        skip_charge=parse_skip(headers.get(SKIP_HEADER)), event_id_generated=event_id is None,
    )  # fmt: skip


def to_headers(ctx: BillingContext) -> dict[str, str]:
    """The headers that carry ``ctx`` (the client SDK's side)."""
    headers = {header_title(USER_HEADER): ctx.user_id, header_title(SCENE_HEADER): ctx.scene}
    if not ctx.event_id_generated:
        headers[header_title(EVENT_HEADER)] = ctx.event_id
    if ctx.request_id:
        headers[header_title(REQUEST_HEADER)] = ctx.request_id
    if ctx.conversation_id:
        headers[header_title(CONVERSATION_HEADER)] = ctx.conversation_id
    if ctx.skip_charge:
        headers[header_title(SKIP_HEADER)] = "true"
    return headers
