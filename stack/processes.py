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
        signal_group(pid, first_signal)
        deadline = time.monotonic() + timeout_s
        while is_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        # Whatever is left in the group (a stuck JVM, orphaned backends) goes now.
        signal_group(pid, signal.SIGKILL)
        while is_alive(pid) and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
        return True


class ProcessGroup:
    """Child processes of one owner (a test, a benchmark, a demo), each in a session of its
    own with its output appended to ``<logdir>/<name>.log``, so that stopping or killing
    one ends its whole process group (a supervisor's children, a server's workers) and
    nothing outlives the owner."""

    def __init__(self, logdir: Path, env: dict[str, str] | None = None) -> None:
        self.logdir = logdir
        self.env = env
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        logdir.mkdir(parents=True, exist_ok=True)

    def log(self, name: str) -> Path:
        return self.logdir / f"{name}.log"

    def start(self, name: str, argv: Sequence[str], *,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
        """Start ``argv`` as ``name`` (a name already running is an error: stop it first)."""
        running = self.processes.get(name)
        if running is not None and running.poll() is None:
            raise StackError(f"{name} is running already (pid {running.pid})")
        self.logdir.mkdir(parents=True, exist_ok=True)
        with self.log(name).open("ab") as log:
            process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, env=env or self.env,
                                       start_new_session=True)  # fmt: skip
        self.processes[name] = process
        return process

    def adopt(self, name: str, process: subprocess.Popen[bytes]) -> None:
        """A process started elsewhere (in a session of its own) that this group now ends."""
        self.processes[name] = process

    def alive(self, name: str) -> bool:
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def kill(self, name: str) -> None:
        """SIGKILL to the whole group: no shutdown hook, no final commit, no flush."""
        self._end(self.processes[name], 0.0)

    def stop(self, name: str, timeout_s: float = 30) -> None:
        """SIGTERM to the group, then SIGKILL to what is left after ``timeout_s``."""
        self._end(self.processes[name], timeout_s)

    def stop_all(self, timeout_s: float = 30) -> None:
        """Stop every process, all signalled at once (a slow one delays only itself)."""
        for process in self.processes.values():
            if process.returncode is None:
                signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in self.processes.values():
            self._end(process, max(0.0, deadline - time.monotonic()))

    @staticmethod
    def _end(process: subprocess.Popen[bytes], timeout_s: float) -> None:
        if process.returncode is not None:
            return  # reaped before: its pid may belong to a stranger by now
        if timeout_s > 0:
            signal_group(process.pid, signal.SIGTERM)
            _exited(process.pid, timeout_s)
        # The leader is not reaped yet (a zombie at most), so its pid is still its group's
        # and cannot be reused: whatever is left in the group goes now.
        signal_group(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def tail(self, name: str, lines: int = 40) -> str:
        try:
            text = self.log(name).read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def tails(self, lines: int = 15) -> str:
        """The last lines of every process's log, for a failing assertion's message."""
        return "\n".join(f"--- {name}\n{self.tail(name, lines)}" for name in self.processes)


def _exited(pid: int, timeout_s: float) -> bool:
    """Wait until our child ``pid`` has exited, without reaping it; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


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


def signal_group(pid: int, sig: int) -> None:
    """``sig`` to the process group led by ``pid`` (or to ``pid`` alone if it leads none)."""
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
