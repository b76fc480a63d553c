"""The egress policy the test bed gives the operator, for tests that call checks directly.

Every test bed server and every emulator listens on loopback, which the operator's
default policy refuses: the test bed allows it explicitly (`operator_proc.EGRESS_ALLOW`),
and these tests use the very same rules.
"""

from __future__ import annotations

from bmad_integrations import egress
from bmad_testbed import operator_proc

TESTBED = egress.Policy.parse(allow=operator_proc.EGRESS_ALLOW.split(","))
