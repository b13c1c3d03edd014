"""Running the store: one uvicorn process, or ``store.workers`` of them on one port.

With several workers, each binds the port itself with ``SO_REUSEPORT``, so the
kernel spreads new connections evenly over them by a hash of the client's
address. (uvicorn's own ``--workers`` shares one listening socket, and whichever
process wakes first accepts a whole burst: under 100 keep-alive clients one of
two workers held 88 connections, and its queue set the p99.)

The supervisor (this process) binds nothing but checks first that the port is
free, so a forgotten store on the same port cannot silently share the traffic. It
restarts a worker that dies, and stops them all on SIGTERM or SIGINT. A worker
whose supervisor dies (even by SIGKILL) stops by itself: it would otherwise keep
serving with no one to stop it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from kernel.errors import StackError
from kernel.settings import Settings

log = logging.getLogger(__name__)

BACKLOG = 2048
STOP_GRACE_S = 10.0
RESTART_PAUSE_S = 1.0
# A worker that dies this soon after its start, this many times in a row, cannot start
# (Postgres unreachable, a bad setting): the supervisor gives up instead of looping.
EARLY_EXIT_S = 10.0
EARLY_EXITS_TO_GIVE_UP = 3


def uvicorn_config(app: Any, settings: Settings, log_level: str) -> Any:
    import uvicorn

    # No proxy-headers middleware: the store never uses the client's address.
    return uvicorn.Config(app, loop="uvloop", http="httptools", access_log=False,
                          log_level=log_level, proxy_headers=False,
                          host=settings.store.host, port=settings.store.port)  # fmt: skip


def serve(settings: Settings, *, log_level: str = "warning") -> None:
    """Serve the store until stopped (SIGTERM / SIGINT)."""
    import uvicorn

    from store.api import create_app

    if settings.store.workers == 1:
        uvicorn.Server(uvicorn_config(create_app(settings), settings, log_level)).run()
        return
    Supervisor(settings, log_level).run()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_port_free(host: str, port: int) -> None:
    """Bind without ``SO_REUSEPORT``: refused while anything listens there, even a store
    whose own sockets share it. (``SO_REUSEADDR`` only lets it past the TIME_WAIT
    connections a store killed a moment ago leaves behind.)"""
    probe = socket.socket(_family(host), socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
    except OSError as exc:
        raise StackError(f"cannot serve the store on {host}:{port}: {exc.strerror} "
                         "(is another store running?)") from exc  # fmt: skip
    finally:
        probe.close()


def reuseport_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    return sock


def run_worker(settings: Settings, log_level: str, sweeper: bool, supervisor_pid: int) -> None:
    """One worker process: its own socket on the shared port, its own app and pools."""
    import uvicorn

    from store.api import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    _stop_when_orphaned(supervisor_pid)
    sock = reuseport_socket(settings.store.host, settings.store.port)
    app = create_app(settings, sweeper=sweeper)
    uvicorn.Server(uvicorn_config(app, settings, log_level)).run(sockets=[sock])


def _stop_when_orphaned(supervisor_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == supervisor_pid:
            time.sleep(1.0)
        log.warning("the store's supervisor is gone; this worker stops")
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


class Supervisor:
    """Starts ``store.workers`` workers, restarts any that die, stops them on a signal."""

    def __init__(self, settings: Settings, log_level: str) -> None:
        self.settings = settings
        self.log_level = log_level
        self.context = multiprocessing.get_context("spawn")  # no forked pools or loops
        self.workers: dict[int, BaseProcess] = {}
        self.started_at: dict[int, float] = {}
        self.early_exits = 0
        self.stopping = False

    def start_worker(self, index: int) -> None:
        # Worker 0 alone runs the order sweep: one sweeper is enough, and it is the same
        # slot after a restart.
        process = self.context.Process(
            target=run_worker, name=f"store-worker-{index}",
            args=(self.settings, self.log_level, index == 0, os.getpid()),
        )  # fmt: skip
        process.start()
        self.workers[index] = process
        self.started_at[index] = time.monotonic()

    def run(self) -> None:
        store = self.settings.store
        check_port_free(store.host, store.port)
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}  # fmt: skip
        try:
            for index in range(store.workers):
                self.start_worker(index)
            log.info("store: %d workers on %s:%d", store.workers, store.host, store.port)
            while not self.stopping:
                wait([p.sentinel for p in self.workers.values()], timeout=1.0)
                for index, process in list(self.workers.items()):
                    if not process.is_alive() and not self.stopping:
                        self._replace(index, process.exitcode)
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _replace(self, index: int, exitcode: int | None) -> None:
        if time.monotonic() - self.started_at[index] < EARLY_EXIT_S:
            self.early_exits += 1
        else:
            self.early_exits = 0
        if self.early_exits >= EARLY_EXITS_TO_GIVE_UP:
            raise StackError(f"store workers keep exiting right after they start (worker "
                             f"{index}: code {exitcode}); see their log lines above")  # fmt: skip
        log.warning("store worker %d exited (code %s); starting it again", index, exitcode)
        time.sleep(RESTART_PAUSE_S)  # no spinning on a worker that cannot start
        self.start_worker(index)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def stop(self) -> None:
        self.stopping = True
        for process in self.workers.values():
            if process.is_alive():
                with contextlib.suppress(OSError):
                    process.terminate()  # SIGTERM: uvicorn finishes requests in flight
        deadline = time.monotonic() + STOP_GRACE_S
        for process in self.workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
