"""Sub-commands of the read side: migrate, project, replay, verify, read.

Kept apart from ``cli.py`` so each file stays small; the handlers are as thin
as the others (parse, call :mod:`projections`, print).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from collections.abc import Callable
from datetime import UTC
from typing import TYPE_CHECKING, Any

from creditledger.tables import render_table
from kernel.settings import Settings, project_path

if TYPE_CHECKING:
    from streams.codec import AvroCodec

PER_TABLE = 10  # differences shown per store and table


def credits(micro: int) -> str:
    """Micro-credits as a decimal string, without ever going through a float."""
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), 1_000_000)
    return f"{sign}{whole}.{fraction:06d}"


def project_codec(settings: Settings) -> AvroCodec:
    """The codec of the project's contracts (``schemas.avro_dir``); every handler's one."""
    from streams.codec import load_codec

    return load_codec(project_path(settings.schemas.avro_dir))


def stop_on_signals() -> Callable[[], bool]:
    """SIGINT/SIGTERM set a flag the long-running loops check between batches."""
    stopping = {"now": False}

    def handler(signum: int, _frame: Any) -> None:
        if stopping["now"]:  # a second Ctrl-C: leave at once (still safe: one tx per batch)
            raise KeyboardInterrupt
        stopping["now"] = True
        logging.getLogger("creditledger").warning(
            "%s: finishing the current batch, then stopping", signal.Signals(signum).name
        )

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return lambda: stopping["now"]


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from projections.migrate import migrate

    report = migrate(settings)
    rows = [(f"{m.version:04d}", m.name, "applied") for m in report.applied]
    if rows:
        print(render_table(["version", "migration", "result"], rows))
    print(f"{len(report.applied)} applied, {report.already} already applied")
    return 0


def cmd_project(args: argparse.Namespace, settings: Settings) -> int:
    from projections.migrate import migrate
    from projections.postgres_sink import PostgresSink
    from projections.projector import Projector, Sink
    from projections.redis_sink import RedisSink
    from streams import topic_admin
    from streams.access import check_access
    from streams.topics import settings_topics

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    spec = settings_topics(settings)
    group = settings.projections.postgres_group if args.sink == "postgres" \
        else settings.projections.redis_group  # fmt: skip
    check_access(settings, read=[args.topic or settings.projections.ledger_topic],
                 groups=[group])  # fmt: skip
    if (args.topic or settings.projections.ledger_topic) in spec.topics:
        # As the worker does: safe on every start, refuses (changing nothing) on drift.
        topic_admin.apply(topic_admin.make_admin(settings), spec,
                          settings.kafka.request_timeout_ms / 1000)  # fmt: skip
    sink: Sink
    if args.sink == "postgres":
        migrate(settings)  # safe on every start: a no-op once applied
        sink, group = PostgresSink(settings), settings.projections.postgres_group
    else:
        sink, group = RedisSink(settings), settings.projections.redis_group
    # retry_for_s=None: a restart of Postgres or Redis is waited out, however long it takes.
    projector = Projector(settings, sink, project_codec(settings), group_id=group,
                          topic=args.topic, retry_for_s=None)  # fmt: skip
    default_port = settings.metrics.postgres_projector_port if args.sink == "postgres" \
        else settings.metrics.redis_projector_port  # fmt: skip
    port = default_port if args.metrics_port is None else args.metrics_port
    if port:
        from kernel.observe import serve_metrics, with_runtime_collectors

        serve_metrics(settings.metrics.host, port,
                      with_runtime_collectors(projector.metrics.registry))  # fmt: skip
    should_stop = stop_on_signals()
    projector.start()
    try:
        stats = projector.run(should_stop)
    finally:
        projector.close()
    print(f"{args.sink} projector stopped: {stats.applied} entries applied in {stats.batches} "
          f"batches, {stats.skipped} redelivered entries skipped")  # fmt: skip
    return 0


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from projections.replay import Replay

    replay = Replay(settings, project_codec(settings), topic=args.topic, progress=not args.quiet,
                    should_stop=stop_on_signals())  # fmt: skip
    t0 = time.monotonic()
    if args.redis_only:
        replay.rebuild_redis()
        report = replay.report
    else:
        report = replay.run(restart=args.restart, redis=not args.no_redis)
    seconds = time.monotonic() - t0
    if report.interrupted:
        print(f"replay interrupted after loading {report.loaded} entries; run `creditledger "
              "replay` again to resume (or --restart to start over)")  # fmt: skip
        return 130
    rate = report.loaded / report.load_seconds if report.load_seconds else 0.0
    print(render_table(
        ["entries", "accounts", "loaded", "caught up", "redis snapshots", "load entries/s",
         "build s", "swap s", "total s", "resumed"],
        [(report.entries, report.accounts, report.loaded, report.caught_up,
          report.redis_snapshots, f"{rate:,.0f}", f"{report.build_seconds:.1f}",
          f"{report.swap_seconds:.2f}", f"{seconds:.1f}", "yes" if report.resumed else "no")],
    ))  # fmt: skip
    return 0


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from projections.verify import verify

    report = verify(settings, project_codec(settings), topic=args.topic,
                    postgres=not args.redis_only, redis=not args.postgres_only,
                    progress=not args.quiet,
                    max_lag_s=None if args.max_lag_s < 0 else args.max_lag_s,
                    expect_running=args.expect_running)  # fmt: skip
    print(f"folded {report.entries_read} entries of {report.users} users; "
          f"postgres progress {sum(report.postgres_progress.values())}, "
          f"redis progress {sum(report.redis_progress.values())} entries")  # fmt: skip
    if report.ok:
        print("verify: OK, the read models equal the fold of the ledger")
        return 0
    shown = report.sample(PER_TABLE)
    print(render_table(
        ["store", "table", "user", "field", "expected", "found"],
        [(d.store, d.table, d.user_id, d.field, d.expected, d.found) for d in shown],
    ))  # fmt: skip
    more = len(report.differences) - len(shown)
    print(f"verify: FAILED, {len(report.differences)} difference(s)"
          f"{f' ({more} not shown)' if more else ''}")  # fmt: skip
    return 1


def cmd_read(args: argparse.Namespace, settings: Settings) -> int:
    from projections.queries import ReadModels

    async def run() -> int:
        models = ReadModels(settings)
        await models.start()
        try:
            if args.what == "balance":
                b = await models.balance(args.user)
                headers = ["user", "balance (credits)", "balance_micro", "seq", "source"]
                row = (b.user_id, credits(b.balance_micro), b.balance_micro, b.seq, b.source)
                print(render_table(headers, [row]))
            elif args.what == "consumption":
                c = await models.consumption(args.user, args.period)
                rows = [(p.start.strftime("%Y-%m-%d %H:%M"), credits(p.total.credits_micro),
                         p.total.input_tokens, p.total.output_tokens, p.total.calls)
                        for p in c.series
                        if p.total.calls or c.window.bucket == "hour"]  # fmt: skip
                print(render_table(["from (UTC)", "credits", "input", "output", "calls"], rows))
                print(render_table(
                    ["model", "credits", "input", "output", "cached", "reasoning", "calls"],
                    [(m, credits(u.credits_micro), u.input_tokens, u.output_tokens,
                      u.cached_tokens, u.reasoning_tokens, u.calls)
                     for m, u in [*c.by_model.items(), ("total", c.total)]]))  # fmt: skip
            else:
                page = await models.history(args.user, cursor=args.cursor, limit=args.limit)
                print(render_table(
                    ["seq", "kind", "amount", "balance after", "model", "scene", "recorded (UTC)"],
                    [(e.seq, e.kind, credits(e.amount_micro), credits(e.balance_after_micro),
                      e.model_alias or "-", e.scene or "-",
                      e.recorded_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"))
                     for e in page.entries]))  # fmt: skip
                print(
                    f"next cursor: {page.next_cursor}" if page.next_cursor else "no older entries"
                )
        finally:
            await models.close()
        return 0

    return asyncio.run(run())


def add_projection_commands(commands: Any) -> None:
    """migrate, project, replay, verify and read: the read models' commands."""
    _build_commands(commands)
    _verify_command(commands)
    _read_commands(commands)


