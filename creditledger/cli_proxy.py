"""Sub-commands of the LLM proxy side (step 4): proxy, outbox relay, fake upstream."""

from __future__ import annotations

import argparse
from typing import Any

from kernel.settings import Settings


def cmd_fake_upstream(args: argparse.Namespace, settings: Settings) -> int:
    from llm_proxy.fake_upstream import Behaviour, serve

    behaviour = Behaviour(
        latency_ms=args.latency_ms, chunk_delay_ms=args.chunk_delay_ms,
        output_tokens=args.output_tokens, usage_chunk=not args.no_usage_chunk,
    )  # fmt: skip
    print(f"fake upstream on http://{args.host}:{args.port}/v1 (Ctrl-C stops it)", flush=True)
    serve(args.host, args.port, behaviour, args.api_key)
    return 0


def cmd_outbox_relay(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    from contracts.records import CHARGE_TOPIC, GRANT_TOPIC
    from creditledger.cli_projections import stop_on_signals
    from outbox.relay import OutboxRelay
    from projections.migrate import migrate
    from streams.access import check_access

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    migrate(settings)  # safe on every start
    check_access(settings, write=[CHARGE_TOPIC, GRANT_TOPIC, settings.plaza.topic])
    relay = OutboxRelay(settings)
    port = settings.outbox.metrics_port if args.metrics_port is None else args.metrics_port
    if port:
        from kernel.observe import serve_metrics, with_runtime_collectors

        serve_metrics(settings.metrics.host, port,
                      with_runtime_collectors(relay.metrics.registry))  # fmt: skip
        print(f"relay metrics on http://{settings.metrics.host}:{port}/metrics", flush=True)
    should_stop = stop_on_signals()
    relay.start()
    try:
        stats = relay.run(should_stop)
    finally:
        relay.close()
    print(f"outbox relay stopped: {stats.sent} events sent in {stats.batches} batches")
    return 0


def cmd_outbox_status(args: argparse.Namespace, settings: Settings) -> int:
    from outbox.relay import OutboxRelay

    relay = OutboxRelay(settings)
    relay.start()
    try:
        print(f"{relay.pending()} events pending in the outbox")
    finally:
        relay.close()
    return 0


def cmd_proxy_serve(args: argparse.Namespace, settings: Settings) -> int:
    import logging

    from llm_proxy.app import serve
    from projections.migrate import migrate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # The HTTP client logs every upstream request at INFO: noise, and CPU on the hot path.
    for noisy in ("httpx2", "httpcore2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.port is not None:
        settings = settings.model_copy(
            update={"proxy": settings.proxy.model_copy(update={"port": args.port})}
        )
    migrate(settings)  # the outbox and price_rules tables must exist
    print(f"LLM proxy on http://{settings.proxy.host}:{settings.proxy.port}/v1 "
          f"({len(settings.proxy.models)} model aliases, {len(settings.proxy.services)} "
          "services; Ctrl-C stops it)", flush=True)  # fmt: skip
    serve(settings)
    return 0


def cmd_proxy_new_key(args: argparse.Namespace, settings: Settings) -> int:
    from llm_proxy.auth import new_key

    key, digest = new_key()
    print(f"key (give it to the service, shown once): {key}")
    print(f"key_sha256 (put it in proxy.services):    {digest}")
    return 0


def add_proxy_commands(commands: Any) -> None:
    proxy = commands.add_parser(
        "proxy", help="the OpenAI-compatible LLM proxy that charges every call",
        description="Services call /v1/chat/completions, /v1/embeddings and /v1/models with "
        "their service key and X-Billing-* headers; each finished call becomes a "
        "credit.charge.requested event through the outbox. Configure proxy.models and "
        "proxy.services first (config.example.yaml).",
    )  # fmt: skip
    actions = proxy.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("serve", help="run the proxy (needs Postgres, Redis, Kafka)")
    p.add_argument("--port", type=int, default=None, help="override proxy.port")
    p.set_defaults(handler=cmd_proxy_serve)
    p = actions.add_parser("new-key", help="make a service key and the hash for the config")
    p.set_defaults(handler=cmd_proxy_new_key)

    outbox = commands.add_parser(
        "outbox", help="the transactional outbox: relay pending events to Kafka",
        description="Events are written to Postgres first and published by relays; every "
        "event reaches Kafka at least once, and the ledger applies it once per event_id.",
    )  # fmt: skip
    actions = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("relay", help="publish pending rows (run several; SIGKILL-safe), "
                           "and drain the proxies' spool files into the outbox")  # fmt: skip
    p.add_argument("--metrics-port", type=int, default=None,
                   help="override outbox.metrics_port (0 = no /metrics)")  # fmt: skip
    p.set_defaults(handler=cmd_outbox_relay)
    p = actions.add_parser("status", help="how many events are pending")
    p.set_defaults(handler=cmd_outbox_status)

    p = commands.add_parser(
        "fake-upstream", help="run a fake OpenAI-compatible upstream LLM (tests, demo, bench)",
        description=(
            "A real HTTP server speaking the OpenAI protocol: chat completions (streamed and "
            "not, with or without the usage chunk), embeddings, models. Change its behaviour "
            "while it runs with POST /_fake/behaviour."
        ),
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=18080, help="listen port (default 18080)")
    p.add_argument("--latency-ms", type=int, default=0, help="delay before the first byte")
    p.add_argument("--chunk-delay-ms", type=int, default=0, help="delay between stream chunks")
    p.add_argument("--output-tokens", type=int, default=16, help="tokens per answer (default 16)")
    p.add_argument("--no-usage-chunk", action="store_true",
                   help="never send the final usage chunk, even when asked")  # fmt: skip
    p.add_argument("--api-key", default=None, help="require this bearer key (default: none)")
    p.set_defaults(handler=cmd_fake_upstream)
