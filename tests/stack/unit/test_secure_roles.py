"""The secured stack's ACLs and listeners, as written (no broker): each role its job only."""

from __future__ import annotations

from pathlib import Path

from confluent_kafka.admin import AclOperation, ResourceType  # type: ignore[attr-defined]

from contracts.records import CHARGE_TOPIC, GRANT_TOPIC, LEDGER_TOPIC, REJECTED_TOPIC
from kernel.settings import Settings
from stack.secure import SecureMaterial, listener_properties, role_acls


def _allowed(settings: Settings) -> dict[str, set[tuple[str, str]]]:
    found: dict[str, set[tuple[str, str]]] = {}
    for acl in role_acls(settings):
        role = acl.principal.removeprefix("User:")
        if acl.restype == ResourceType.TOPIC and acl.operation in (AclOperation.READ,
                                                                   AclOperation.WRITE):  # fmt: skip
            found.setdefault(role, set()).add((acl.operation.name, acl.name))
    return found


def test_each_role_reads_and_writes_only_what_its_job_needs() -> None:
    allowed = _allowed(Settings())
    assert allowed == {
        "proxy": {("WRITE", CHARGE_TOPIC)},
        "relay": {("WRITE", CHARGE_TOPIC), ("WRITE", GRANT_TOPIC), ("WRITE", "plaza.events")},
        "worker": {("READ", CHARGE_TOPIC), ("READ", GRANT_TOPIC), ("READ", LEDGER_TOPIC),
                   ("WRITE", LEDGER_TOPIC), ("WRITE", REJECTED_TOPIC)},
        "projector": {("READ", LEDGER_TOPIC)},
        "rewards": {("READ", "plaza.events")},
    }  # fmt: skip


def test_consumer_groups_are_the_configured_ones() -> None:
    settings = Settings()
    groups = {(acl.principal, acl.name) for acl in role_acls(settings)
              if acl.restype == ResourceType.GROUP}  # fmt: skip
    assert groups == {("User:worker", settings.ledger.app_id),
                      ("User:projector", settings.projections.postgres_group),
                      ("User:projector", settings.projections.redis_group),
                      ("User:rewards", settings.store.event_rewards_group)}  # fmt: skip


def test_no_listener_accepts_an_unauthenticated_connection() -> None:
    props = listener_properties(SecureMaterial(Path("/tls")), "127.0.0.1", 19092, 19093)
    protocols = dict(pair.split(":") for pair in props["listener.security.protocol.map"].split(","))
    assert set(protocols.values()) == {"SASL_SSL", "SSL"}
    assert props["listener.name.broker.ssl.client.auth"] == "required"
    assert props["listener.name.controller.ssl.client.auth"] == "required"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert "PLAINTEXT" not in props["listeners"]
