"""Every long-running process is observable, checked with a real Prometheus.

The whole pipeline runs (ledger worker, both projectors, relay, proxy, store) with its
/metrics ports, under a little traffic (grants, SDK calls, a purchase, one malformed
command that is dead-lettered). Debian's ``prometheus`` scrapes every process; ``promtool``
checks the alert rules in ``deploy/prometheus``; every metric the rules and the Grafana
dashboard name is exported by some process; /healthz and /readyz answer.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from contracts.records import CHARGE_TOPIC, LEDGER_TOPIC
from kernel.settings import PROJECT_ROOT, Settings
from streams.kafka_clients import make_producer
from testbed.ledger import WorkerGroup
from testbed.load import GRANT, PROMPT, buy_starter, grant, snapshots
from testbed.proxy import free_port, wait_for
from testbed.store import StoreWorld, store_world
from testbed.topics import ScratchTopics

RULES = PROJECT_ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = PROJECT_ROOT / "deploy" / "grafana" / "creditledger.json"
# Names in a PromQL expression that are ours or the runtime collectors' metrics.
METRIC = re.compile(r"\b((?:ledger|projector|outbox|llm_proxy|store|process|python)_[a-z_]+)\b")


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is needed (Debian's `prometheus` package): `./dev test` installs "
                    "it; or apt-get install prometheus", pytrace=False)  # fmt: skip
    return found


@pytest.fixture
def world(stack_settings: Settings, scratch: ScratchTopics, unique: str) -> Iterator[StoreWorld]:
    with store_world(stack_settings, scratch, unique, start=False,
                     ledger_topic=LEDGER_TOPIC) as world:  # fmt: skip
        yield world


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError as exc:  # not listening (yet)
        return 0, str(exc).encode()


def start_observed(world: StoreWorld, workers: WorkerGroup) -> dict[str, str]:
    """The pipeline with a metrics port each: job name -> host:port."""
    ports = {name: free_port() for name in ("worker", "project-postgres", "project-redis",
                                            "relay")}  # fmt: skip
    workers.extra_env["CREDITLEDGER_METRICS__WORKER_PORT"] = str(ports["worker"])
    workers.start("w1")
    world.start_upstream()
    world.start_proxy()
    world.start("relay", "outbox", "relay", "--metrics-port", str(ports["relay"]))
    for sink in ("postgres", "redis"):
        name = f"project-{sink}"
        world.start_process(name, "project", sink, "--metrics-port", str(ports[name]))
    world.start_store()
    targets = {f"creditledger-{name}": f"127.0.0.1:{port}" for name, port in ports.items()}
    targets["creditledger-proxy"] = f"127.0.0.1:{world.port}"
    targets["creditledger-store"] = f"127.0.0.1:{world.store_port}"
    return targets


def traffic(world: StoreWorld, users: list[str]) -> None:
    grant(world, users)
    wait_for(
        "the grants in Redis",
        lambda: snapshots(world, users) == dict.fromkeys(users, GRANT),
        120,
        world,
    )
    for n in range(4):
        client = world.client(users[n % 2])
        client.chat.completions.create(model="chat", messages=PROMPT, stream=n % 2 == 1)
    buy_starter(world, users[0])
    producer = make_producer(world.env_settings())  # a malformed command: dead-lettered
    producer.produce(CHARGE_TOPIC, key=users[1].encode(), value=b"not avro")
    assert producer.flush(30) == 0


def exported(text: str) -> set[str]:
    """Every metric name a scrape offers (families, and their samples' names)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        names.update(family.name + s for s in suffixes.get(family.type, []))
        names.update(sample.name for sample in family.samples)
    return names


def referenced() -> set[str]:
    exprs = [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"]
             for rule in group["rules"]]  # fmt: skip
    exprs += [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"]
              for target in panel["targets"]]  # fmt: skip
    return {name for expr in exprs for name in METRIC.findall(expr)}


def run_prometheus(targets: dict[str, str], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(RULES)],
              "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [address]}]}
                                 for job, address in targets.items()]}  # fmt: skip
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = subprocess.run([tool("promtool"), "check", "config",
                              str(workdir / "prometheus.yml")],
                             capture_output=True, text=True)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
         f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    return process, f"http://127.0.0.1:{port}"


def query(base: str, expr: str) -> list[Any]:
    url = f"{base}/api/v1/query?query={urllib.parse.quote(expr)}"
    status, body = get(url)
    assert status == 200, body
    result: list[Any] = json.loads(body)["data"]["result"]
    return result


def test_every_process_is_scraped_and_every_watched_metric_exists(
        world: StoreWorld, unique: str, tmp_path: Path) -> None:  # fmt: skip
    rules = subprocess.run([tool("promtool"), "check", "rules", str(RULES)],
                           capture_output=True, text=True)  # fmt: skip
    assert rules.returncode == 0, rules.stdout + rules.stderr
    workers = WorkerGroup(unique, world.env_settings())
    prometheus = None
    try:
        targets = start_observed(world, workers)
        traffic(world, [f"{unique}-obs-u{n}" for n in range(2)])
        wait_for("the dead letter counted", lambda: b"ledger_dead_letters_total{" in get(
            f"http://{targets['creditledger-worker']}/metrics")[1], 60, world)  # fmt: skip
        prometheus, base = run_prometheus(targets, tmp_path)
        wait_for("Prometheus scraping every process",
                 lambda: get(f"{base}/-/ready")[0] == 200
                 and len(query(base, "up == 1")) == len(targets), 60, world)  # fmt: skip
        scraped: set[str] = set()
        for job, address in targets.items():
            status, body = get(f"http://{address}/metrics")
            assert status == 200, (job, body[:200])
            names = exported(body.decode())
            assert "process_resident_memory_bytes" in names, job  # runtime collectors kept
            scraped |= names
            assert get(f"http://{address}/healthz")[0] == 200, job
        missing = referenced() - scraped
        assert not missing, f"named in the rules or the dashboard but exported by no process: " \
            f"{sorted(missing)}"  # fmt: skip
        # Prometheus stored them too: the charge counter of the calls above, per service.
        charged = query(base, "llm_proxy_charged_microcredits_total")
        assert {r["metric"]["service"] for r in charged} == {"billing"}, charged
        for address in (f"127.0.0.1:{world.port}", f"127.0.0.1:{world.store_port}"):
            status, body = get(f"http://{address}/readyz")
            assert status == 200 and json.loads(body)["status"] == "ready", (address, body)
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)
        workers.cleanup()
