"""Prices per provider and model, and exact costs."""

from __future__ import annotations

import decimal
from decimal import Decimal

import pytest

from bmad_integrations.usage import prices

pytestmark = pytest.mark.unit

TABLE = """
currency: USD
prices:
  - {provider: openai, model: gpt-4o, inputPer1M: "2.50", outputPer1M: "10.00"}
  - {provider: openai, model: gpt-4o-mini, inputPer1M: 0.15, outputPer1M: 0.6}
  - {provider: anthropic, model: "claude-*", inputPer1M: "3", outputPer1M: "15"}
  - {provider: anthropic, model: "claude-opus-*", inputPer1M: "15", outputPer1M: "75",
     currency: EUR}
  - {provider: echo, model: "*", inputPer1M: "0", outputPer1M: "0"}
"""


@pytest.fixture
def table() -> prices.PriceTable:
    return prices.parse_yaml(TABLE)


def test_an_exact_entry_wins(table: prices.PriceTable) -> None:
    assert table.price("openai", "gpt-4o") == prices.Price(Decimal("2.50"), Decimal("10.00"), "USD")
    assert table.price("openai", "gpt-4o-mini") == prices.Price(
        Decimal("0.15"), Decimal("0.6"), "USD"
    )


def test_the_longest_prefix_wins_and_carries_its_currency(table: prices.PriceTable) -> None:
    opus = table.price("anthropic", "claude-opus-4")
    assert opus is not None
    assert (opus.input_per_1m, opus.currency) == (Decimal(15), "EUR")
    sonnet = table.price("anthropic", "claude-sonnet-4")
    assert sonnet is not None
    assert (sonnet.input_per_1m, sonnet.currency) == (Decimal(3), "USD")
    assert table.price("echo", "anything") is not None


def test_an_unknown_model_or_provider_has_no_price(table: prices.PriceTable) -> None:
    assert table.price("openai", "gpt-5") is None
    assert table.price("mistral", "large") is None
    assert table.price("anthropic", "gpt-4o") is None


def test_cost_is_exact_per_million_tokens(table: prices.PriceTable) -> None:
    cost = prices.apply(table, provider="openai", model="gpt-4o", tokens_in=1234, tokens_out=567)
    assert cost is not None
    # 1234 * 2.50 / 1e6 + 567 * 10 / 1e6 = 0.003085 + 0.00567
    assert cost.amount == Decimal("0.008755")
    assert cost.price.currency == "USD"
    one = prices.apply(table, provider="openai", model="gpt-4o-mini", tokens_in=1, tokens_out=0)
    assert one is not None
    assert one.amount == Decimal("0.00000015")


def test_a_billion_tokens_lose_nothing(table: prices.PriceTable) -> None:
    price = prices.Price(Decimal("0.123456789"), Decimal("9.87654321"), "USD")
    amount = prices.cost(price, tokens_in=999_999_999, tokens_out=999_999_999)
    expected = (
        Decimal(999_999_999) * Decimal("0.123456789") + Decimal(999_999_999) * Decimal("9.87654321")
    ) / Decimal(1_000_000)
    assert amount == expected.quantize(prices.COST_QUANTUM, rounding=decimal.ROUND_HALF_EVEN)


def test_unpriced_models_are_left_out_of_currency_totals(table: prices.PriceTable) -> None:
    costs = [
        prices.apply(table, provider="openai", model="gpt-4o", tokens_in=10**6, tokens_out=0),
        prices.apply(table, provider="mistral", model="x", tokens_in=5, tokens_out=5),
        prices.apply(
            table, provider="anthropic", model="claude-opus-4", tokens_in=0, tokens_out=10**6
        ),
        prices.apply(table, provider="openai", model="gpt-4o", tokens_in=0, tokens_out=10**6),
    ]
    assert prices.totals_by_currency(costs) == {"USD": Decimal("12.50"), "EUR": Decimal(75)}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("prices: []", "currency"),
        ("currency: usd\nprices: []", "currency"),
        (
            "currency: USD\nprices:\n  - {provider: a, model: b, inputPer1M: -1, outputPer1M: 1}",
            "prices.0.inputPer1M",
        ),
        (
            "currency: USD\nprices:\n  - {provider: a, model: b, outputPer1M: 1}",
            "prices.0.inputPer1M",
        ),
        (
            "currency: USD\nprices:\n"
            "  - {provider: a, model: 'x*y', inputPer1M: 1, outputPer1M: 1}",
            "prices.0.model",
        ),
        (
            "currency: USD\nprices:\n"
            "  - {provider: a, model: b, inputPer1M: 1, outputPer1M: 1}\n"
            "  - {provider: a, model: b, inputPer1M: 2, outputPer1M: 2}",
            "a/b is priced twice",
        ),
        (
            "currency: USD\nprices:\n  - {provider: a, model: b, inputPer1M: 1, outputPer1M: 1, "
            "typo: 1}",
            "prices.0.typo",
        ),
        ("currency: [USD", "not YAML"),
        (
            "currency: USD\nprices:\n  - {provider: a, model: b, inputPer1M: 1000000, "
            "outputPer1M: 1}",
            "prices.0.inputPer1M",
        ),
        (
            "currency: USD\nprices:\n  - {provider: a, model: b, inputPer1M: '0.0000000000001', "
            "outputPer1M: 1}",
            "prices.0.inputPer1M",
        ),
    ],
)
def test_a_bad_table_says_which_entry_and_field(text: str, words: str) -> None:
    with pytest.raises(prices.PriceTableError) as caught:
        prices.parse_yaml(text)
    assert words in str(caught.value)


def test_an_empty_document_needs_a_currency() -> None:
    with pytest.raises(prices.PriceTableError):
        prices.parse_yaml("")
    assert prices.parse_yaml("currency: EUR").price("a", "b") is None
