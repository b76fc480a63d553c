"""Pure builders of the objects the operator owns, one module per kind: spec in,
manifests out. `meta` stamps every one of them with the same labels and owner references.
"""
