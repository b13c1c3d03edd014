"""The one error hierarchy of the project.

Every package raises a subclass of :class:`CreditLedgerError`, so a caller can
catch "anything this project considers a failure" in one place, and the CLI can
print it as a one-line message instead of a traceback. Third-party errors are
wrapped with ``raise ... from exc`` so the cause stays attached.
"""

from __future__ import annotations

# The exit status of a process stopped by a ConfigError (sysexits' EX_CONFIG): restarting it
# would meet the same error, so supervisors (the worker's, systemd's) do not.
EXIT_CONFIG = 78


class CreditLedgerError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(CreditLedgerError):
    """Settings or a spec file are invalid."""


class StackError(CreditLedgerError):
    """A local service (Kafka, Postgres, Redis) could not be started or reached."""


class KafkaAccessError(ConfigError):
    """This process cannot use Kafka as configured: login, TLS, protocol or an ACL. The
    message names the setting (or ACL) to fix; retrying would not help."""


class TopicSpecError(ConfigError):
    """``topics.yaml`` is malformed or inconsistent."""


class TopicDriftError(CreditLedgerError):
    """An existing topic differs from ``topics.yaml``; nothing was changed."""


class CodecError(CreditLedgerError):
    """An event could not be encoded or decoded.

    ``reason`` is the reason code used on the dead-letter topic
    (``credit.commands.rejected``), so adapters can route without parsing text.
    """

    reason: str = "malformed"


class MalformedMessageError(CodecError):
    """The bytes are not a valid single-object-encoded Avro message."""

    reason = "malformed"


class UnknownSchemaError(CodecError):
    """The message names a schema fingerprint this codec does not know."""

    reason = "unknown_schema"


class EncodeError(CodecError):
    """A record does not match the schema it is being written with."""

    reason = "invalid"


class SnapshotError(CreditLedgerError):
    """A fold-state snapshot could not be written, or one read back is not usable (its
    checksum, its format or its files): the reader falls back to an older one."""


class ProjectionError(CreditLedgerError):
    """A projector, ``replay`` or ``migrate`` cannot go on (the read models are left as they
    were: every write is one transaction or one atomic script)."""


class QueryError(CreditLedgerError):
    """A read-model query got arguments it cannot answer (bad period, cursor or limit)."""


class PriceRuleError(ConfigError):
    """A price rule is malformed; the message names the rule, the version and the field."""


class PricingError(CreditLedgerError):
    """A call's usage cannot be priced (no active rule, impossible token counts)."""


class ProxyError(CreditLedgerError):
    """A proxied call is refused; carries the HTTP status and the OpenAI-shaped error fields."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.kind = kind
        self.headers = headers or {}  # extra response headers (Retry-After, x-request-id)

    def body(self) -> dict[str, object]:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}  # fmt: skip


class Refused(CreditLedgerError):
    """A caller's request is refused: a stable error code and a message. The kind of refusal
    is the subclass (below); each HTTP face maps kinds to statuses, so no domain error
    carries one."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def body(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message}}


class Invalid(Refused):
    """What was asked for is malformed or breaks a rule."""


class Unauthenticated(Refused):
    """The caller is not known: no token, or one that is malformed, forged or expired."""


class Forbidden(Refused):
    """The caller is known and may not do this."""


class NotFound(Refused):
    """The thing asked for does not exist (or is not the caller's to see)."""


class Conflict(Refused):
    """The request contradicts the state it meets (an order already paid, a cap reached)."""


class StoreError(Refused):
    """A credit-store request is refused (``store.api`` maps the kinds to statuses)."""


class StoreInvalid(StoreError, Invalid):
    pass


class StoreUnauthenticated(StoreError, Unauthenticated):
    pass


class StoreForbidden(StoreError, Forbidden):
    pass


class StoreNotFound(StoreError, NotFound):
    pass


class StoreConflict(StoreError, Conflict):
    pass


class PlazaError(Refused):
    """A plan-plaza request is refused (``plaza.api`` maps the kinds to statuses)."""


class PlazaInvalid(PlazaError, Invalid):
    pass


class PlazaForbidden(PlazaError, Forbidden):
    pass


class PlazaNotFound(PlazaError, NotFound):
    pass


class PlazaConflict(PlazaError, Conflict):
    pass


class OutboxConflict(CreditLedgerError):
    """An event id is in the outbox already, for another event: a reused id, never a retry."""

    def __init__(self, event_id: str, topic: str) -> None:
        super().__init__(f"event id {event_id!r} is in the outbox already with other "
                         f"content ({topic}); the new event was not added")  # fmt: skip
        self.event_id = event_id
