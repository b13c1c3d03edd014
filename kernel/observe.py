"""The operators' HTTP endpoints of a process that serves no HTTP of its own (the ledger
worker, the projectors, the relay): ``/metrics`` (Prometheus text format, with the
process and GC collectors), ``/healthz`` (the process is alive) and ``/readyz`` (its
dependencies answer, when it names a check). A daemon thread; binding is loopback unless
``metrics.host`` says otherwise."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)

from kernel.errors import ConfigError

log = logging.getLogger(__name__)

Readiness = Callable[[], dict[str, str]]


def with_runtime_collectors(registry: CollectorRegistry) -> CollectorRegistry:
    """``registry`` plus the process, GC and platform collectors of the default one."""
    for collector in (PROCESS_COLLECTOR, GC_COLLECTOR, PLATFORM_COLLECTOR):
        registry.register(collector)
    return registry


def serve_metrics(host: str, port: int, registry: CollectorRegistry,
                  readiness: Readiness | None = None) -> ThreadingHTTPServer:  # fmt: skip
    """Serve the endpoints on ``host:port``; a port that is taken is a ConfigError (two
    processes of one kind on a host need a port each)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                self._answer(200, b'{"status":"ok"}', "application/json")
            elif self.path == "/readyz":
                checks = readiness() if readiness else {}
                ok = all(value == "ok" for value in checks.values())
                body = json.dumps({"status": "ready" if ok else "not_ready", "checks": checks})
                self._answer(200 if ok else 503, body.encode(), "application/json")
            else:
                self._answer(404, b'{"status":"not_found"}', "application/json")

        def _answer(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # a scrape every few seconds is not news

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise ConfigError(f"cannot serve /metrics on {host}:{port} ({exc.strerror}): another "
                          "process has that port; give this one its own (--metrics-port, or "
                          "the metrics.* settings)") from exc  # fmt: skip
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
