"""Price rules: exact integer pricing, versions by effective time, errors that name the field."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from kernel.errors import PriceRuleError, PricingError
from pricing.rules import PriceRule, TokenUsage, parse_price_rules, round_micro

RULES = yaml.safe_load("""
- id: small
  versions:
    - version: 1
      effective_from: 2026-01-01T00:00:00Z
      input: "0.15"
      cached_input: "0.075"
      output: "0.6"
      minimum: 1
    - version: 2
      effective_from: "2026-03-01T00:00:00+00:00"
      input: 1
      output: 4
      reasoning: 8
      rounding: floor
""")
JAN = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MAR = 1_772_323_200_000  # 2026-03-01T00:00:00Z


def test_the_active_version_is_the_newest_in_effect() -> None:
    book = parse_price_rules(RULES)
    assert book.active("small", JAN).version == 1
    assert book.active("small", MAR - 1).version == 1
    assert book.active("small", MAR).version == 2
    with pytest.raises(PricingError, match="no version in effect"):
        book.active("small", JAN - 1)
    with pytest.raises(PricingError, match="no price rule 'large'"):
        book.active("large", MAR)
    assert book.version("small", 1).input_micro == Fraction(3, 20)


def test_prices_are_exact_and_rounded_up_by_default() -> None:
    v1 = parse_price_rules(RULES).version("small", 1)
    # 1000 uncached x 0.15 + 200 cached x 0.075 + 300 output x 0.6 = 150 + 15 + 180
    assert v1.price(TokenUsage(input_tokens=1200, output_tokens=300, cached_tokens=200)) == 345
    # 1 input token = 0.15 -> ceil 1; the minimum is 1 as well
    assert v1.price(TokenUsage(1, 0)) == 1
    assert v1.price(TokenUsage(0, 0)) == 1  # the minimum charge
    # 7 x 0.15 = 1.05 -> 2 (ceil)
    assert v1.price(TokenUsage(7, 0)) == 2
    v2 = parse_price_rules(RULES).version("small", 2)
    # reasoning is part of output: 10 x 4 + 5 x 8; floor rounding, no minimum
    assert v2.price(TokenUsage(3, 15, reasoning_tokens=5)) == 3 + 40 + 40
    assert v2.price(TokenUsage(0, 0)) == 0


def test_rounding_modes() -> None:
    assert round_micro(Fraction(5, 2), "ceil") == 3
    assert round_micro(Fraction(5, 2), "floor") == 2
    assert round_micro(Fraction(5, 2), "half_up") == 3
    assert round_micro(Fraction(49, 20), "half_up") == 2
    assert round_micro(Fraction(4), "ceil") == 4


def test_impossible_usage_is_refused() -> None:
    rule = parse_price_rules(RULES).version("small", 1)
    with pytest.raises(PricingError, match="cached_tokens"):
        rule.price(TokenUsage(10, 0, cached_tokens=11))
    with pytest.raises(PricingError, match="reasoning_tokens"):
        rule.price(TokenUsage(0, 1, reasoning_tokens=2))
    with pytest.raises(PricingError, match="non-negative"):
        rule.price(TokenUsage(-1, 0))


def bad(change: dict[str, Any], drop: str | None = None) -> list[dict[str, Any]]:
    version: dict[str, Any] = {"version": 1, "effective_from": "2026-01-01T00:00:00Z",
                               "input": "1", "output": "2"}  # fmt: skip
    version.update(change)
    if drop:
        version.pop(drop)
    return [{"id": "r1", "versions": [version]}]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (bad({"input": 0.15}), r"price rule 'r1' version 1: field 'input': 0.15 is a float"),
        (bad({"output": "-1"}), r"version 1: field 'output': must be a non-negative"),
        (bad({"output": "1e3"}), r"field 'output'"),
        (bad({}, drop="output"), r"version 1: field 'output' is missing"),
        (bad({"effective_from": "2026-01-01T00:00:00"}), r"field 'effective_from'.*time zone"),
        (bad({"effective_from": "next monday"}), r"field 'effective_from'.*ISO 8601"),
        (bad({"rounding": "bankers"}), r"field 'rounding': must be one of ceil, floor, half_up"),
        (bad({"minimum": "1"}), r"field 'minimum'"),
        (bad({"version": 0}), r"price rule 'r1': field 'version'"),
        (bad({"colour": "red"}), r"unknown field\(s\) \['colour'\]"),
        ([{"id": "r 1", "versions": []}], r"field 'id'"),
        ([{"id": "r1", "versions": []}], r"field 'versions'"),
        ({"id": "r1"}, r"must be a list"),
        (bad({}) + bad({}), r"defined twice"),
        (
            [
                {
                    "id": "r1",
                    "versions": [
                        {
                            "version": 1,
                            "effective_from": "2026-02-01T00:00:00Z",
                            "input": 1,
                            "output": 1,
                        },
                        {
                            "version": 2,
                            "effective_from": "2026-01-01T00:00:00Z",
                            "input": 1,
                            "output": 1,
                        },
                    ],
                }
            ],
            r"version 2: field 'effective_from' must be later",
        ),
    ],
)
def test_parse_errors_name_the_rule_and_the_field(rules: Any, message: str) -> None:
    with pytest.raises(PriceRuleError, match=message):
        parse_price_rules(rules)


@given(
    st.integers(0, 10**7),
    st.integers(0, 10**7),
    st.integers(0, 10**7),
    st.integers(0, 10**7),
    st.fractions(min_value=0, max_value=1000, max_denominator=10**6),
)
def test_price_is_an_integer_within_one_micro_of_the_exact_cost(
    uncached: int, cached: int, plain_out: int, reasoning: int, unit: Fraction
) -> None:
    rule = PriceRule("p", 1, 0, unit, unit / 2, unit * 4, unit * 8)
    usage = TokenUsage(uncached + cached, plain_out + reasoning, cached, reasoning)
    exact = uncached * unit + cached * unit / 2 + plain_out * unit * 4 + reasoning * unit * 8
    charged = rule.price(usage)
    assert isinstance(charged, int)
    assert exact <= charged < exact + 1
