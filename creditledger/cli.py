"""``creditledger``: one command, one sub-command per job, ``--help`` on each.

Handlers stay thin: parse arguments, call a module that does the work, print.
Any :class:`CreditLedgerError` becomes a one-line message and exit status 1, a
:class:`ConfigError` (a setting that cannot work) exit status 78 (sysexits' EX_CONFIG,
which a supervisor does not restart); bad arguments exit with 2 (argparse's convention).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from creditledger.cli_plaza import add_plaza_commands
from creditledger.cli_projections import add_projection_commands, credits, project_codec
from creditledger.cli_proxy import add_proxy_commands
from creditledger.cli_store import add_store_commands
from creditledger.tables import render_table
from kernel.errors import EXIT_CONFIG, ConfigError, CreditLedgerError
from kernel.settings import PROJECT_ROOT, Settings, load_settings, project_path

if TYPE_CHECKING:
    from stack.launcher import ServiceStatus
    from streams.topics import TopicsSpec

Handler = Callable[[argparse.Namespace, Settings], int]
REASONS = ["malformed", "unknown_schema", "idempotency_conflict", "invalid", "stale"]


def _print_services(report: Sequence[ServiceStatus]) -> None:
    rows = [(s.name, s.state, s.pid or "-", s.address, f"{s.seconds:.1f}", s.log) for s in report]
    print(render_table(["service", "state", "pid", "address", "seconds", "log"], rows))


def cmd_stack_up(args: argparse.Namespace, settings: Settings) -> int:
    from stack import launcher

    update: dict[str, object] = {}
    if args.brokers is not None:
        update["kafka_brokers"] = args.brokers
    if args.secure:
        update["kafka_secure"] = True
    settings = settings.model_copy(update={"stack": settings.stack.model_copy(update=update)})
    t0 = time.monotonic()
    report = launcher.up(settings)
    _print_services(report)
    print(f"stack ready in {time.monotonic() - t0:.1f} s")
    if settings.stack.kafka_secure:
        from stack import secure

        material = secure.SecureMaterial(secure.material_dir(settings))
        print(
            f"Kafka is SASL_SSL with ACLs; CA {material.ca_file}, one SCRAM user per role in "
            f"{material.credentials_file}. Connect as a role with "
            "`eval $(creditledger stack env ROLE)`; roles: " + ", ".join(secure.ROLES)
        )
    return 0


def cmd_stack_env(args: argparse.Namespace, settings: Settings) -> int:
    """The environment that connects a process to the secured stack as one role."""
    from stack import secure

    role = secure.role_settings(settings, args.role).kafka
    values = {"SECURITY_PROTOCOL": role.security_protocol, "SASL_MECHANISM": role.sasl_mechanism,
              "SASL_USERNAME": role.sasl_username,
              "SASL_PASSWORD": role.sasl_password.get_secret_value(),
              "SSL_CA_FILE": str(role.ssl_ca_file)}  # fmt: skip
    for key, value in values.items():
        print(f"export CREDITLEDGER_KAFKA__{key}={shlex.quote(value)}")
    return 0


def cmd_stack_down(args: argparse.Namespace, settings: Settings) -> int:
    from stack import launcher

    only = set(args.only.split(",")) if args.only else None
    _print_services(launcher.down(settings, wipe=args.wipe, only=only))
    if args.wipe and not only:
        for folder in launcher.wiped_dirs(settings):
            print(f"removed {folder}")
    return 0


def cmd_stack_status(args: argparse.Namespace, settings: Settings) -> int:
    from stack import launcher

    report = launcher.status(settings)
    _print_services(report)
    return 0 if all(s.state in ("running", "external") for s in report) else 3


def cmd_config_show(args: argparse.Namespace, settings: Settings) -> int:
    import yaml

    data = settings.model_dump(mode="json")
    for section in ("postgres", "redis"):
        data[section]["url"] = "**********"
    print(yaml.safe_dump(data, sort_keys=False).rstrip())
    return 0


def cmd_config_example(args: argparse.Namespace, settings: Settings) -> int:
    from creditledger.config_example import render_example

    text = render_example()
    if args.write:
        (PROJECT_ROOT / "config.example.yaml").write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _topic_spec(args: argparse.Namespace, settings: Settings) -> TopicsSpec:
    from streams.topics import load_topics

    # Only `topics` takes --profile; the ledger commands need partition counts, which no
    # profile changes.
    profile = getattr(args, "profile", None) or settings.kafka.topics_profile
    return load_topics(args.file or project_path(settings.topics_file), profile)


def cmd_topics_apply(args: argparse.Namespace, settings: Settings) -> int:
    from streams import topic_admin

    spec = _topic_spec(args, settings)
    admin = topic_admin.make_admin(settings)
    timeout = settings.kafka.request_timeout_ms / 1000
    report = topic_admin.apply(admin, spec, timeout)
    print(render_table(["topic", "result"], [(p.name, p.action) for p in report]))
    return 0


def cmd_topics_plan(args: argparse.Namespace, settings: Settings) -> int:
    from streams import topic_admin

    spec = _topic_spec(args, settings)
    admin = topic_admin.make_admin(settings)
    plans = topic_admin.plan(admin, spec, settings.kafka.request_timeout_ms / 1000)
    rows = [(p.name, p.action, "; ".join(p.differences) or "-") for p in plans]
    print(render_table(["topic", "plan", "differences"], rows))
    return 4 if any(p.action == "drift" for p in plans) else 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    from creditledger.demo import run_demo

    # SIGTERM (a `kill`, a CI timeout) ends the demo like Ctrl-C does: through its `finally`
    # blocks, which stop the worker, proxy and projectors it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return 0 if run_demo(settings) else 1


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from creditledger.worker import run_worker

    port = settings.metrics.worker_port if args.metrics_port is None else args.metrics_port
    if args.no_supervise:
        return run_worker(settings, name=args.name, loglevel=args.loglevel, store=args.store,
                          metrics_port=port)  # fmt: skip
    from creditledger.worker import supervise_worker

    child = ["worker", "--no-supervise", "--name", args.name, "--loglevel", args.loglevel,
             "--metrics-port", str(port)]  # fmt: skip
    return supervise_worker(child + (["--store", args.store] if args.store else []))


def cmd_ledger_balance(args: argparse.Namespace, settings: Settings) -> int:
    from agents import ops
    from contracts.records import LEDGER_TOPIC
    from streams.kafka_clients import partition_of

    partitions = _topic_spec(args, settings)[LEDGER_TOPIC].partitions
    account, entries = ops.balance(settings, project_codec(settings), args.user, partitions)
    print(
        render_table(
            ["user", "balance (credits)", "balance_micro", "seq", "entries", "partition"],
            [(args.user, credits(account.balance_micro), account.balance_micro, account.seq,
              entries, partition_of(args.user, partitions))],
        )
    )  # fmt: skip
    return 0


def cmd_ledger_fold_check(args: argparse.Namespace, settings: Settings) -> int:
    from agents import ops

    t0 = time.monotonic()
    report = ops.fold_check(settings, project_codec(settings), progress=not args.quiet,
                            keep_entries=args.strict)  # fmt: skip
    checker = report.checker
    print(
        render_table(
            ["entries", "users", "event_ids", "redelivered", "unreadable", "violations", "seconds"],
            [(checker.entries, len(checker.users), len(checker.events), checker.redelivered,
              report.unreadable, checker.violations, f"{time.monotonic() - t0:.1f}")],
        )
    )  # fmt: skip
    if report.first_unreadable:
        print(f"first unreadable entry: {report.first_unreadable}")
    if checker.first_violation is not None:
        print(f"first violation: {checker.first_violation}")
    print("fold-check: OK" if report.ok else "fold-check: FAILED")
    return 0 if report.ok else 1


def cmd_dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    from agents import ops

    letters = ops.dead_letters(settings, project_codec(settings), reason=args.reason)
    shown = letters[-args.limit :] if args.limit else letters
    rows = [
        (letter.offset, f"{r['topic']}[{r['partition']}]@{r['offset']}", r["reason"],
         r["event_id"] or "-", r["user_id"] or "-", r["detail"][:70])
        for letter in shown
        for r in [letter.record]
    ]  # fmt: skip
    print(render_table(["dlq offset", "from", "reason", "event_id", "user", "detail"], rows))
    print(f"{len(letters)} dead letters{f' with reason {args.reason}' if args.reason else ''}"
          f"{f', last {len(shown)} shown' if len(shown) < len(letters) else ''}")  # fmt: skip
    return 0


def cmd_dlq_redrive(args: argparse.Namespace, settings: Settings) -> int:
    from agents import ops

    if not (args.offset or args.reason or args.all):
        raise CreditLedgerError("say which: --offset N (repeatable), --reason R or --all")
    letters = ops.dead_letters(settings, project_codec(settings), reason=args.reason)
    if args.offset:
        wanted = set(args.offset)
        letters = [letter for letter in letters if letter.offset in wanted]
        missing = wanted - {letter.offset for letter in letters}
        if missing:
            raise CreditLedgerError(f"no dead letter at offset(s) {sorted(missing)}")
    from contracts.records import LEDGER_TOPIC
    from streams.topics import settings_topics

    stale = [letter for letter in letters if letter.record["reason"] == "stale"]
    checked: set[int] = set()
    if stale:
        # Never blindly: the ledger itself says whether a stale command was applied.
        partitions = settings_topics(settings)[LEDGER_TOPIC].partitions
        for check in ops.check_stale(settings, project_codec(settings), stale, partitions):
            print(f"stale dlq@{check.letter.offset} ({check.letter.record['event_id']}): "
                  f"{check.detail}")  # fmt: skip
            if check.send:
                checked.add(check.letter.offset)
        letters = [one for one in letters
                   if one.record["reason"] != "stale" or one.offset in checked]  # fmt: skip
    for letter in letters:
        r = letter.record
        print(f"{'would re-drive' if args.dry_run else 're-drive'} dlq@{letter.offset}: "
              f"{r['reason']} from {r['topic']}[{r['partition']}]@{r['offset']}")  # fmt: skip
    if not args.dry_run:
        sent = ops.redrive(settings, letters, frozenset(checked))
        print(f"re-drove {sent} message(s); the ledger worker decides them again")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="creditledger",
        description=(
            "Event-sourced credit ledger for LLM usage, on Kafka. Settings come from "
            "CREDITLEDGER_* variables or the YAML file named by CREDITLEDGER_CONFIG "
            "(see config.example.yaml)."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _stack_commands(commands)
    _config_commands(commands)
    _topics_commands(commands)
    _worker_command(commands)
    _ledger_commands(commands)
    _demo_command(commands)
    add_projection_commands(commands)
    add_proxy_commands(commands)
    add_store_commands(commands)
    add_plaza_commands(commands)
    return parser


def _stack_commands(commands: Any) -> None:
    """stack up|down|status: the local services."""
    stack = commands.add_parser(
        "stack",
        help="start/stop the local Kafka, Postgres and Redis (no Docker)",
        description=(
            "Run the real services on loopback from this machine's binaries and Kafka jars "
            "from Maven Central. Services named by KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL or "
            "REDIS_URL are used as they are and never started or stopped."
        ),
    )
    stack_commands = stack.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = stack_commands.add_parser(
        "up", help="start what is not running and wait until all answer (idempotent)"
    )
    p.add_argument("--brokers", type=int, choices=range(1, 10), default=None, metavar="N",
                   help="Kafka nodes to run (default: stack.kafka_brokers, 1); 3 is a "
                   "replicated cluster: then apply topics with --profile production")  # fmt: skip
    p.add_argument("--secure", action="store_true",
                   help="Kafka with a SASL_SSL listener, TLS between nodes, a SCRAM user per "
                   "role and ACLs (certificates made at the first start)")  # fmt: skip
    p.set_defaults(handler=cmd_stack_up)
    p = stack_commands.add_parser(
        "env", help="print the exports that connect to the secured Kafka as ROLE",
        description="Print `export CREDITLEDGER_KAFKA__...` lines (protocol, SCRAM user and "
        "password, CA file) for one role of `stack up --secure`; use with eval.")  # fmt: skip
    p.add_argument("role", choices=["proxy", "relay", "worker", "projector", "admin"])
    p.set_defaults(handler=cmd_stack_env)
    p = stack_commands.add_parser("down", help="stop the processes `stack up` started, only those")
    p.add_argument("--wipe", action="store_true",
                   help="also delete their data and logs, and the ledger workers' local "
                   "state (ledger.data_dir), which folds the deleted topics")  # fmt: skip
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="stop only these, comma-separated (kafka, postgres, redis); "
                   "no --wipe then")  # fmt: skip
    p.set_defaults(handler=cmd_stack_down)
    p = stack_commands.add_parser("status", help="show each service; exit 3 unless all answer")
    p.set_defaults(handler=cmd_stack_status)


def _config_commands(commands: Any) -> None:
    """config show|example: the settings."""
    config = commands.add_parser("config", help="inspect the settings")
    config_commands = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = config_commands.add_parser("show", help="print the effective settings (secrets masked)")
    p.set_defaults(handler=cmd_config_show)
    p = config_commands.add_parser(
        "example", help="print config.example.yaml as generated from the settings model"
    )
    p.add_argument("--write", action="store_true", help="rewrite config.example.yaml in place")
    p.set_defaults(handler=cmd_config_example)


def _topics_commands(commands: Any) -> None:
    """topics apply|plan: the broker against topics.yaml."""
    topics = commands.add_parser(
        "topics",
        help="make Kafka's topics match topics.yaml",
        description=(
            "Compare the broker with the topic spec. `apply` creates missing topics and "
            "refuses, changing nothing, when an existing one differs."
        ),
    )
    topics_commands = topics.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, handler, text in (
        ("apply", cmd_topics_apply, "create missing topics; refuse on drift (safe on every start)"),
        ("plan", cmd_topics_plan, "show what apply would do; exit 4 on drift"),
    ):
        p = topics_commands.add_parser(name, help=text, description=text)
        p.add_argument(
            "--file", type=Path, default=None, help="topic spec (default: settings.topics_file)"
        )
        p.add_argument("--profile", default=None,
                       help="replication profile of the spec: local (1 replica) or "
                       "production (3 replicas, min.insync.replicas 2); "
                       "default kafka.topics_profile")  # fmt: skip
        p.set_defaults(handler=handler)


def _worker_command(commands: Any) -> None:
    """worker: one ledger worker."""
    p = commands.add_parser(
        "worker",
        help="run a ledger worker: fold commands into credit.ledger.entries",
        description=(
            "Run one Faust worker of the ledger. It folds credit.charge.requested and "
            "credit.grant.requested into credit.ledger.entries, exactly once per event_id, "
            "and sends what it cannot apply to credit.commands.rejected. Start several with "
            "different --name to share the partitions. Stops on SIGINT/SIGTERM. The fold "
            "runs in a child process that this one restarts with backoff when it exits by "
            "itself (a Kafka restart, a failed batch: exiting uncommitted is the fold's "
            "recovery, see ARCHITECTURE.md); it gives up after 20 deaths in a row within "
            "10 s of their start."
        ),
    )
    p.add_argument("--name", default="w1", help="worker name: its state folder (default w1)")
    p.add_argument(
        "--loglevel", default="info", choices=["crit", "error", "warn", "info", "debug"],
        help="log level (default info)",
    )  # fmt: skip
    p.add_argument("--store", default=None, help="override ledger.store (rocksdb:// or memory://)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="/metrics and /healthz (default metrics.worker_port; 0: none)",
    )
    p.add_argument(
        "--no-supervise",
        action="store_true",
        help="run the fold in this process, and exit when it exits",
    )
    p.set_defaults(handler=cmd_worker)


def _ledger_commands(commands: Any) -> None:
    """ledger balance|fold-check|dlq: ops on the ledger."""
    ledger = commands.add_parser(
        "ledger",
        help="inspect the ledger: balance, fold-check, dead letters",
        description="Ops on credit.ledger.entries and credit.commands.rejected.",
    )
    ledger_commands = ledger.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = ledger_commands.add_parser(
        "balance", help="a user's balance, folded from the ledger",
        description="Fold the user's partition of credit.ledger.entries and print the balance.",
    )  # fmt: skip
    p.add_argument("user", help="user_id")
    p.add_argument("--file", type=Path, default=None, help="topic spec (default: settings)")
    p.set_defaults(handler=cmd_ledger_balance)
    p = ledger_commands.add_parser(
        "fold-check", help="check the ledger's invariants from offset 0; exit 1 on a violation",
        description=(
            "Fold credit.ledger.entries from the start and check: gap-free seq per user, "
            "balance_after = previous + amount, no event_id applied twice, identical "
            "redeliveries only. Prints the first violation and exits 1 if there is one."
        ),
    )  # fmt: skip
    p.add_argument(
        "--strict",
        action="store_true",
        help="keep every entry to compare redeliveries field by field (more memory)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_ledger_fold_check)
    dlq = ledger_commands.add_parser(
        "dlq", help="list and re-drive dead letters (credit.commands.rejected)",
        description="Dead letters keep the original bytes, where they came from and why.",
    )  # fmt: skip
    dlq_commands = dlq.add_subparsers(dest="dlq_action", required=True, metavar="ACTION")
    p = dlq_commands.add_parser("list", help="list dead letters, oldest first")
    p.add_argument("--reason", choices=REASONS, help="only this reason")
    p.add_argument("--limit", type=int, default=50, help="show the last N (0: all; default 50)")
    p.set_defaults(handler=cmd_dlq_list)
    p = dlq_commands.add_parser(
        "redrive", help="send dead letters back to their topic after a fix",
        description=(
            "Produce the original bytes again to the original topic. Safe to repeat: "
            "an applied command is a duplicate by event_id, a still-bad one returns here. "
            "A stale one (older than ledger.idempotency_window_days) is first looked up in "
            "the ledger: sent, past the window, only if the ledger never applied its "
            "event id."
        ),
    )  # fmt: skip
    p.add_argument("--offset", type=int, action="append", help="dlq offset (repeatable)")
    p.add_argument("--reason", choices=REASONS, help="every dead letter with this reason")
    p.add_argument("--all", action="store_true", help="every dead letter")
    p.add_argument("--dry-run", action="store_true", help="only say what would be sent")
    p.set_defaults(handler=cmd_dlq_redrive)


def _demo_command(commands: Any) -> None:
    """demo: the main job's first steps."""
    p = commands.add_parser(
        "demo",
        help="stack up, topics apply, and a round trip of every event type through Kafka",
        description=(
            "The main job: start the stack (or use the external services), apply "
            "topics.yaml, and send one event of each type through real Kafka and back."
        ),
    )
    p.set_defaults(handler=cmd_demo)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        settings = load_settings()
        return handler(args, settings)
    except ConfigError as exc:
        # A setting that cannot work: a supervisor must not restart into the same error.
        print(f"creditledger: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except CreditLedgerError as exc:
        print(f"creditledger: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("creditledger: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
