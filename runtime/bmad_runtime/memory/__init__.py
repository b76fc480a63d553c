"""Conversation memory and the records kept with it, one module per role.

The durable store (`store.PostgresRedisStore`) keeps hot recent turns in Redis and
everything durable in PostgreSQL. It is composed of one part per role, each usable
on its own: `conversations` (turns, history, list, delete), `usage` (the usage
ledger), `audit` (the append-only audit log) and `context_versions` (versioned
context layers); `turn_records` writes a turn's turns, usage record and audit entry
at once (one PostgreSQL statement, one Redis call). `scope` holds what they all
check: tenant and agent names, conversation ids and timestamps.
`inprocess.InProcessStore` is the store of the ``inProcess`` memory mode: everything
in this process, nothing durable.

Everything is scoped by tenant and agent: a conversation of another tenant (or of
another agent of the same tenant) does not exist as far as a caller can tell — reads
return nothing and deletes return False, the HTTP layer's 404.

SQL is parameterised only (``$1``, ``$2``…); no value is ever formatted into a
statement, which a unit test checks on the source of every module here.
"""
