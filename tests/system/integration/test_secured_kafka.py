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

import pytest
from pydantic import SecretStr

from contracts.records import LEDGER_TOPIC
from kernel.db import connect
from kernel.errors import EXIT_CONFIG
from kernel.settings import Settings
from stack import secure
from testbed.cluster import Cluster
from testbed.ledger import WorkerGroup
from testbed.load import GRANT, ONE_CALL, PROMPT, STARTER_PACK, buy_starter, grant, snapshots
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
        workers.start("w1")
        world.start_upstream()
        world.start_proxy()
        world.start_relay()
        world.start_process("project-postgres", "project", "postgres")
        world.start_process("project-redis", "project", "redis")
        world.start_store()
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
            client = world.client(users[n % 2])
            if n % 2:
                list(client.chat.completions.create(model="chat", messages=PROMPT, stream=True))
            else:
                client.chat.completions.create(model="chat", messages=PROMPT)
            calls += 1
        buy_starter(world, users[0])
        expected = {u: GRANT - calls // 2 * ONE_CALL for u in users}
        expected[users[0]] += STARTER_PACK

        def accounts() -> dict[str, int]:
            with connect(world.env_settings()) as conn:
                rows = conn.execute("SELECT user_id, balance_micro FROM accounts WHERE "
                                    "user_id = ANY(%s)", (users,)).fetchall()  # fmt: skip
            return {u: int(b) for u, b in rows}

        wait_for("Postgres equals the model", lambda: accounts() == expected, 120, world)
        wait_for("Redis equals the model", lambda: snapshots(world, users) == expected, 60,
                 world)  # fmt: skip
        for name, process in world.processes.items():
            assert process.poll() is None, f"{name} exited:\n{world.log_tail(name)}"
        assert workers.alive("w1"), workers.tail("w1")
    finally:
        workers.cleanup()


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
