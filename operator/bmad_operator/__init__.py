"""The BMAD operator: kopf handlers, reconcilers, builders of owned objects."""
