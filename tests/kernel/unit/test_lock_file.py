"""requirements.lock (what ./dev installs, hashes checked) agrees with pyproject.toml."""

from __future__ import annotations

import re
import tomllib

from kernel.settings import PROJECT_ROOT

PIN = re.compile(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;]+)")


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def _locked() -> dict[str, tuple[str, list[str]]]:
    locked: dict[str, tuple[str, list[str]]] = {}
    name = ""
    for line in (PROJECT_ROOT / "requirements.lock").read_text().splitlines():
        found = PIN.match(line)
        if found:
            name = _name(found[1])
            locked[name] = (found[2], [])
        elif "--hash=sha256:" in line and name:
            locked[name][1].append(line.split("--hash=sha256:")[1].strip(" \\"))
    return locked


def test_every_pin_of_pyproject_is_locked_at_its_version_with_hashes() -> None:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    pins = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    locked = _locked()
    for pin in pins:
        found = PIN.match(pin)
        assert found, f"pyproject.toml pins exactly: {pin!r}"
        name, version = _name(found[1]), found[2]
        assert name in locked, f"{name} is not in requirements.lock: run ./dev lock"
        assert locked[name][0] == version, f"{name}: pyproject {version}, lock {locked[name][0]}"
    for name, (_version, hashes) in locked.items():
        assert hashes, f"{name} has no hash in requirements.lock"
