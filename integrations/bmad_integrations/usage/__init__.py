"""The usage ledger: every model call's usage recorded once, in one place, billed once.

The runtime writes one record per model call to its own Redis stream on the platform
Redis (`writer`); the operator ingests every stream into the platform PostgreSQL
ledger (`ingester`, `store`), prices each record (`prices`), aggregates it per Agent
and Tenant and reports it to Stripe as meter events (`reporter`). `record` is the
contract between the two sides: one typed model and one codec that both import.
docs/billing.md explains the design and why.
"""
