"""`bmad_integrations.lazy`: a module imported when a name of it is first read."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from bmad_integrations import lazy

pytestmark = pytest.mark.unit


def test_names_read_through_the_stand_in_are_the_real_modules_names() -> None:
    stand_in = lazy.module("json")
    import json

    assert stand_in.dumps is json.dumps
    assert "imported" in repr(stand_in)


def test_the_operator_does_not_import_stripe_until_billing_needs_it() -> None:
    code = textwrap.dedent(
        """
        import sys
        import bmad_operator.main
        from bmad_integrations import billing
        print("stripe" in sys.modules)
        error = billing.stripe.StripeError  # the first read imports it
        print("stripe" in sys.modules, error.__module__.startswith("stripe"))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "True"]


def test_a_missing_module_fails_on_first_use_with_the_import_error() -> None:
    stand_in = lazy.module("no_such_module_here")
    with pytest.raises(ModuleNotFoundError):
        _ = stand_in.anything


def test_starting_the_operator_imports_no_redis_postgres_http_or_cel_client() -> None:
    """What `bmad operator run` imports before kopf starts: none of the clients that
    only a configured feature uses (usage metering's Redis, the usage store's
    PostgreSQL, Workflow conditions' CEL, the checks' and autoscaler's httpx), ~21 MiB
    resident between them."""
    code = textwrap.dedent(
        """
        import sys
        import bmad_cli.main
        from bmad_operator import main  # what `bmad operator run` imports
        lazy = ("redis", "asyncpg", "celpy", "lark", "httpx")
        print(*[name in sys.modules for name in lazy])
        from bmad_integrations import httpcheck, postgres, redis_store
        from bmad_operator import metering
        from bmad_operator.workflows import expr
        # The first read of a name imports the real module.
        print(metering.aioredis.Redis.__module__.startswith("redis."))
        print(postgres.asyncpg.PostgresError.__module__.startswith("asyncpg"))
        print(expr.compile_condition("inputs.x == 1") is not None)
        print(issubclass(redis_store._pinned_ssl_connection(), redis_store.aioredis.SSLConnection))
        print(httpcheck.egress_transport.AsyncTransport.__module__.endswith("egress_transport"))
        print(*[name in sys.modules for name in lazy])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0].split() == ["False"] * 5
    assert done.stdout.split()[5:] == ["True"] * 10
