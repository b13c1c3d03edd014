"""Fixtures of the whole suite, and its two tiers.

The tree mirrors the packages: ``tests/<package>/unit`` (pure, no services) and
``tests/<package>/integration`` (the real stack), plus ``tests/system`` for paths that
cross every context. Every test under an ``integration`` folder is marked
``integration``; unit tests run first.

The integration tier runs against the real stack: Kafka (KRaft), Postgres, Redis. The
session fixture starts the stack with the project's own launcher (or uses the services
named by KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL and REDIS_URL). If it cannot, every test
there fails with a message saying how to start it: this suite never passes by skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from confluent_kafka.admin import AdminClient

from kernel.errors import CreditLedgerError
from kernel.settings import PROJECT_ROOT, Settings, load_settings
from stack import launcher
from streams import topic_admin
from streams.codec import AvroCodec, load_codec
from streams.topics import TopicsSpec, settings_topics
from testbed.cluster import Cluster, cluster_settings, secure_settings
from testbed.topics import ScratchTopics

if TYPE_CHECKING:
    from testbed.store import StoreWorld


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tier is the folder: mark integration tests, and run the unit tier first. The
    demo runs first of the integration tier: it verifies the real ledger topic as a whole,
    which later tests write to with ledger workers of their own (each folds the real
    command topics in a consumer group of its own)."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)

    def order(item: pytest.Item) -> tuple[bool, bool]:
        return "integration" in item.path.parts, item.path.name != "test_demo.py"

    items.sort(key=order)  # stable: the order within each group is kept


@pytest.fixture(scope="session")
def codec() -> AvroCodec:
    return load_codec(PROJECT_ROOT / "schemas" / "avro")


HOW_TO_START = (
    "Start the stack with `.venv/bin/creditledger stack up` (see README), or point the "
    "suite at running services with KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL and REDIS_URL."
)


@pytest.fixture(scope="session")
def stack_settings() -> Iterator[Settings]:
    try:
        settings = load_settings()
        report = launcher.up(settings)
    except CreditLedgerError as exc:
        pytest.fail(
            f"the integration suite needs Kafka, Postgres and Redis, and they could not be "
            f"started or reached:\n{exc}\n{HOW_TO_START}",
            pytrace=False,
        )
    started_here = any(service.state == "started" for service in report)
    yield settings
    # Leave the machine as we found it, unless asked to keep the stack for the next run.
    if started_here and os.environ.get("CREDITLEDGER_KEEP_STACK") != "1":
        launcher.down(settings)


def _kafka_beside(settings: Settings, what: str, needs: str) -> Iterator[Cluster]:
    """A Kafka of its own next to the stack (own ports and folder), up for the module that
    asks for it (idle JVMs would slow every later test), wiped afterwards."""
    kafka = Cluster(settings)
    try:
        kafka.up()
    except CreditLedgerError as exc:
        kafka.down()
        pytest.fail(f"the {what} could not be started: {exc}\nIt needs {needs} like "
                    "`creditledger stack up`; its logs are under "
                    f"{settings.stack.state_dir}.", pytrace=False)  # fmt: skip
    yield kafka
    kafka.down()


@pytest.fixture(scope="module")
def cluster(stack_settings: Settings) -> Iterator[Cluster]:
    """Three Kafka nodes, topics in the production profile: the broker-failure tests kill
    and restart its nodes."""
    yield from _kafka_beside(
        cluster_settings(stack_settings, Path("/tmp/creditledger-test-cluster")),
        "three-node Kafka cluster",
        "Java and the Kafka jars",
    )


@pytest.fixture(scope="module")
def secured(stack_settings: Settings) -> Iterator[Cluster]:
    """One Kafka node as `stack up --secure` runs it (SASL_SSL, SCRAM users, ACLs),
    connected to as the admin role."""
    yield from _kafka_beside(
        secure_settings(stack_settings, Path("/tmp/creditledger-test-secure")),
        "secured Kafka",
        "Java, openssl and the Kafka jars",
    )


@pytest.fixture(scope="session")
def admin(stack_settings: Settings) -> AdminClient:
    return topic_admin.make_admin(stack_settings)


@pytest.fixture(scope="session")
def project_topics(stack_settings: Settings, admin: AdminClient) -> TopicsSpec:
    """The project's topics, applied (as every start of every process does)."""
    spec = settings_topics(stack_settings)
    topic_admin.apply(admin, spec, timeout_s=30)
    return spec


@pytest.fixture
def unique() -> str:
    """A suffix that keeps one test's topics and groups apart from every other run."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def scratch(admin: AdminClient, unique: str) -> Iterator[ScratchTopics]:
    topics = ScratchTopics(admin, unique)
    yield topics
    topics.cleanup()


@pytest.fixture
def ledger_store_world(stack_settings: Settings, scratch: ScratchTopics,
                       unique: str) -> Iterator[StoreWorld]:  # fmt: skip
    """A store world on the real ledger topic, store not started yet: for the tests that
    follow a grant through a worker into the ledger."""
    from contracts.records import LEDGER_TOPIC
    from testbed.store import store_world

    with store_world(stack_settings, scratch, unique, start=False,
                     ledger_topic=LEDGER_TOPIC) as world:  # fmt: skip
        yield world
