"""Event rewards: the store reads other services' events and grants what its rules say.

``creditledger store event-rewards`` consumes ``store.event_topics`` (the plan plaza's
``plaza.events``) in the consumer group ``store.event_rewards_group``. For each event it
finds the active reward rules of kind ``event`` whose ``trigger_event`` is the event's
type, and claims each for the plan's author (:func:`recipient`), referenced by the event's
id. The claim, its per-period counter and its grant are one transaction
(:meth:`store.repository.StoreRepository.claim`), unique by (rule, user, event id).

So each triggering event earns at most one reward however often it is read: offsets are
committed only after the batch's claims are committed, so a consumer killed mid-batch
reads part of it again, and those claims are found, not made again. The cap counts claims
in the period of the event's own time (not the time it was read), so a replay decides
exactly as the first reading did. An event that cannot be decoded, or that no rule names,
is skipped with a count; nothing here can stop the rest of the stream.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, Message
from prometheus_client import CollectorRegistry, Counter

from contracts.plaza import PLAZA_EVENTS, PlazaEvent
from contracts.records import from_ms
from kernel.errors import CodecError, StoreConflict
from kernel.settings import Settings, project_path
from store.repository import StoreRepository
from store.rewards import RewardRule
from streams.codec import AvroCodec, load_codec
from streams.kafka_clients import make_consumer

log = logging.getLogger(__name__)

BATCH = 500
RULES_REFRESH_S = 5.0


def recipient(event: PlazaEvent) -> str | None:
    """Who an event rewards: the plan's author, for what somebody else did to the plan.
    Importing (or liking) your own plan earns nothing."""
    return None if event.actor_id == event.author_id else event.author_id


@dataclass
class Tally:
    granted: int = 0
    repeated: int = 0  # claimed before (a replay after a crash): nothing new
    capped: int = 0
    no_rule: int = 0
    own: int = 0
    undecodable: int = 0


class EventRewards:
    def __init__(self, settings: Settings, *, dsn: str | None = None,
                 registry: CollectorRegistry | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.codec: AvroCodec = load_codec(project_path(settings.schemas.avro_dir))
        self.repo = StoreRepository(settings, self.codec, dsn=dsn,
                                    pool_size=settings.store.event_rewards_claims)  # fmt: skip
        self.rules: list[RewardRule] = []
        self.rules_read_at = 0.0
        self.stopping = False
        self.tally = Tally()
        self.outcomes = Counter("store_event_rewards", "Events read by the event rewards, by "
                                "outcome.", ["outcome"],
                                registry=registry or CollectorRegistry())  # fmt: skip

    async def _rules(self) -> list[RewardRule]:
        if time.monotonic() - self.rules_read_at > RULES_REFRESH_S:
            rows = await self.repo.reward_rules()
            self.rules = [RewardRule.from_row(row) for row in rows if row["kind"] == "event"]
            self.rules_read_at = time.monotonic()
        return self.rules

    def _count(self, outcome: str) -> None:
        setattr(self.tally, outcome, getattr(self.tally, outcome) + 1)
        self.outcomes.labels(outcome).inc()

    async def handle(self, values: Sequence[bytes | None]) -> None:
        """A batch of records: every rule each triggers claimed (each outcome counted).
        Different users' claims run at once; one user's run in the order of their events,
        so their cap is met by the earliest, as when read one by one."""
        claims: dict[str, list[tuple[RewardRule, PlazaEvent]]] = defaultdict(list)
        for value in values:
            triggered = await self._triggered(value)
            if triggered is not None:
                user, event, rules = triggered
                claims[user] += [(rule, event) for rule in rules]
        room = asyncio.Semaphore(self.settings.store.event_rewards_claims)

        async def claim_in_order(user: str, todo: list[tuple[RewardRule, PlazaEvent]]) -> None:
            async with room:
                for rule, event in todo:
                    await self._claim(rule, user, event)

        # A failure cancels the rest: the batch is not committed, and is read again.
        async with asyncio.TaskGroup() as group:
            for user, todo in claims.items():
                group.create_task(claim_in_order(user, todo))

    async def _triggered(self, value: bytes | None
                         ) -> tuple[str, PlazaEvent, list[RewardRule]] | None:  # fmt: skip
        """Who the record rewards, and by which rules; None (counted why) for nothing."""
        try:
            decoded = self.codec.decode(value or b"")
        except CodecError as exc:
            log.warning("skipping an undecodable event: %s", exc)
            self._count("undecodable")
            return None
        if decoded.event_type != PLAZA_EVENTS:
            self._count("no_rule")
            return None
        event = PlazaEvent.from_record(decoded.record)
        rules = [rule for rule in await self._rules() if rule.trigger_event == event.type]
        user = recipient(event)
        if not rules:
            self._count("no_rule")
            return None
        if user is None:
            self._count("own")
            return None
        return user, event, rules

    async def _claim(self, rule: RewardRule, user: str, event: PlazaEvent) -> None:
        try:
            outcome = await self.repo.claim(rule, user, event.event_id,
                                            from_ms(event.occurred_at_ms))  # fmt: skip
        except StoreConflict as exc:  # the cap, or a rule not active at the event's time
            self._count("capped")
            log.debug("no reward for %s: %s", event.event_id, exc.message)
            return
        self._count("granted" if outcome.granted else "repeated")

    async def run(self, *, idle_exit_s: float | None = None) -> Tally:
        """Consume until stopped (SIGTERM, SIGINT), or until ``idle_exit_s`` pass with
        nothing to read (tests, the demo)."""
        await self.repo.start()
        consumer = make_consumer(self.settings, self.settings.store.event_rewards_group)
        consumer.subscribe(list(self.settings.store.event_topics))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        idle_since = time.monotonic()
        # consume() returns after BATCH records or this wait, whichever comes first: the
        # wait is what a lone import's reward waits here.
        wait_s = self.settings.store.event_rewards_wait_ms / 1000
        try:
            while not self.stopping:
                batch = await asyncio.to_thread(consumer.consume, BATCH, wait_s)
                records = _records(batch)
                await self.handle([message.value() for message in records])
                if records:
                    # After the claims are committed: a crash before this line reads them
                    # again and finds them (the claim is unique by rule, user and event).
                    await asyncio.to_thread(consumer.commit, asynchronous=False)
                    idle_since = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    break
        finally:
            await asyncio.to_thread(consumer.close)
            await self.repo.close()
        return self.tally

    def stop(self) -> None:
        self.stopping = True


def _records(batch: Sequence[Message]) -> list[Message]:
    records = []
    for message in batch:
        error = message.error()
        if error is None:
            records.append(message)
        elif error.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer error: %s", error)
    return records


def run(settings: Settings, *, idle_exit_s: float | None = None, **kwargs: Any) -> Tally:
    return asyncio.run(EventRewards(settings, **kwargs).run(idle_exit_s=idle_exit_s))
