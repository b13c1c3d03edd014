"""``stack up --secure``: the local Kafka as production runs it, SASL_SSL with ACLs.

- **Certificates**, made with openssl into ``<state_dir>/secure/tls`` on the first
  start: a CA, and one broker certificate (CN ``kafka-broker``, valid for 127.0.0.1 and
  localhost) that every node presents on all its listeners.
- **Listeners**: clients connect with SASL_SSL (SCRAM-SHA-512 or -256); the brokers talk
  to each other and to the controllers over TLS with client certificates required, so no
  listener accepts an unauthenticated connection.
- **Users**: one SCRAM user per role, with a random password kept in
  ``credentials.yaml`` (mode 0600) next to the certificates, written into the cluster's
  metadata by Kafka's own storage tool when a node is formatted.
- **ACLs** (Kafka's ``StandardAuthorizer``; nothing is allowed that no ACL allows): each
  role may do its job only, see :func:`role_acls`. ``admin`` and the brokers are super
  users.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported, untyped
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)
from pydantic import SecretStr

from contracts.records import CHARGE_TOPIC, GRANT_TOPIC, LEDGER_TOPIC, REJECTED_TOPIC
from kernel.errors import StackError
from kernel.settings import Settings
from streams.kafka_clients import security_config

ADMIN = "admin"
# The roles and what each one's processes are (``kafka.sasl_username`` of each).
ROLES = {
    "proxy": "the LLM proxy: produces charges itself when Postgres is down",
    # The store and the plaza write to the outbox only; the relay produces their events.
    "relay": "the outbox relay: produces the outbox's charges (proxy), grants (store) and "
    "plaza events",
    "rewards": "the store's event rewards: read the plaza's events (grants go to the outbox)",
    "worker": "the ledger worker: folds commands into the ledger, dead-letters the rest",
    "projector": "the projectors, replay and verify: read the ledger",
    ADMIN: "operators: topics apply, ACLs (a super user)",
}
BROKER_CN = "kafka-broker"
MECHANISM = "SCRAM-SHA-512"
# Node n's inter-broker (TLS) listener: this far above its client port.
BROKER_PORT_OFFSET = 50


@dataclass(frozen=True)
class SecureMaterial:
    root: Path

    @property
    def ca_file(self) -> Path:
        return self.root / "ca.pem"

    @property
    def keystore(self) -> Path:
        """The broker's key and certificate chain, one PEM file (Kafka's PEM key store)."""
        return self.root / "broker-keystore.pem"

    @property
    def credentials_file(self) -> Path:
        return self.root / "credentials.yaml"

    def passwords(self) -> dict[str, str]:
        data = yaml.safe_load(self.credentials_file.read_text())
        return {str(k): str(v) for k, v in data["users"].items()}


def material_dir(settings: Settings) -> Path:
    return settings.stack.state_dir / "secure" / "tls"


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                            check=False)  # fmt: skip
    if result.returncode != 0:
        raise StackError(f"openssl {args[0]} failed: {result.stderr.strip()[-2000:]}")


def ensure_material(settings: Settings) -> SecureMaterial:
    """The CA, the broker's certificate and the users' passwords, made once."""
    material = SecureMaterial(material_dir(settings))
    root = material.root
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    if not material.keystore.exists():
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
                 "-out", "ca.pem", "-days", "3650", "-subj", "/CN=creditledger local CA",
                 cwd=root)  # fmt: skip
        (root / "broker.ext").write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
        )
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out",
                 "broker.csr", "-subj", f"/CN={BROKER_CN}", cwd=root)  # fmt: skip
        _openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", "broker.crt", "-days", "3650", "-extfile",
                 "broker.ext", cwd=root)  # fmt: skip
        chain = (root / "broker.key").read_text() + (root / "broker.crt").read_text()
        chain += material.ca_file.read_text()
        material.keystore.write_text(chain)
        material.keystore.chmod(0o600)
    if not material.credentials_file.exists():
        users = {role: secrets.token_urlsafe(24) for role in ROLES}
        material.credentials_file.touch(mode=0o600)
        material.credentials_file.write_text(yaml.safe_dump({"mechanism": MECHANISM,
                                                             "users": users}))  # fmt: skip
    return material


def scram_arguments(material: SecureMaterial) -> list[str]:
    """The storage tool's ``--add-scram`` arguments: every user, written at format time."""
    args: list[str] = []
    for user, password in material.passwords().items():
        for mechanism in ("SCRAM-SHA-512", "SCRAM-SHA-256"):
            args += ["--add-scram", f"{mechanism}=[name={user},password={password}]"]
    return args


