"""One module per third-party system the agents use."""
