"""Sub-commands of the credit store (step 5): serve the API and page, make tokens, seed."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from pydantic import ValidationError

from creditledger.cli_plaza import add_event_rewards_command
from creditledger.hosts import is_loopback
from kernel.errors import ConfigError
from kernel.settings import DEV_SECRET_PREFIX, Settings, StoreSettings


def cmd_store_serve(args: argparse.Namespace, settings: Settings) -> int:
    from projections.migrate import migrate
    from store.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    overrides = {name: value for name, value in (("port", args.port), ("workers", args.workers))
                 if value is not None}  # fmt: skip
    if overrides:
        # Validated like the settings file (model_copy alone would take --workers 0).
        try:
            store = StoreSettings.model_validate({**settings.store.model_dump(), **overrides})
        except ValidationError as exc:
            problems = "; ".join(f"--{e['loc'][0]}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"store serve: {problems}") from exc
        settings = settings.model_copy(update={"store": store})
    check_secrets(settings.store)
    migrate(settings)
    print(f"credit store on http://{settings.store.host}:{settings.store.port}/credit-store "
          "(API docs: /credit-store/docs; Ctrl-C stops it)", flush=True)  # fmt: skip
    serve(settings)
    return 0


def check_secrets(store: StoreSettings) -> None:
    """Development conveniences are loopback-only. The development secrets are public (they
    are in config.example.yaml): with them, anyone who can reach the store could sign an
    admin token or a payment callback. The simulated payment provider pays any order its
    owner asks it to. So both are refused on any address but loopback, and only warned
    about there (the demo and the tests run on loopback)."""
    if store.simulated_provider and not is_loopback(store.host):
        raise ConfigError(
            f"store.simulated_provider is on: anyone could pay their own orders for free; "
            f"turn it off (CREDITLEDGER_STORE__SIMULATED_PROVIDER=false) before serving on "
            f"{store.host}"
        )
    secrets = {"token_secret": store.token_secret, "payment_secret": store.payment_secret}
    defaults = [f"store.{name}" for name, secret in secrets.items()
                if secret.get_secret_value().startswith(DEV_SECRET_PREFIX)]  # fmt: skip
    if not defaults:
        return
    names = " and ".join(defaults)
    if not is_loopback(store.host):
        raise ConfigError(
            f"{names} still {'hold' if len(defaults) > 1 else 'holds'} the development "
            "default, which anyone can read in config.example.yaml; set your own before "
            f"serving on {store.host} (e.g. CREDITLEDGER_STORE__TOKEN_SECRET, "
            "CREDITLEDGER_STORE__PAYMENT_SECRET)"
        )
    logging.getLogger("store").warning(
        "%s: the development default; fine on loopback, refused on any other address", names
    )


def cmd_store_token(args: argparse.Namespace, settings: Settings) -> int:
    from contracts.tokens import sign_token

    # 0 means 0 seconds (a token that is expired at once), not "the default".
    ttl = settings.store.token_ttl_s if args.ttl_s is None else args.ttl_s
    if ttl < 0:
        raise ConfigError(f"--ttl-s must be 0 or more seconds, got {ttl}")
    secret = settings.store.token_secret.get_secret_value().encode()
    print(sign_token(secret, args.user, args.role, int(time.time()) + ttl))
    return 0


def cmd_store_seed(args: argparse.Namespace, settings: Settings) -> int:
    from projections.migrate import migrate
    from store.seed import seed

    migrate(settings)
    products, rules = seed(settings)
    print(f"added {products} product(s) and {rules} reward rule(s) (existing ones unchanged)")
    return 0


def add_store_commands(commands: Any) -> None:
    store = commands.add_parser(
        "store", help="the credit store: /credit-store API and page, tokens, catalogue",
        description="Users see their balance, consumption and history and buy credit packs; "
        "admins manage products, price rules and reward rules. Every grant goes through the "
        "outbox, so run an `outbox relay` and a ledger `worker` next to it.",
    )  # fmt: skip
    actions = store.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "serve", help="run the API and the page (store.port)",
        description="Serves /credit-store until SIGTERM or Ctrl-C. With --workers N > 1 a "
        "supervisor runs N server processes on the one port (SO_REUSEPORT) and restarts any "
        "that dies; it refuses a port something already listens on.",
    )  # fmt: skip
    p.add_argument("--port", type=int, default=None, help="override store.port")
    p.add_argument("--workers", type=int, default=None,
                   help="override store.workers (server processes; 1 on 2 cores)")  # fmt: skip
    p.set_defaults(handler=cmd_store_serve)
    p = actions.add_parser("token", help="print a signed bearer token for a user",
                           description="Open the page with "
                           "http://HOST:PORT/credit-store/#token=<token>.")  # fmt: skip
    p.add_argument("user", help="the user id the token speaks for")
    p.add_argument("--role", choices=["user", "admin", "service"], default="user",
                   help="user (default), admin, or service (claims event rewards)")  # fmt: skip
    p.add_argument("--ttl-s", type=int, default=None,
                   help="lifetime in seconds (default store.token_ttl_s)")  # fmt: skip
    p.set_defaults(handler=cmd_store_token)
    p = actions.add_parser("seed", help="add the starting packs and reward rules if missing")
    p.set_defaults(handler=cmd_store_seed)
    add_event_rewards_command(actions)
