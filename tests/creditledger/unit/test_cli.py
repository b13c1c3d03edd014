"""The command line: every sub-command explains itself and bad input exits non-zero."""

from __future__ import annotations

import time

import pytest

from creditledger.cli import main
from kernel.errors import EXIT_CONFIG, Unauthenticated

COMMANDS = [
    [],
    ["stack"],
    ["stack", "up"],
    ["stack", "down"],
    ["stack", "status"],
    ["topics"],
    ["topics", "apply"],
    ["topics", "plan"],
    ["config"],
    ["config", "show"],
    ["config", "example"],
    ["demo"],
    ["worker"],
    ["ledger"],
    ["ledger", "balance"],
    ["ledger", "fold-check"],
    ["ledger", "dlq"],
    ["ledger", "dlq", "list"],
    ["ledger", "dlq", "redrive"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: creditledger")
    assert len(out.splitlines()) > 3


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["ledgr"])
    assert exited.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_bad_topic_spec_is_one_line_error(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    from pathlib import Path

    spec = Path(str(tmp_path)) / "topics.yaml"
    spec.write_text("topics:\n  a:\n    partitions: zero\n    replication_factor: 1\n")
    assert main(["topics", "plan", "--file", str(spec)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("creditledger: error: topic a: partitions must be an integer")


def test_config_show_masks_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "url: '**********'" in out
    assert "creditledger@" not in out


def test_redrive_needs_a_selection(capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before anything is read: re-driving everything by accident is not an option.
    assert main(["ledger", "dlq", "redrive"]) == 1
    assert "say which: --offset N" in capsys.readouterr().err


def test_credits_are_formatted_without_floats() -> None:
    from creditledger.cli_projections import credits

    assert credits(3_700) == "0.003700"
    assert credits(-12_000_001) == "-12.000001"
    assert credits(10**18 + 1) == "1000000000000.000001"


def test_every_worker_log_level_maps_to_logging() -> None:
    from creditledger.cli import build_parser
    from creditledger.worker import LOG_LEVELS

    parser = build_parser()
    for level in ("crit", "error", "warn", "info", "debug"):
        args = parser.parse_args(["worker", "--loglevel", level])
        assert args.loglevel in LOG_LEVELS


def test_store_refuses_development_secrets_off_loopback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Refused before anything starts or connects: no stack is needed to see it.
    monkeypatch.setenv("CREDITLEDGER_STORE__HOST", "0.0.0.0")
    assert main(["store", "serve"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "store.token_secret and store.payment_secret still hold the development default" in err
    assert "before serving on 0.0.0.0" in err


def test_store_secrets_check() -> None:
    from pydantic import SecretStr

    from creditledger.cli_store import check_secrets
    from creditledger.hosts import is_loopback
    from kernel.errors import ConfigError
    from kernel.settings import StoreSettings

    assert [is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost")] == [True] * 4
    assert [is_loopback(h) for h in ("0.0.0.0", "10.0.0.5", "::", "store.example")] == [False] * 4
    check_secrets(StoreSettings(host="127.0.0.1"))  # defaults on loopback: a warning only
    own = {"token_secret": SecretStr("t" * 32), "payment_secret": SecretStr("p" * 32)}
    check_secrets(StoreSettings(host="0.0.0.0", **own))
    only_payment = r"^store.payment_secret still holds the development default"
    with pytest.raises(ConfigError, match=only_payment):
        check_secrets(StoreSettings(host="0.0.0.0", token_secret=own["token_secret"]))


def test_the_simulated_payment_provider_is_off_by_default_and_loopback_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pydantic import SecretStr

    from creditledger.cli_store import check_secrets
    from kernel.errors import ConfigError
    from kernel.settings import StoreSettings

    own = {"token_secret": SecretStr("t" * 32), "payment_secret": SecretStr("p" * 32)}
    assert StoreSettings().simulated_provider is False
    check_secrets(StoreSettings(host="127.0.0.1", simulated_provider=True, **own))
    with pytest.raises(ConfigError, match=r"store\.simulated_provider is on"):
        check_secrets(StoreSettings(host="10.0.0.5", simulated_provider=True, **own))
    # Through the command, with real secrets: refused before anything starts.
    monkeypatch.setenv("CREDITLEDGER_STORE__HOST", "0.0.0.0")
    monkeypatch.setenv("CREDITLEDGER_STORE__TOKEN_SECRET", "t" * 32)
    monkeypatch.setenv("CREDITLEDGER_STORE__PAYMENT_SECRET", "p" * 32)
    monkeypatch.setenv("CREDITLEDGER_STORE__SIMULATED_PROVIDER", "true")
    assert main(["store", "serve"]) == EXIT_CONFIG
    assert "anyone could pay their own orders for free" in capsys.readouterr().err


def test_store_token_ttl_0_means_0_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    from contracts.tokens import verify_token
    from kernel.settings import load_settings

    secret = load_settings().store.token_secret.get_secret_value().encode()
    assert main(["store", "token", "u-1", "--ttl-s", "0"]) == 0
    token = capsys.readouterr().out.split()[-1]
    with pytest.raises(Unauthenticated) as caught:
        verify_token(secret, token, int(time.time()))
    assert caught.value.code == "token_expired"
    assert main(["store", "token", "u-1", "--ttl-s", "-5"]) == EXIT_CONFIG
