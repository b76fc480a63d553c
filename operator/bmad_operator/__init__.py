"""The BMAD operator: kopf handlers, reconcilers, builders of owned objects."""

from bmad_operator import lazykube

# Before kopf or any module of ours imports kubernetes_asyncio: its client package
# would otherwise import ~950 generated modules (38 MiB) the operator never uses.
lazykube.install()
