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
