"""The stack launcher, driven through the CLI as a person would.

A second stack on free ports (its own state directory) is started, started
again, inspected and stopped, and afterwards no process of it may remain.
The session's own stack is left alone throughout.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.errors import StackError
from kernel.settings import Settings, load_settings
from stack.processes import ServiceDir, is_alive, port_open
from stack.redis import RedisService

CLI_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _base_env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith("CREDITLEDGER_")}
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "REDIS_URL"):
        keep.pop(name, None)
    return keep


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "creditledger.cli", *args],
        env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
    )  # fmt: skip


def _our_processes(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline and is_alive(int(entry.name)):
                found.append(int(entry.name))
    return found


@pytest.fixture
def second_stack(unique: str) -> Iterator[tuple[dict[str, str], Path, dict[str, int]]]:
    # Not under pytest's tmp_path: that is private to root, and Postgres runs unprivileged.
    state_dir = Path(f"/tmp/creditledger-test-{unique}")
    ports = {name: _free_port() for name in ("kafka", "controller", "postgres", "redis")}
    env = _base_env() | {
        "CREDITLEDGER_STACK__STATE_DIR": str(state_dir),
        "CREDITLEDGER_STACK__KAFKA_HEAP_MB": "256",
        "CREDITLEDGER_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{ports['kafka']}",
        "CREDITLEDGER_STACK__KAFKA_CONTROLLER_PORT": str(ports["controller"]),
        "CREDITLEDGER_POSTGRES__URL": (
            f"postgresql://creditledger:secret-{unique}@127.0.0.1:{ports['postgres']}/ledger"
        ),
        "CREDITLEDGER_REDIS__URL": f"redis://127.0.0.1:{ports['redis']}/0",
        # --wipe deletes the workers' state too: never the session's own.
        "CREDITLEDGER_LEDGER__DATA_DIR": f"{state_dir}-worker",
    }
    yield env, state_dir, ports
    _cli(env, "stack", "down", "--wipe")
    shutil.rmtree(state_dir, ignore_errors=True)
    shutil.rmtree(f"{state_dir}-worker", ignore_errors=True)


def test_up_is_idempotent_and_down_leaves_nothing(
    second_stack: tuple[dict[str, str], Path, dict[str, int]],
) -> None:
    env, state_dir, ports = second_stack

    first = _cli(env, "stack", "up")
    assert first.returncode == 0, first.stderr
    pids = {name: int((state_dir / name / f"{name}.pid").read_text())
            for name in ("kafka", "postgres", "redis")}  # fmt: skip
    assert first.stdout.count(" started ") == 3, first.stdout

    again = _cli(env, "stack", "up")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count(" running ") == 3, again.stdout
    assert {name: int((state_dir / name / f"{name}.pid").read_text())
            for name in pids} == pids  # fmt: skip

    status = _cli(env, "stack", "status")
    assert status.returncode == 0, status.stdout

    down = _cli(env, "stack", "down")
    assert down.returncode == 0, down.stderr
    assert down.stdout.count(" stopped ") == 3, down.stdout
    for name, pid in pids.items():
        assert not is_alive(pid), f"{name} (pid {pid}) still running after stack down"
    for name, port in ports.items():
        assert not port_open("127.0.0.1", port), f"{name} port {port} still open"
    assert _our_processes(str(state_dir)) == []

    after = _cli(env, "stack", "status")
    assert after.returncode == 3
    assert after.stdout.count(" down ") == 3

    # --wipe deletes the services' data and the ledger workers' state folded from them.
    worker_state = Path(env["CREDITLEDGER_LEDGER__DATA_DIR"])
    (worker_state / "w1").mkdir(parents=True)
    (worker_state / "w1" / "offsets").write_text("9876")
    wiped = _cli(env, "stack", "down", "--wipe")
    assert wiped.returncode == 0, wiped.stderr
    assert not state_dir.exists() and not worker_state.exists(), wiped.stdout
    assert f"removed {worker_state}" in wiped.stdout


def test_external_services_are_used_as_they_are(stack_settings: Settings, unique: str) -> None:
    state_dir = Path(f"/tmp/creditledger-test-{unique}")
    env = _base_env() | {
        "CREDITLEDGER_STACK__STATE_DIR": str(state_dir),
        "KAFKA_BOOTSTRAP_SERVERS": stack_settings.kafka.bootstrap_servers,
        "DATABASE_URL": stack_settings.postgres_dsn,
        "REDIS_URL": stack_settings.redis_url,
    }
    try:
        up = _cli(env, "stack", "up")
        assert up.returncode == 0, up.stderr
        assert up.stdout.count(" external ") == 3, up.stdout
        assert not list(state_dir.glob("*/*.pid")), "nothing may be started for external services"
        down = _cli(env, "stack", "down")
        assert down.returncode == 0, down.stderr
        assert down.stdout.count(" external ") == 3
        # The services are someone else's: still answering after `down`.
        status = _cli(env, "stack", "status")
        assert status.returncode == 0, status.stdout
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def test_a_dying_service_is_reported_with_its_log(tmp_path: Path) -> None:
    service = ServiceDir("doomed", tmp_path / "doomed")
    pid = service.spawn(["sh", "-c", "echo 'FATAL: bad config line 7'; exit 3"])
    with pytest.raises(StackError) as caught:
        service.wait_ready(lambda: False, timeout_s=30, pid=pid)
    message = str(caught.value)
    assert "doomed exited during start-up" in message
    assert str(service.log_file) in message
    assert "FATAL: bad config line 7" in message


def test_a_slow_service_times_out_naming_its_log(tmp_path: Path) -> None:
    service = ServiceDir("sleepy", tmp_path / "sleepy")
    # The folder on the command line is what marks the process as ours (see ServiceDir).
    pid = service.spawn(["sh", "-c", "sleep 30; true", str(service.root)])
    try:
        with pytest.raises(StackError, match=r"sleepy not ready after 1 s; see .*sleepy\.log"):
            service.wait_ready(lambda: False, timeout_s=1, pid=pid)
    finally:
        service.stop(timeout_s=5)
    assert not is_alive(pid)


def test_a_port_taken_by_someone_else_is_refused(unique: str) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        settings = load_settings(
            redis={"url": f"redis://127.0.0.1:{port}/0"},
            stack={"state_dir": f"/tmp/creditledger-test-{unique}"},
        )
        with pytest.raises(StackError, match=f"port {port} .* taken .* REDIS_URL"):
            RedisService(settings).start()
    shutil.rmtree(f"/tmp/creditledger-test-{unique}", ignore_errors=True)