def _build_commands(commands: Any) -> None:
    p = commands.add_parser(
        "migrate", help="apply the Postgres migrations (idempotent)",
        description="Apply every pending projections/migrations/NNNN_*.sql in order, each in "
        "its own transaction; refuse if an applied migration's file changed.",
    )  # fmt: skip
    p.set_defaults(handler=cmd_migrate)

    p = commands.add_parser(
        "project", help="run a projector: ledger entries into Redis or Postgres",
        description=(
            "Materialise credit.ledger.entries into a read model, in its own consumer group, "
            "resuming from the progress stored with the rows. Run several to share the "
            "partitions. Stops after the current batch on SIGINT/SIGTERM; SIGKILL is safe too."
        ),
    )  # fmt: skip
    p.add_argument("sink", choices=["postgres", "redis"], help="which read model")
    p.add_argument("--topic", default=None, help="ledger topic (default: projections.ledger_topic)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="/metrics and /healthz (default metrics.postgres_projector_port or "
                   "metrics.redis_projector_port; 0: none)")  # fmt: skip
    p.set_defaults(handler=cmd_project)

    p = commands.add_parser(
        "replay", help="rebuild the Postgres read models from offset 0, then the Redis snapshots",
        description=(
            "Load the whole ledger topic into shadow tables, build them, catch up, and swap "
            "them in atomically (readers never see a half-built state); then rewrite the "
            "Redis snapshots. Interrupt with Ctrl-C and run again to resume."
        ),
    )  # fmt: skip
    p.add_argument("--topic", default=None, help="ledger topic (default: projections.ledger_topic)")
    p.add_argument("--restart", action="store_true", help="drop an unfinished replay, start over")
    p.add_argument("--no-redis", action="store_true", help="skip the Redis rebuild")
    p.add_argument("--redis-only", action="store_true",
                   help="only rewrite Redis snapshots from the Postgres accounts")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_replay)


