"""Decisions as pure functions, one module per kind: observed state in; conditions
(reason, message), events and what to do next out. No I/O, no clock, no chance:
the reconcilers hand in what they observed (and the time, and any jitter).

Reasons are constants of each module, documented in docs/agents.md, docs/tenants.md
and docs/integrations.md; messages are sentences that say what is going on and, when
something is wrong, what to change.
"""
