"""Price rules: micro-credits per token, versioned, effective from a time (pure).

A rule (``id``) has versions; each version is effective from a time on, and
the active version at an instant is the newest one already in effect. A charge
records the rule id and version it was priced with, so a new version never
changes a past charge.

Token counts follow OpenAI's usage: ``input_tokens`` includes the cached ones
and ``output_tokens`` includes the reasoning ones. So a call pays
``(input - cached) x input + cached x cached_input + (output - reasoning) x
output + reasoning x reasoning``, rounded to whole micro-credits (``ceil`` by
default) and never less than ``minimum``.

Prices are exact: integers or decimal *strings* ("0.15"), held as fractions.
A YAML float (0.15 unquoted) is refused, because its binary value is not the
number written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from itertools import pairwise
from typing import Any, Literal

from kernel.errors import PriceRuleError, PricingError

Rounding = Literal["ceil", "floor", "half_up"]
ROUNDINGS: tuple[Rounding, ...] = ("ceil", "floor", "half_up")
DECIMAL = re.compile(r"^\d{1,12}(\.\d{1,12})?$")
RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
FIELDS = {"version", "effective_from", "input", "cached_input", "output", "reasoning",
          "minimum", "rounding"}  # fmt: skip


@dataclass(frozen=True)
class TokenUsage:
    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    def check(self) -> None:
        for name in ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PricingError(f"{name} must be a non-negative integer, got {value!r}")
        if self.cached_tokens > self.input_tokens:
            raise PricingError(f"cached_tokens ({self.cached_tokens}) exceed input_tokens "
                               f"({self.input_tokens})")  # fmt: skip
        if self.reasoning_tokens > self.output_tokens:
            raise PricingError(f"reasoning_tokens ({self.reasoning_tokens}) exceed "
                               f"output_tokens ({self.output_tokens})")  # fmt: skip


@dataclass(frozen=True)
class PriceRule:
    rule_id: str
    version: int
    effective_from_ms: int
    input_micro: Fraction
    cached_input_micro: Fraction
    output_micro: Fraction
    reasoning_micro: Fraction
    minimum_micro: int = 0
    rounding: Rounding = "ceil"

    def price(self, usage: TokenUsage) -> int:
        """The charge for ``usage``, integer micro-credits."""
        usage.check()
        exact = (
            (usage.input_tokens - usage.cached_tokens) * self.input_micro
            + usage.cached_tokens * self.cached_input_micro
            + (usage.output_tokens - usage.reasoning_tokens) * self.output_micro
            + usage.reasoning_tokens * self.reasoning_micro
        )
        return max(self.minimum_micro, round_micro(exact, self.rounding))


def round_micro(value: Fraction, rounding: Rounding) -> int:
    floor = value.numerator // value.denominator
    if rounding == "floor" or floor == value:
        return floor
    if rounding == "ceil":
        return floor + 1
    return floor + 1 if value - floor >= Fraction(1, 2) else floor


@dataclass(frozen=True)
class PriceBook:
    """Every version of every rule; answers which version prices a call at an instant."""

    rules: dict[str, tuple[PriceRule, ...]]  # id -> versions, oldest first

    def active(self, rule_id: str, at_ms: int) -> PriceRule:
        versions = self.rules.get(rule_id)
        if not versions:
            raise PricingError(
                f"no price rule {rule_id!r} (known: {', '.join(sorted(self.rules))})"
            )
        in_effect = [v for v in versions if v.effective_from_ms <= at_ms]
        if not in_effect:
            first = versions[0].effective_from_ms
            raise PricingError(f"price rule {rule_id!r} has no version in effect at {at_ms} ms "
                               f"(the first starts at {first} ms)")  # fmt: skip
        return in_effect[-1]

    def version(self, rule_id: str, version: int) -> PriceRule:
        for rule in self.rules.get(rule_id, ()):
            if rule.version == version:
                return rule
        raise PricingError(f"no version {version} of price rule {rule_id!r}")


def _price(where: str, name: str, value: Any) -> Fraction:
    if isinstance(value, (bool, float)):
        raise PriceRuleError(f"{where}: field {name!r}: {value!r} is a float; write the price "
                             f"as an integer or a quoted decimal such as \"0.15\"")  # fmt: skip
    if isinstance(value, int) and value >= 0:
        return Fraction(value)
    if isinstance(value, str) and DECIMAL.match(value.strip()):
        return Fraction(value.strip())
    raise PriceRuleError(f"{where}: field {name!r}: must be a non-negative integer or decimal "
                         f"string (micro-credits per token), got {value!r}")  # fmt: skip


def _time_ms(where: str, value: Any) -> int:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError as exc:
            raise PriceRuleError(f"{where}: field 'effective_from': {value!r} is not an ISO "
                                 "8601 time") from exc  # fmt: skip
    else:
        raise PriceRuleError(f"{where}: field 'effective_from': must be an ISO 8601 time with a "
                             f"time zone, got {value!r}")  # fmt: skip
    if moment.tzinfo is None:
        raise PriceRuleError(f"{where}: field 'effective_from': {value!r} needs a time zone "
                             "(e.g. 2026-01-01T00:00:00Z)")  # fmt: skip
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    delta = moment - epoch
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def parse_version(rule_id: str, raw: Any) -> PriceRule:
    where = f"price rule {rule_id!r}"
    if not isinstance(raw, dict):
        raise PriceRuleError(f"{where}: each version must be a mapping, got {raw!r}")
    version = raw.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PriceRuleError(f"{where}: field 'version': must be an integer >= 1, got {version!r}")
    where = f"price rule {rule_id!r} version {version}"
    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        raise PriceRuleError(f"{where}: unknown field(s) {unknown}; known: {sorted(FIELDS)}")
    for required in ("effective_from", "input", "output"):
        if required not in raw:
            raise PriceRuleError(f"{where}: field {required!r} is missing")
    input_micro = _price(where, "input", raw["input"])
    output_micro = _price(where, "output", raw["output"])
    minimum = raw.get("minimum", 0)
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 0:
        raise PriceRuleError(f"{where}: field 'minimum': must be a non-negative integer "
                             f"(micro-credits), got {minimum!r}")  # fmt: skip
    rounding = raw.get("rounding", "ceil")
    if rounding not in ROUNDINGS:
        raise PriceRuleError(f"{where}: field 'rounding': must be one of {', '.join(ROUNDINGS)}, "
                             f"got {rounding!r}")  # fmt: skip
    return PriceRule(
        rule_id=rule_id, version=version, effective_from_ms=_time_ms(where, raw["effective_from"]),
        input_micro=input_micro,
        cached_input_micro=_price(where, "cached_input", raw.get("cached_input", raw["input"])),
        output_micro=output_micro,
        reasoning_micro=_price(where, "reasoning", raw.get("reasoning", raw["output"])),
        minimum_micro=minimum, rounding=rounding,
    )  # fmt: skip


def parse_price_rules(raw: Any) -> PriceBook:
    """``[{id: ..., versions: [...]}, ...]`` (the ``price_rules`` list of the YAML)."""
    if not isinstance(raw, list):
        raise PriceRuleError(f"price_rules must be a list of rules, got {type(raw).__name__}")
    rules: dict[str, tuple[PriceRule, ...]] = {}
    for n, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise PriceRuleError(f"price rule #{n + 1}: needs an 'id' (a string) and 'versions'")
        rule_id = item["id"]
        if not RULE_ID.match(rule_id):
            raise PriceRuleError(f"price rule {rule_id!r}: field 'id': letters, digits and . _ : "
                                 "- only, at most 128 characters")  # fmt: skip
        if rule_id in rules:
            raise PriceRuleError(f"price rule {rule_id!r}: defined twice")
        extra = sorted(set(item) - {"id", "versions"})
        if extra:
            raise PriceRuleError(f"price rule {rule_id!r}: unknown field(s) {extra}")
        versions = item.get("versions")
        if not isinstance(versions, list) or not versions:
            raise PriceRuleError(f"price rule {rule_id!r}: field 'versions': a non-empty list")
        parsed = sorted((parse_version(rule_id, v) for v in versions), key=lambda r: r.version)
        for earlier, later in pairwise(parsed):
            if later.version == earlier.version:
                raise PriceRuleError(f"price rule {rule_id!r}: version {later.version} twice")
            if later.effective_from_ms <= earlier.effective_from_ms:
                raise PriceRuleError(
                    f"price rule {rule_id!r} version {later.version}: field 'effective_from' "
                    f"must be later than version {earlier.version}'s"
                )
        rules[rule_id] = tuple(parsed)
    return PriceBook(rules)
