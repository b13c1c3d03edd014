"""The deployment examples in deploy/ are valid: systemd units pass systemd-analyze, and
the production config names only settings that exist."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from kernel.settings import PROJECT_ROOT, Settings

DEPLOY = PROJECT_ROOT / "deploy"


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is needed (apt-get install systemd; ./dev test does)")
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert len(units) == 5
    for unit in units:
        # As installed under /opt/creditledger, here pointing at this checkout's .venv.
        text = unit.read_text().replace("/opt/creditledger", str(PROJECT_ROOT))
        (tmp_path / unit.name).write_text(text)
    names = [str(tmp_path / u.name).replace("@.service", "@w1.service") for u in units]
    for unit in units:
        if "@" in unit.name:
            shutil.copy(tmp_path / unit.name, str(tmp_path / unit.name).replace("@.", "@w1."))
    done = subprocess.run([analyze, "verify", *names], capture_output=True, text=True,
                          cwd=tmp_path)  # fmt: skip
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if "creditledger" in line]  # fmt: skip
    assert done.returncode == 0 and not problems, done.stdout + done.stderr


def _unknown(model: type[BaseModel], data: dict[str, Any], where: str) -> list[str]:
    found = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            found.append(f"{where}{key}")
            continue
        kind = field.annotation
        if isinstance(value, dict) and isinstance(kind, type) and issubclass(kind, BaseModel):
            found += _unknown(kind, value, f"{where}{key}.")
    return found


def test_the_production_config_names_only_real_settings() -> None:
    data = yaml.safe_load((DEPLOY / "config.production.yaml").read_text())
    assert _unknown(Settings, data, "") == []
    assert data["kafka"]["topics_profile"] == "production"
    assert data["kafka"]["security_protocol"] == "SASL_SSL"
