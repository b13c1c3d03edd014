"""A plan-plaza world: a store world (its database, Redis prefix, tokens) plus a plaza topic
of its own, a real ``creditledger plaza serve`` process, and the store's event rewards.

The plaza and the store share the database (one migration sequence) and the token secret,
as in production. Requests go over real HTTP, so the tests see what the page sees.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from typing import Any

from contracts.plaza import PlazaEvent
from kernel.db import connect
from kernel.settings import Settings, project_path
from streams.codec import load_codec
from testbed.proxy import free_port, wait_http
from testbed.store import StoreWorld
from testbed.topics import ScratchTopics


class PlazaWorld(StoreWorld):
    def __init__(self, stack_settings: Settings, scratch: ScratchTopics, unique: str,
                 *args: Any, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(stack_settings, scratch, unique, *args, **kwargs)
        self.plaza_topic = scratch.create("plaza", 6)
        self.plaza_port = free_port()
        self.plaza_url = f"http://127.0.0.1:{self.plaza_port}/plaza"
        self.rewards_group = f"event-rewards-{unique}"
        self.extra_env.update({
            "CREDITLEDGER_PLAZA__TOPIC": self.plaza_topic,
            "CREDITLEDGER_STORE__EVENT_TOPICS": json.dumps([self.plaza_topic]),
            "CREDITLEDGER_STORE__EVENT_REWARDS_GROUP": self.rewards_group,
            "CREDITLEDGER_STORE__PLAZA_URL": f"{self.plaza_url}/",
            "CREDITLEDGER_PLAZA__STORE_URL": f"{self.store_url}/",
        })  # fmt: skip

    def start_plaza(self, name: str = "plaza", port: int | None = None, **settings: str) -> str:
        """Start a plaza process (settings as ``plaza.<name>=value``; on ``port``, default
        the world's plaza port); its base URL."""
        for key, value in settings.items():
            self.extra_env[f"CREDITLEDGER_PLAZA__{key.upper()}"] = value
        port = port or self.plaza_port
        url = f"http://127.0.0.1:{port}/plaza"
        process = self.start_process(name, "plaza", "serve", "--port", str(port))
        wait_http(f"{url}/openapi.json", process, self.logdir / f"{name}.log")
        return url

    def start_event_rewards(self, name: str = "event-rewards") -> None:
        self.start_process(name, "store", "event-rewards")

    def plaza(self, method: str, path: str, *, token: str | None = None, body: Any = None,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:  # fmt: skip
        status, _, raw = self.raw(method, path, token=token, body=body, headers=headers,
                                  base=self.plaza_url)  # fmt: skip
        try:
            return status, json.loads(raw or b"null")
        except ValueError:
            return status, raw.decode(errors="replace")

    def publish(self, token: str, title: str, *, summary: str = "", tags: list[str] | None = None,
                steps: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
        steps = steps or [{"title": "Begin", "detail": "", "duration_minutes": 5}]
        body = {"title": title, "summary": summary, "tags": tags or [], "steps": steps}
        status, plan = self.plaza("POST", "/plans", token=token, body=body)
        assert status == 201, (status, plan)
        return dict(plan)

    def plaza_events(self) -> list[PlazaEvent]:
        """The plaza's events in the outbox, in the order written."""
        codec = load_codec(project_path(self.env_settings().schemas.avro_dir))
        with connect(self.env_settings()) as conn:
            rows = conn.execute("SELECT message_key, message_value FROM outbox WHERE topic = %s "
                                "ORDER BY id", (self.plaza_topic,)).fetchall()  # fmt: skip
        events = []
        for key, value in rows:
            event = PlazaEvent.from_record(codec.decode(bytes(value)).record)
            assert bytes(key) == event.plan_id.encode(), "keyed by plan id"
            events.append(event)
        return events

    def requests_counted(self, route: str, method: str = "GET") -> int:
        """How many requests the plaza has answered on ``route`` (its /metrics)."""
        status, _, raw = self.raw("GET", "", base=f"http://127.0.0.1:{self.plaza_port}/metrics")
        assert status == 200
        pattern = re.compile(r"^plaza_requests_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.M)
        total = 0.0
        for match in pattern.finditer(raw.decode()):
            labels = match["labels"]
            if f'route="{route}"' in labels and f'method="{method}"' in labels:
                total += float(match["value"])
        return int(total)


@contextlib.contextmanager
def plaza_world(stack_settings: Settings, scratch: ScratchTopics, unique: str, *,
                start: bool = True, **kwargs: Any) -> Iterator[PlazaWorld]:  # fmt: skip
    """A test's plaza world (the plaza started unless ``start`` is false), cleaned up
    afterwards whatever happens."""
    codec = load_codec(project_path(stack_settings.schemas.avro_dir))
    world = PlazaWorld(stack_settings, scratch, unique, codec, **kwargs)
    try:
        if start:
            world.start_plaza()
        yield world
    finally:
        world.cleanup()
