"""The operator's usage-ledger settings: both stores or neither; agents never get the
operator's credentials."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from bmad_integrations.usage import prices
from bmad_operator import metering, settings

pytestmark = pytest.mark.unit


def test_metering_is_off_by_default() -> None:
    assert not settings.OperatorSettings().metering


def test_the_ledger_needs_both_redis_and_postgresql() -> None:
    with pytest.raises(pydantic.ValidationError, match="go together"):
        settings.OperatorSettings(usage_redis_url="redis://127.0.0.1:6379/0")
    with pytest.raises(pydantic.ValidationError, match="go together"):
        settings.OperatorSettings(ledger_dsn="postgresql://x@127.0.0.1/ledger")


@pytest.mark.parametrize(
    ("operator_url", "agent_url", "expected"),
    [
        ("redis://admin:pw@10.0.0.5:6380/2", "", "redis://10.0.0.5:6380/2"),
        ("redis://:pw@ledger:6379/0", "", "redis://ledger:6379/0"),
        ("rediss://:pw@ledger/0", "", "rediss://ledger/0"),
        ("redis://:pw@127.0.0.1:1/0", "redis://u:p@ledger.svc:6379/0", "redis://ledger.svc:6379/0"),
    ],
)
def test_agents_get_the_ledger_url_without_credentials(
    operator_url: str, agent_url: str, expected: str
) -> None:
    cfg = settings.OperatorSettings(
        usage_redis_url=operator_url,
        usage_agent_redis_url=agent_url,
        ledger_dsn="postgresql://x@127.0.0.1/ledger",
    )
    assert cfg.metering
    assert cfg.agent_ledger_url() == expected


def price_table(currency: str, price: str) -> str:
    return (
        f"currency: {currency}\nprices:\n"
        f'  - {{provider: echo, model: "*", inputPer1M: "{price}", outputPer1M: "{price}"}}\n'
    )


def test_the_price_file_is_read_again_when_it_changes_and_a_bad_one_keeps_the_last(
    tmp_path: Path,
) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(price_table("USD", "1"))
    table = metering.PriceFile(str(path))
    first = table()
    assert first is not prices.EMPTY
    path.write_text("prices: [{provider: echo}]\n")  # refused: the last table stays
    assert table() is first
    path.write_text(price_table("EUR", "12.5"))  # another size: seen even within one tick
    assert table() is not first
    assert metering.PriceFile("")() is prices.EMPTY
