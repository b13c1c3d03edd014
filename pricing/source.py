"""Where the proxy's price rules come from: the YAML file and the ``price_rules`` table.

Both are parsed into one :class:`PriceBook`. A rule may have versions in both
places; the same (rule, version) in both must be identical, or loading fails
naming it. The proxy re-reads the table every ``proxy.price_rules_refresh_s``,
so a version added there applies to new calls within seconds, without a
restart; a reload that fails keeps the book it had.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml

from kernel.errors import PriceRuleError
from pricing.rules import PriceBook, parse_price_rules

TABLE_QUERY = (
    "SELECT rule_id, version, effective_from, input_micro, cached_input_micro, output_micro, "
    "reasoning_micro, minimum_micro, rounding FROM price_rules ORDER BY rule_id, version"
)


def read_yaml(path: Path) -> list[dict[str, Any]]:
    """The ``price_rules`` list of the file ([] when the file does not exist)."""
    if not path.exists():
        return []
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PriceRuleError(f"{path}: cannot read price rules: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("price_rules", []), list):
        raise PriceRuleError(f"{path}: expected a mapping with a 'price_rules' list")
    rules: list[dict[str, Any]] = raw.get("price_rules", [])
    return rules


def _decimal_text(value: Any) -> str | None:
    # NUMERIC arrives as Decimal; its plain string is exact (no exponent for numeric(24,12)).
    return None if value is None else format(value, "f")


def table_rows_to_rules(rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    rules: dict[str, list[dict[str, Any]]] = {}
    for rule_id, version, effective_from, inp, cached, out, reasoning, minimum, rounding in rows:
        entry: dict[str, Any] = {
            "version": version, "effective_from": effective_from, "input": _decimal_text(inp),
            "output": _decimal_text(out), "minimum": minimum, "rounding": rounding,
        }  # fmt: skip
        if cached is not None:
            entry["cached_input"] = _decimal_text(cached)
        if reasoning is not None:
            entry["reasoning"] = _decimal_text(reasoning)
        rules.setdefault(rule_id, []).append(entry)
    return [{"id": rule_id, "versions": versions} for rule_id, versions in rules.items()]


def merge(file_rules: list[dict[str, Any]], table_rules: list[dict[str, Any]]) -> PriceBook:
    """One book from both sources; a (rule, version) defined differently twice is an error."""
    file_book = parse_price_rules(file_rules)
    table_book = parse_price_rules(table_rules)
    versions: dict[str, dict[int, Any]] = {}
    for rule_id, rules in file_book.rules.items():
        versions[rule_id] = {rule.version: rule for rule in rules}
    for rule_id, rules in table_book.rules.items():
        known = versions.setdefault(rule_id, {})
        for rule in rules:
            if rule.version in known and known[rule.version] != rule:
                raise PriceRuleError(f"price rule {rule_id!r} version {rule.version}: the YAML "
                                     "file and the price_rules table disagree")  # fmt: skip
            known[rule.version] = rule
    merged = []
    for rule_id, by_version in versions.items():
        ordered = [by_version[v] for v in sorted(by_version)]
        for earlier, later in pairwise(ordered):
            if later.effective_from_ms <= earlier.effective_from_ms:
                raise PriceRuleError(
                    f"price rule {rule_id!r} version {later.version}: field 'effective_from' "
                    f"must be later than version {earlier.version}'s"
                )
        merged.append((rule_id, tuple(ordered)))
    return PriceBook(dict(merged))
