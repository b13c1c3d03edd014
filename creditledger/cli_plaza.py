"""Sub-commands of the plan plaza (step 17) and of the store's event rewards."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from kernel.errors import ConfigError
from kernel.settings import DEV_SECRET_PREFIX, Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def cmd_plaza_serve(args: argparse.Namespace, settings: Settings) -> int:
    from creditledger.hosts import is_loopback
    from plaza.server import serve
    from projections.migrate import migrate

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if args.port is not None:
        if not 1 <= args.port <= 65535:
            raise ConfigError(f"--port must be 1-65535, got {args.port}")
        settings = settings.model_copy(
            update={"plaza": settings.plaza.model_copy(update={"port": args.port})}
        )
    plaza = settings.plaza
    # The tokens are the store's: with its public development secret anyone could sign one.
    if settings.store.token_secret.get_secret_value().startswith(DEV_SECRET_PREFIX) and \
            not is_loopback(plaza.host):  # fmt: skip
        raise ConfigError(f"store.token_secret still holds the development default, which "
                          f"anyone can read in config.example.yaml; set your own before "
                          f"serving the plaza on {plaza.host}")  # fmt: skip
    migrate(settings)
    print(f"plan plaza on http://{plaza.host}:{plaza.port}/plaza (API docs: /plaza/docs; "
          "Ctrl-C stops it)", flush=True)  # fmt: skip
    serve(settings)
    return 0


def cmd_store_event_rewards(args: argparse.Namespace, settings: Settings) -> int:
    from projections.migrate import migrate
    from store.event_rewards import run
    from streams.access import check_access

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    migrate(settings)
    store = settings.store
    check_access(settings, read=store.event_topics, groups=[store.event_rewards_group])
    print(f"event rewards: reading {', '.join(store.event_topics)} as "
          f"{store.event_rewards_group} (Ctrl-C stops it)", flush=True)  # fmt: skip
    tally = run(settings, idle_exit_s=args.idle_exit_s)
    print(f"event rewards: {tally.granted} granted, {tally.repeated} claimed before, "
          f"{tally.capped} over the cap or inactive, {tally.own} own, {tally.no_rule} "
          f"without a rule, {tally.undecodable} undecodable")  # fmt: skip
    return 0


def add_plaza_commands(commands: Any) -> None:
    plaza = commands.add_parser(
        "plaza", help="the plan plaza: /plaza API and page",
        description="Users publish plans, find them by tag and search, like, import and "
        "discuss them. Every change goes into the outbox, so run an `outbox relay` next to "
        "it; `store event-rewards` turns imports into credits for the plan's author.",
    )  # fmt: skip
    actions = plaza.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("serve", help="run the API and the page (plaza.port)",
                           description="Serves /plaza until SIGTERM or Ctrl-C, with the "
                           "credit store's bearer tokens (store.token_secret).")  # fmt: skip
    p.add_argument("--port", type=int, default=None, help="override plaza.port")
    p.set_defaults(handler=cmd_plaza_serve)


def add_event_rewards_command(store_actions: Any) -> None:
    p = store_actions.add_parser(
        "event-rewards", help="grant event rewards for the plaza's events",
        description="Consumes store.event_topics and claims every active event reward rule "
        "whose trigger_event is an event's type, for the plan's author (never for what the "
        "author did to their own plan), once per event and within the rule's cap. Safe to "
        "kill at any point: offsets are committed after the claims.",
    )  # fmt: skip
    p.add_argument("--idle-exit-s", type=float, default=None,
                   help="stop after this many seconds with nothing to read (default: run "
                   "until SIGTERM or Ctrl-C)")  # fmt: skip
    p.set_defaults(handler=cmd_store_event_rewards)
