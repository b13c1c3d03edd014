"""At a process's start: can it reach Kafka, authenticate, and do its job?

Kafka clients retry a wrong password or an untrusted certificate forever, logging a line
now and then; the process then looks alive and does nothing. Every long-running process
calls :func:`check_access` before its real clients, and a configuration that cannot work
(the password, the CA, the protocol, a missing ACL) stops it at once with a message that
names the setting to fix. A broker that is merely down is not a configuration error:
``unreachable_ok`` lets the proxy start anyway (its charges wait in the outbox).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AclOperation, AdminClient  # type: ignore[attr-defined]

from kernel.errors import KafkaAccessError, StackError
from kernel.settings import Settings
from streams.kafka_clients import security_config

log = logging.getLogger(__name__)


class _Captured(logging.Handler):
    """librdkafka's log lines (the only place a TLS failure is explained)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _who(settings: Settings) -> str:
    kafka = settings.kafka
    if kafka.security_protocol.startswith("SASL_"):
        return f"kafka.sasl_username {kafka.sasl_username!r}"
    return f"this client ({kafka.security_protocol})"


def _diagnose(settings: Settings, lines: list[str], errors: list[KafkaError]) -> str | None:
    """The setting to blame for what the client saw, or None (the brokers are just down)."""
    kafka = settings.kafka
    text = "\n".join(lines + [e.str() for e in errors])
    if "Authentication failed" in text or any(
        e.code() == KafkaError._AUTHENTICATION for e in errors
    ):
        return (f"Kafka refused the login of {_who(settings)} with {kafka.sasl_mechanism}: "
                "check kafka.sasl_password (and that the user exists, and "
                "kafka.sasl_mechanism)")  # fmt: skip
    if "certificate verify failed" in text:
        return ("the brokers' TLS certificate is not signed by a CA this client trusts: check "
                f"kafka.ssl_ca_file (now {kafka.ssl_ca_file or 'the system CAs'})")  # fmt: skip
    if "hostname" in text.lower() and "mismatch" in text.lower():
        return ("the brokers' certificate does not name the host connected to: check "
                "kafka.bootstrap_servers or kafka.ssl_check_hostname")  # fmt: skip
    if any(s in text for s in ("SSL handshake", "wrong version number", "Disconnected while "
                                "requesting ApiVersion", "receive failed")):  # fmt: skip
        return (f"the brokers do not speak kafka.security_protocol {kafka.security_protocol} "
                "on kafka.bootstrap_servers: check the protocol and the port")  # fmt: skip
    return None


def _connect(settings: Settings, timeout_s: float) -> tuple[AdminClient, object | None, str]:
    """An admin client and the cluster's metadata, or None and the reason it has none."""
    captured = _Captured()
    logger = logging.getLogger(f"creditledger.kafka-check.{id(captured)}")
    logger.propagate = False
    logger.addHandler(captured)
    errors: list[KafkaError] = []
    config: dict[str, Any] = {**security_config(settings),
                              "bootstrap.servers": settings.kafka.bootstrap_servers,
                              "client.id": f"{settings.kafka.client_id}-check",
                              "error_cb": errors.append, "logger": logger}  # fmt: skip
    admin = AdminClient(config)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return admin, admin.list_topics(timeout=2), ""
        except KafkaException as exc:
            admin.poll(0.1)  # serves the queued log lines and errors to the callbacks
            reason = _diagnose(settings, captured.lines, errors)
            if reason is not None:
                raise KafkaAccessError(reason) from exc
            if time.monotonic() > deadline:
                return admin, None, str(exc)


def _missing(ops: Sequence[AclOperation] | None, wanted: AclOperation) -> bool:
    if ops is None:  # a broker that does not report operations: nothing to say
        return False
    return wanted not in ops and AclOperation.ALL not in ops


def check_access(settings: Settings, *, read: Sequence[str] = (), write: Sequence[str] = (),
                 groups: Sequence[str] = (), timeout_s: float = 15,
                 unreachable_ok: bool = False) -> None:  # fmt: skip
    """Raise :class:`KafkaAccessError` naming the setting or ACL that stops this process
    from reading ``read``, writing ``write`` and consuming in ``groups``."""
    admin, metadata, reason = _connect(settings, timeout_s)
    if metadata is None:
        if unreachable_ok:
            log.warning("no Kafka broker answers yet at %s (%s); starting anyway",
                        settings.kafka.bootstrap_servers, reason)  # fmt: skip
            return
        raise StackError(f"no Kafka broker answers at kafka.bootstrap_servers "
                               f"{settings.kafka.bootstrap_servers} within {timeout_s:.0f} s "
                               f"({reason}); is it up?")  # fmt: skip
    names = sorted(set(read) | set(write))
    topics = getattr(metadata, "topics", {})
    for name in names:
        found = topics.get(name)
        if found is not None and found.error is not None and \
                found.error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:  # fmt: skip
            raise KafkaAccessError(f"{_who(settings)} may not describe topic {name}: no ACL "
                                   "allows it (the roles' ACLs: README, Security)")  # fmt: skip
    present = [name for name in names if name in topics]
    if present:
        futures = admin.describe_topics(TopicCollection(present),
                                        include_authorized_operations=True)  # fmt: skip
        for name, future in futures.items():
            ops = future.result(timeout=timeout_s).authorized_operations
            for wanted, topic_names in ((AclOperation.READ, read), (AclOperation.WRITE, write)):
                if name in topic_names and _missing(ops, wanted):
                    raise KafkaAccessError(
                        f"{_who(settings)} may not {wanted.name} topic {name}: no ACL allows "
                        "it (the roles' ACLs: README, Security)")  # fmt: skip
    if groups:
        for name, future in admin.describe_consumer_groups(list(groups)).items():
            try:
                future.result(timeout=timeout_s)
            except KafkaException as exc:
                if exc.args[0].code() == KafkaError.GROUP_AUTHORIZATION_FAILED:
                    raise KafkaAccessError(
                        f"{_who(settings)} may not use consumer group {name}: no ACL allows "
                        "it (the roles' ACLs: README, Security)") from exc  # fmt: skip
                # Anything else (a coordinator still moving) is the consumer's to retry.
