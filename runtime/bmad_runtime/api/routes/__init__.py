"""One router per resource: `invoke`, `conversations`, `health`."""
