"""The test bed: a real Kubernetes control plane and real services, built and cached locally."""
