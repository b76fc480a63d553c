"""The BMAD API: typed models per kind and version, and the CRD generator."""
