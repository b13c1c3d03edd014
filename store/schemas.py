"""Request bodies of the credit-store API (pydantic), with the bounds that keep bad input a 4xx.

Every integer that reaches a Postgres ``bigint`` is bounded here, every text is
checked for a NUL byte (Postgres refuses those with an error that would
otherwise be a 500), and ids follow the patterns of migration 0004.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from contracts.fields import ID

MAX_MICRO = 10**15  # a billion credits: far above any pack, far below bigint
MAX_MINOR = 10**12


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("must carry a time zone, e.g. 2026-01-01T00:00:00Z")
    if not 1970 <= value.year <= 9000:
        raise ValueError("must be between the years 1970 and 9000")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
When = Annotated[datetime, AfterValidator(_aware)]
ProductId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
RuleId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
OrderId = Annotated[str, Field(pattern=r"^o_[0-9a-f]{24}$")]
UserId = Annotated[str, Field(pattern=f"^{ID.pattern.pattern}$")]  # the one id rule
Reference = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,199}$")]
# Exact decimal micro-credits per token, given as a string so no float ever holds a price.
PriceText = Annotated[str, Field(pattern=r"^\d{1,12}(\.\d{1,12})?$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OrderCreate(Strict):
    product_id: ProductId


class PaymentCallback(Strict):
    payment_reference: Reference
    amount_minor: int = Field(ge=1, le=MAX_MINOR)
    currency: str = Field(pattern=r"^[A-Z]{3}$")


class RewardClaim(Strict):
    user_id: UserId | None = Field(None, description="Only services and admins claim for others.")
    reference: Reference | None = Field(
        None, description="The triggering event's id (event rewards only)."
    )


class ProductPut(Strict):
    name: Annotated[Text, Field(min_length=1, max_length=200)]
    credits_micro: int = Field(ge=1, le=MAX_MICRO)
    original_price_minor: int = Field(ge=1, le=MAX_MINOR)
    price_minor: int = Field(ge=1, le=MAX_MINOR)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    active_from: When | None = None
    active_until: When | None = None
    sort_order: int = Field(0, ge=-(2**31), le=2**31 - 1)


class RewardRulePut(Strict):
    kind: Literal["signup", "checkin", "event"]
    description: Annotated[Text, Field(max_length=500)] = ""
    amount_micro: int = Field(ge=1, le=MAX_MICRO)
    cap_per_period: int = Field(ge=1, le=1_000_000)
    period: Literal["day", "week", "month", "lifetime"]
    trigger_event: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,99}$")] | None = None
    active_from: When | None = None
    active_until: When | None = None


class PriceVersionCreate(Strict):
    effective_from: When | None = Field(None, description="Default: now.")
    input_micro: PriceText
    output_micro: PriceText
    cached_input_micro: PriceText | None = None
    reasoning_micro: PriceText | None = None
    minimum_micro: int = Field(0, ge=0, le=MAX_MICRO)
    rounding: Literal["ceil", "floor", "half_up"] = "ceil"

    def as_fields(self, now: datetime) -> dict[str, object]:
        def dec(value: str | None) -> Decimal | None:
            return None if value is None else Decimal(value)

        return {"effective_from": self.effective_from or now,
                "input_micro": dec(self.input_micro), "output_micro": dec(self.output_micro),
                "cached_input_micro": dec(self.cached_input_micro),
                "reasoning_micro": dec(self.reasoning_micro),
                "minimum_micro": self.minimum_micro, "rounding": self.rounding}  # fmt: skip
