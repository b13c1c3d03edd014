"""The whole flow on Kafka as production runs it: SASL_SSL, a SCRAM user per role, ACLs.

Each process connects as its own role (the proxy as ``proxy``, the relay as ``relay``,
the worker as ``worker``, the projectors as ``projector``) and may do only its job; calls
through the official ``openai`` SDK and a purchase through the store still reach the
ledger and both read models exactly. A wrong password, an unknown CA or a missing ACL
stops a process at its start, naming the setting.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary
from cloudevents.core.formats.json import JSONFormat
from pydantic import SecretStr

from contracts.cloudevents import header, trace_id
from contracts.records import CHARGE_TOPIC, GRANT_TOPIC, LEDGER_TOPIC
from kernel.errors import EXIT_CONFIG
from kernel.settings import Settings
from stack import secure
from streams.kafka_clients import partition_of
from streams.reading import read_topic
from testbed.cluster import Cluster
from testbed.ledger import WorkerGroup
from testbed.load import (
    GRANT,
    ONE_CALL,
    PROMPT,
    STARTER_PACK,
    balances,
    buy_starter,
    grant,
    snapshots,
    start_pipeline,
)
from testbed.proxy import wait_for
from testbed.store import StoreWorld, store_world
from testbed.topics import ScratchTopics
from testbed.world import kafka_env


@pytest.fixture
def world(secured: Cluster, unique: str) -> Iterator[StoreWorld]:
    scratch = ScratchTopics(secured.admin, unique)
    try:
        with store_world(secured.settings, scratch, unique, start=False,
                         ledger_topic=LEDGER_TOPIC) as world:  # fmt: skip
            yield world
    finally:
        scratch.cleanup()


def as_role(secured: Cluster, role: str) -> dict[str, str]:
    return kafka_env(secure.role_settings(secured.settings, role))


def deployment(secured: Cluster, world: StoreWorld, workers: WorkerGroup) -> Settings:
    """The secured stack's settings with this world's consumer groups: what its ACLs name."""
    app_id = workers.env()["CREDITLEDGER_LEDGER__APP_ID"]
    return secured.settings.model_copy(update={
        "ledger": secured.settings.ledger.model_copy(update={"app_id": app_id}),
        "projections": world.settings.projections.model_copy(
            update={"ledger_topic": LEDGER_TOPIC}),
    })  # fmt: skip


def test_every_role_does_its_job_over_sasl_ssl(world: StoreWorld, secured: Cluster,
                                               unique: str) -> None:  # fmt: skip
    workers = WorkerGroup(unique, world.env_settings())
    try:
        secure.apply_acls(deployment(secured, world, workers))
        workers.extra_env.update(as_role(secured, "worker"))
        world.part_env.update({"proxy": as_role(secured, "proxy"),
                               "relay": as_role(secured, "relay"),
                               "project-postgres": as_role(secured, "projector"),
                               "project-redis": as_role(secured, "projector")})  # fmt: skip
        start_pipeline(world, workers)
        users = [f"{unique}-sec-u{n}" for n in range(2)]
        grant(world, users)
        wait_for(
            "the grants in Redis",
            lambda: snapshots(world, users) == dict.fromkeys(users, GRANT),
            120,
            world,
        )
        calls = 0
        for n in range(6):
            client = world.client(users[n % 2], traceparent=f"00-{CALL_TRACE}-{n + 1:016x}-01")
            if n % 2:
                list(client.chat.completions.create(model="chat", messages=PROMPT, stream=True))
            else:
                client.chat.completions.create(model="chat", messages=PROMPT)
            calls += 1
        buy_starter(world, users[0], traceparent=f"00-{STORE_TRACE}-00000000000000aa-01")
        expected = {u: GRANT - calls // 2 * ONE_CALL for u in users}
        expected[users[0]] += STARTER_PACK

        def accounts() -> dict[str, int]:
            return balances(world, users)

        wait_for("Postgres equals the model", lambda: accounts() == expected, 120, world)
        wait_for("Redis equals the model", lambda: snapshots(world, users) == expected, 60,
                 world)  # fmt: skip
        for name, process in world.processes.items():
            assert process.poll() is None, f"{name} exited:\n{world.log_tail(name)}"
        assert workers.alive("w1"), workers.tail("w1")
        check_event_metadata(secured.settings, world, users[0])
    finally:
        workers.cleanup()


CALL_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
STORE_TRACE = "0af7651916cd43dd8448eb211c80319c"


def records(settings: Settings, world: StoreWorld, topic: str, user: str) -> list[Any]:
    """The user's records of ``topic`` as CloudEvents (binary mode), read with the
    ``cloudevents`` package, each with its traceparent and decoded Avro body."""
    found = []
    for record in read_topic(settings, topic, partitions=[partition_of(user, 6)]):
        if record.key != user.encode() or record.value is None:
            continue
        event = from_binary(KafkaMessage(dict(record.headers), record.key, record.value),
                            JSONFormat())  # fmt: skip
        body = world.codec.decode(record.value, plain_times=True).record
        found.append((event, header(record.headers, "traceparent"), body))
    return found


def check_event_metadata(settings: Settings, world: StoreWorld, user: str) -> None:
    """Every record carries CloudEvents headers; one trace links a call or a store request,
    its command and the ledger entry that folded it."""
    commands = {}
    for topic, producer in ((CHARGE_TOPIC, "llm-proxy"), (GRANT_TOPIC, None)):
        for event, traceparent, body in records(settings, world, topic, user):
            assert event.get_specversion() == "1.0"
            assert (event.get_id(), event.get_type()) == (body["event_id"], topic)
            assert event.get_source() == body["producer"] and event.get_time() is not None
            assert event.get_datacontenttype() == "application/avro"
            assert producer is None or event.get_source() == producer
            commands[body["event_id"]] = (topic, traceparent)
    charges = [tp for topic, tp in commands.values() if topic == CHARGE_TOPIC]
    assert len(charges) == 3 and all(tp and trace_id(tp) == CALL_TRACE for tp in charges)
    assert any(topic == GRANT_TOPIC and tp and trace_id(tp) == STORE_TRACE
               for topic, tp in commands.values()), commands  # fmt: skip
    entries = records(settings, world, LEDGER_TOPIC, user)
    assert {body["event_id"] for _e, _t, body in entries} == set(commands)
    for event, traceparent, body in entries:
        assert (event.get_id(), event.get_type()) == (body["event_id"], "credit.ledger.entry")
        assert traceparent == commands[body["event_id"]][1]  # copied from its command


def start_fails(env: dict[str, str], *args: str) -> str:
    """Run ``creditledger <args>``; it must exit with EX_CONFIG within 60 s: its stderr."""
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "creditledger.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == EXIT_CONFIG, (done.returncode, done.stderr[-2000:])
    assert time.monotonic() - t0 < 60
    return done.stderr


def test_a_wrong_password_an_unknown_ca_or_a_missing_acl_stops_the_start(
        world: StoreWorld, secured: Cluster, tmp_path: Path) -> None:  # fmt: skip
    projector = secure.role_settings(secured.settings, "projector")
    base = {**world.env(), **kafka_env(projector)}
    wrong = kafka_env(projector.model_copy(update={"kafka": projector.kafka.model_copy(
        update={"sasl_password": SecretStr("not-the-password")})}))  # fmt: skip
    err = start_fails({**base, **wrong}, "project", "redis")
    assert "kafka.sasl_password" in err and "'projector'" in err, err

    stranger = tmp_path / "stranger-ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(tmp_path / "k.pem"), "-out", str(stranger), "-days", "1", "-subj",
                    "/CN=stranger"], check=True, capture_output=True)  # fmt: skip
    err = start_fails({**base, "CREDITLEDGER_KAFKA__SSL_CA_FILE": str(stranger)},
                      "project", "redis")  # fmt: skip
    assert "kafka.ssl_ca_file" in err, err

    # The projector's user may read the ledger, not fold commands into it.
    err = start_fails(base, "worker", "--no-supervise")
    assert "kafka.sasl_username 'projector' may not READ topic credit.charge.requested" in err
