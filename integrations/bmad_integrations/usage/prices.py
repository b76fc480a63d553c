"""Prices per provider and model, and the cost of one record: pure, exact decimals.

The table is the platform's, not a tenant's: it lives in the ConfigMap ``bmad-prices``
of the operator's namespace (key ``prices.yaml``), mounted into the operator, and is
applied by the ingester when a record enters the ledger. A tenant's runtime never
states a price. Each ledger row keeps the unit prices it was costed with, so a later
price change never rewrites history.

```yaml
currency: USD                  # the default currency of the entries
prices:
  - provider: openai
    model: gpt-4o              # exact model name
    inputPer1M: "2.50"         # per 1,000,000 input (prompt) tokens
    outputPer1M: "10.00"       # per 1,000,000 output (completion) tokens
  - provider: anthropic
    model: claude-sonnet-*     # a prefix: the longest matching prefix wins
    inputPer1M: "3"
    outputPer1M: "15"
    currency: EUR              # overrides the default
  - provider: echo
    model: "*"                 # every model of the provider
    inputPer1M: "0"
    outputPer1M: "0"
```

A model without a price is still metered (tokens are recorded and billed through the
token meters); its cost is unknown (None) and counted as unpriced.
"""

from __future__ import annotations

import decimal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic
import yaml

PER = decimal.Decimal(1_000_000)
# The ledger's cost column is NUMERIC(30, 12).
COST_QUANTUM = decimal.Decimal("1e-12")
WILDCARD = "*"
MAX_PRICE = decimal.Decimal(1_000_000)


class PriceTableError(ValueError):
    """The price table does not parse; the message names the entry and the field."""


# An ISO 4217 code as the price table writes it (and a cost meter names it).
CURRENCY = r"^[A-Z]{3}$"


class _Entry(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    provider: str = pydantic.Field(min_length=1, max_length=256)
    model: str = pydantic.Field(min_length=1, max_length=256)
    # Bounded so that no record's cost can overflow the ledger's NUMERIC(30, 12) (a
    # row that cannot be inserted would hold up the ingestion of every other).
    input_per_1m: decimal.Decimal = pydantic.Field(
        alias="inputPer1M", ge=0, lt=MAX_PRICE, max_digits=24, decimal_places=12
    )
    output_per_1m: decimal.Decimal = pydantic.Field(
        alias="outputPer1M", ge=0, lt=MAX_PRICE, max_digits=24, decimal_places=12
    )
    currency: str | None = pydantic.Field(default=None, pattern=CURRENCY)

    @pydantic.field_validator("model")
    @classmethod
    def _one_wildcard_at_the_end(cls, model: str) -> str:
        if WILDCARD in model[:-1]:
            raise ValueError("'*' may only end a model name (a prefix match)")
        return model


class _Table(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    currency: str = pydantic.Field(pattern=CURRENCY)
    prices: list[_Entry] = pydantic.Field(default_factory=list)


@dataclass(frozen=True)
class Price:
    """Unit prices of one provider/model, per 1,000,000 tokens, in `currency`."""

    input_per_1m: decimal.Decimal
    output_per_1m: decimal.Decimal
    currency: str


@dataclass(frozen=True)
class Cost:
    """What one record cost, and the prices it was costed with."""

    amount: decimal.Decimal
    price: Price


@dataclass(frozen=True)
class PriceTable:
    """Exact entries by (provider, model) and prefix entries by provider."""

    exact: Mapping[tuple[str, str], Price]
    prefixes: Mapping[str, tuple[tuple[str, Price], ...]]
    currency: str

    def price(self, provider: str, model: str) -> Price | None:
        """The price of a model: an exact entry, else the longest matching prefix."""
        found = self.exact.get((provider, model))
        if found is not None:
            return found
        for prefix, price in self.prefixes.get(provider, ()):
            if model.startswith(prefix):
                return price
        return None


EMPTY = PriceTable(exact={}, prefixes={}, currency="USD")


def _describe(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "the table"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse(data: Any) -> PriceTable:
    """A price table from its YAML/JSON structure; PriceTableError names what is wrong."""
    try:
        table = _Table.model_validate(data)
    except pydantic.ValidationError as exc:
        raise PriceTableError(f"the price table is invalid: {_describe(exc)}") from None
    exact: dict[tuple[str, str], Price] = {}
    prefixes: dict[str, list[tuple[str, Price]]] = {}
    seen: set[tuple[str, str]] = set()
    for index, entry in enumerate(table.prices):
        key = (entry.provider, entry.model)
        if key in seen:
            raise PriceTableError(
                f"the price table is invalid: prices.{index}: {entry.provider}/{entry.model} "
                "is priced twice"
            )
        seen.add(key)
        price = Price(
            input_per_1m=entry.input_per_1m,
            output_per_1m=entry.output_per_1m,
            currency=entry.currency or table.currency,
        )
        if entry.model.endswith(WILDCARD):
            prefixes.setdefault(entry.provider, []).append((entry.model[:-1], price))
        else:
            exact[key] = price
    ordered = {
        provider: tuple(sorted(items, key=lambda item: len(item[0]), reverse=True))
        for provider, items in prefixes.items()
    }
    return PriceTable(exact=exact, prefixes=ordered, currency=table.currency)


def parse_yaml(text: str) -> PriceTable:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PriceTableError(f"the price table is not YAML: {exc}") from None
    return parse(data if data is not None else {})


def cost(price: Price, *, tokens_in: int, tokens_out: int) -> decimal.Decimal:
    """tokens_in * input price + tokens_out * output price, per million, exactly."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        amount = (tokens_in * price.input_per_1m + tokens_out * price.output_per_1m) / PER
        return amount.quantize(COST_QUANTUM, rounding=decimal.ROUND_HALF_EVEN)


def apply(
    table: PriceTable, *, provider: str, model: str, tokens_in: int, tokens_out: int
) -> Cost | None:
    """The cost of one model call, or None when the table has no price for the model."""
    price = table.price(provider, model)
    if price is None:
        return None
    return Cost(amount=cost(price, tokens_in=tokens_in, tokens_out=tokens_out), price=price)


def totals_by_currency(costs: Iterable[Cost | None]) -> dict[str, decimal.Decimal]:
    """Costs summed per currency (unpriced ones left out)."""
    sums: dict[str, decimal.Decimal] = {}
    for item in costs:
        if item is not None:
            sums[item.price.currency] = sums.get(item.price.currency, decimal.Decimal(0)) + (
                item.amount
            )
    return sums