def _verify_command(commands: Any) -> None:
    p = commands.add_parser(
        "verify", help="fold the ledger and compare with Postgres and Redis; exit 1 on a diff",
        description=(
            "Fold credit.ledger.entries independently and compare accounts, entry figures and "
            "hourly consumption in Postgres, and the balance snapshots in Redis, each against "
            "the prefix of the log that store has applied. Prints every difference. Also "
            "fails on entries the projectors quarantined (a field breaks its rule), on a "
            "store that does not reach the end of the log within --max-lag-s (a stalled or "
            "stopped projector), and with --expect-running on a projector group without a "
            "live member."
        ),
    )  # fmt: skip
    p.add_argument("--topic", default=None, help="ledger topic (default: projections.ledger_topic)")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--postgres-only", action="store_true", help="skip Redis")
    only.add_argument("--redis-only", action="store_true", help="skip Postgres")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--max-lag-s", type=float, default=30.0, metavar="S",
                   help="how long each store may take to reach the log's end as of the "
                   "start (default 30; a negative value skips the check)")  # fmt: skip
    p.add_argument(
        "--expect-running",
        action="store_true",
        help="fail unless each checked projector group has a live member",
    )
    p.set_defaults(handler=cmd_verify)


def _read_commands(commands: Any) -> None:
    read = commands.add_parser(
        "read", help="query the read models: balance, consumption, history",
        description="What the credit-store API shows, from the command line.",
    )  # fmt: skip
    read_commands = read.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = read_commands.add_parser("balance", help="the balance snapshot (Redis, else Postgres)")
    p.add_argument("user")
    p.set_defaults(handler=cmd_read)
    p = read_commands.add_parser("consumption", help="credits and tokens over a period")
    p.add_argument("user")
    p.add_argument("--period", default="24h", choices=["24h", "7d", "30d", "all"])
    p.set_defaults(handler=cmd_read)
    p = read_commands.add_parser("history", help="ledger entries, newest first")
    p.add_argument("user")
    p.add_argument("--limit", type=int, default=20, help="entries per page (1-200, default 20)")
    p.add_argument("--cursor", default=None, help="next cursor printed by the previous page")
    p.set_defaults(handler=cmd_read)
