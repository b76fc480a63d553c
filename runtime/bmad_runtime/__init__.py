"""The agent runtime that every agent pod runs."""
