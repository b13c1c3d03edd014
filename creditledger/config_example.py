"""Render ``config.example.yaml`` from the settings model.

The example is generated rather than hand-written so that it cannot silently
drift: a unit test regenerates it and compares with the committed file, and
``creditledger config example`` rewrites it after a settings change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from kernel.settings import Settings

HEADER = """\
# Every setting of creditledger, with its default. Generated from
# kernel/settings.py by `creditledger config example`; a test fails when
# the two drift. Use it with CREDITLEDGER_CONFIG=path/to/copy.yaml, or override
# one value with an environment variable: CREDITLEDGER_<SECTION>__<FIELD>
# (e.g. CREDITLEDGER_KAFKA__LINGER_MS=0). KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL
# and REDIS_URL point at services run elsewhere: the launcher then starts none.
"""


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value)
    return value


def _default(info: FieldInfo) -> Any:
    if info.default is not PydanticUndefined:
        return info.default
    assert info.default_factory is not None, "every setting has a default"
    return info.default_factory()  # type: ignore[call-arg]


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=1000).strip()
    return text.removesuffix("...").strip()


def _render_model(model: type[BaseModel], indent: str, lines: list[str]) -> None:
    for name, info in model.model_fields.items():
        lines.append(f"{indent}# {info.description}")
        default = _default(info)
        if isinstance(default, BaseModel):
            lines.append(f"{indent}{name}:")
            _render_model(type(default), indent + "  ", lines)
        else:
            lines.append(f"{indent}{name}: {_scalar(default)}")


def render_example() -> str:
    lines: list[str] = []
    _render_model(Settings, "", lines)
    return HEADER + "\n".join(lines) + "\n"
