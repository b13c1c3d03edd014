"""Start, find, wait for and stop the local services' processes.

Each service has a folder under the stack's state directory holding its data,
its log file and a PID file. A PID file alone is not proof of ownership (PIDs
are reused), so a process only counts as ours while its command line still
names the service folder. Processes start in a session of their own so that a
stop can signal the whole group (Postgres backends, JVM helpers) and leave
nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kernel.errors import StackError

LOG_TAIL_LINES = 15


@dataclass(frozen=True)
class ServiceDir:
    """The on-disk home of one managed service."""

    name: str
    root: Path

    @property
    def pid_file(self) -> Path:
        return self.root / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.root / f"{self.name}.log"

    def running_pid(self) -> int | None:
        """The PID of our live process, or None (a stale PID file is removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if _owns(pid, str(self.root)):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        user: str | None = None,
    ) -> int:
        """Start ``argv`` detached, output appended to the log file, and record its PID."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            log.write(f"\n--- started by creditledger at {time.ctime()}: {argv[0]}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.root,
                    env=env,
                    user=user,
                    start_new_session=True,
                )
            except OSError as exc:
                raise StackError(f"{self.name}: cannot run {argv[0]}: {exc}") from exc
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc.pid

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log yet)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, probe: Callable[[], bool], timeout_s: float, pid: int | None) -> float:
        """Poll ``probe`` until it answers True; return the seconds waited.

        Fails early, with the log's tail, if the process we started has died.
        """
        started = time.monotonic()
        delay = 0.1
        while True:
            if probe():
                return time.monotonic() - started
            if pid is not None and not is_alive(pid):
                raise StackError(
                    f"{self.name} exited during start-up; see {self.log_file}. Last lines:\n"
                    f"{self.tail()}"
                )
            if time.monotonic() - started > timeout_s:
                raise StackError(
                    f"{self.name} not ready after {timeout_s:.0f} s; see {self.log_file}. "
                    f"Last lines:\n{self.tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def stop(self, timeout_s: float, first_signal: int = signal.SIGTERM) -> bool:
        """Stop our process group gracefully, then by force; True if something was stopped."""
        pid = self.running_pid()
        if pid is None:
            return False
        _signal_group(pid, first_signal)
        deadline = time.monotonic() + timeout_s
        while is_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        # Whatever is left in the group (a stuck JVM, orphaned backends) goes now.
        _signal_group(pid, signal.SIGKILL)
        while is_alive(pid) and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
        return True


def wait_until(probe: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``probe`` with a growing delay; False if it never answered True in time."""
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        if probe():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def http_answers(url: str) -> bool:
    """True when ``url`` gives any HTTP answer (an error status counts: the server is up)."""
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def wait_http(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Until ``url`` answers; False if ``process`` (the server) exits or time runs out."""
    answered = wait_until(lambda: process.poll() is not None or http_answers(url), timeout_s)
    return answered and process.poll() is None


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone; reap it if we can.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _owns(pid: int, marker: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return marker in cmdline and is_alive(pid)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def refuse_taken_port(host: str, port: int, override: str) -> None:
    """Before starting a service: a port already in use belongs to a stranger.

    ``override`` names the setting that would use that stranger instead.
    """
    if port_open(host, port):
        raise StackError(
            f"port {port} on {host} is taken by a process this launcher did not start; "
            f"stop it, or set {override} to use it as is"
        )


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
