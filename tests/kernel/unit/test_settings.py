"""The settings model, its environment overrides, and its mirror config.example.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from creditledger.config_example import render_example
from kernel.errors import ConfigError
from kernel.settings import PROJECT_ROOT, Settings, load_settings

EXAMPLE = PROJECT_ROOT / "config.example.yaml"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's or CI's own variables must not leak into these tests.
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "REDIS_URL", "CREDITLEDGER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    import os

    for name in list(os.environ):
        if name.startswith("CREDITLEDGER_"):
            monkeypatch.delenv(name)


def test_example_file_is_generated_from_the_model() -> None:
    assert EXAMPLE.read_text() == render_example(), (
        "config.example.yaml drifted from kernel/settings.py; "
        "run: .venv/bin/creditledger config example --write"
    )


def test_every_setting_has_a_comment_line_above_it() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            above = lines[number - 1].strip()
            assert above.startswith("# ") and len(above) > 5, f"no comment above {line!r}"


def test_example_loads_to_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDITLEDGER_CONFIG", str(EXAMPLE))
    from_file = load_settings()
    defaults = Settings()
    assert from_file.model_dump(mode="json") == defaults.model_dump(mode="json")
    assert from_file.postgres_dsn == defaults.postgres_dsn


def test_every_field_of_the_model_is_in_the_example() -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    dumped = Settings().model_dump(mode="json")
    assert set(data) == set(dumped)
    for section, values in dumped.items():
        if isinstance(values, dict):
            assert set(data[section]) == set(values), section


def test_nested_environment_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDITLEDGER_KAFKA__LINGER_MS", "0")
    settings = load_settings()
    assert settings.kafka.linger_ms == 0
    assert settings.kafka.client_id == "creditledger"


def test_yaml_file_then_environment_precedence(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("kafka:\n  linger_ms: 9\n  client_id: from-file\n")
    monkeypatch.setenv("CREDITLEDGER_CONFIG", str(config))
    monkeypatch.setenv("CREDITLEDGER_KAFKA__CLIENT_ID", "from-env")
    settings = load_settings()
    assert settings.kafka.linger_ms == 9
    assert settings.kafka.client_id == "from-env"


def test_conventional_variables_mark_services_external(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka.internal:9092")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@db.internal:5432/ledger")
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == "kafka.internal:9092"
    assert settings.kafka.external is True
    assert settings.postgres_dsn == "postgresql://u:p@db.internal:5432/ledger"
    assert settings.postgres.external is True
    assert settings.redis.external is False


def test_secrets_are_not_printed() -> None:
    settings = load_settings()
    assert "creditledger@" not in repr(settings)
    assert "creditledger@" not in str(settings.postgres)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kafka": {"linger_ms": -1}}, "kafka.linger_ms"),
        ({"postgres": {"url": "mysql://x"}}, "postgres.url"),
        ({"redis": {"url": "http://x"}}, "redis.url"),
        ({"kafka": {"no_such_setting": 1}}, "kafka.no_such_setting"),
    ],
)
def test_invalid_values_name_the_setting(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(**overrides)


def test_missing_config_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDITLEDGER_CONFIG", "/nonexistent/config.yaml")
    with pytest.raises(ConfigError, match=r"/nonexistent/config\.yaml"):
        load_settings()
