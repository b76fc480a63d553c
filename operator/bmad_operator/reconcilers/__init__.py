"""The reconcilers, one module per kind: the only code that talks to the API server
about that kind. Each declares the events it watches (`watches()`) next to its
`reconcile`; `common` holds what they share (metrics, status writes, events, apply).
"""