def listener_properties(material: SecureMaterial, host: str, port: int,
                        controller_port: int) -> dict[str, str]:  # fmt: skip
    """The secured node's listeners, TLS and authorizer (replacing the PLAINTEXT ones)."""
    internal = port + BROKER_PORT_OFFSET
    return {
        "listeners": f"SASL_SSL://{host}:{port},BROKER://{host}:{internal},"
                     f"CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"SASL_SSL://{host}:{port},BROKER://{host}:{internal}",
        "listener.security.protocol.map": "SASL_SSL:SASL_SSL,BROKER:SSL,CONTROLLER:SSL",
        "inter.broker.listener.name": "BROKER",
        "listener.name.broker.ssl.client.auth": "required",
        "listener.name.controller.ssl.client.auth": "required",
        "sasl.enabled.mechanisms": "SCRAM-SHA-512,SCRAM-SHA-256",
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config":
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(material.keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(material.ca_file),
        "ssl.endpoint.identification.algorithm": "https",
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": f"User:{ADMIN};User:CN={BROKER_CN}",
        "allow.everyone.if.no.acl.found": "false",
    }  # fmt: skip


def role_settings(settings: Settings, role: str) -> Settings:
    """``settings`` connecting to the secured stack as ``role``."""
    material = SecureMaterial(material_dir(settings))
    try:
        password = material.passwords()[role]
    except (OSError, KeyError) as exc:
        raise StackError(
            f"no credentials for role {role!r} in {material.credentials_file}; "
            "start it with `creditledger stack up --secure`"
        ) from exc
    kafka = settings.kafka.model_copy(update={
        "security_protocol": "SASL_SSL", "sasl_mechanism": MECHANISM, "sasl_username": role,
        "sasl_password": SecretStr(password), "ssl_ca_file": material.ca_file,
    })  # fmt: skip
    return settings.model_copy(update={"kafka": kafka})


def _allow(principal: str, kind: ResourceType, name: str, operation: AclOperation,
           pattern: ResourcePatternType = ResourcePatternType.LITERAL) -> AclBinding:  # fmt: skip
    return AclBinding(kind, name, pattern, f"User:{principal}", "*", operation,
                      AclPermissionType.ALLOW)  # fmt: skip


def role_acls(settings: Settings) -> list[AclBinding]:
    """What each role may do: its own topics and consumer groups, nothing else. Every role
    may describe the project's topics (metadata and configs: each process checks at start
    that the topics match topics.yaml)."""
    topic, group = ResourceType.TOPIC, ResourceType.GROUP
    ledger, plaza = settings.projections.ledger_topic, settings.plaza.topic
    grants: list[AclBinding] = []
    for role in ROLES:
        if role == ADMIN:
            continue
        for name in sorted({CHARGE_TOPIC, GRANT_TOPIC, LEDGER_TOPIC, REJECTED_TOPIC, ledger,
                            plaza}):  # fmt: skip
            grants += [_allow(role, topic, name, AclOperation.DESCRIBE),
                       _allow(role, topic, name, AclOperation.DESCRIBE_CONFIGS)]  # fmt: skip
    writes = {"proxy": [CHARGE_TOPIC], "relay": [CHARGE_TOPIC, GRANT_TOPIC, plaza],
              "worker": [LEDGER_TOPIC, REJECTED_TOPIC]}  # fmt: skip
    reads = {"worker": [CHARGE_TOPIC, GRANT_TOPIC, LEDGER_TOPIC], "projector": [ledger],
             "rewards": list(settings.store.event_topics)}  # fmt: skip
    for role, names in writes.items():
        grants += [_allow(role, topic, name, AclOperation.WRITE) for name in names]
    for role, names in reads.items():
        grants += [_allow(role, topic, name, AclOperation.READ) for name in names]
    prefixed = ResourcePatternType.PREFIXED
    grants.append(_allow("worker", group, settings.ledger.app_id, AclOperation.READ, prefixed))
    for name in (settings.projections.postgres_group, settings.projections.redis_group):
        grants.append(_allow("projector", group, name, AclOperation.READ, prefixed))
    grants.append(_allow("rewards", group, settings.store.event_rewards_group,
                         AclOperation.READ, prefixed))  # fmt: skip
    return grants


def admin_client(settings: Settings, address: str | None = None) -> AdminClient:
    """An admin client of the secured stack (at ``address``, else the bootstrap servers)."""
    admin = role_settings(settings, ADMIN)
    return AdminClient({**security_config(admin),
                        "bootstrap.servers": address or settings.kafka.bootstrap_servers,
                        "log_level": 0})  # fmt: skip


def apply_acls(settings: Settings, timeout_s: float = 30) -> int:
    """Create the roles' ACLs (creating an existing one changes nothing); return how many."""
    bindings = role_acls(settings)
    admin = admin_client(settings)  # kept referenced: a dropped client cancels its requests
    futures = admin.create_acls(bindings, request_timeout=timeout_s)
    for binding, future in futures.items():
        try:
            future.result(timeout=timeout_s)
        except Exception as exc:
            raise StackError(f"creating ACL {binding} failed: {exc}") from exc
    return len(bindings)
