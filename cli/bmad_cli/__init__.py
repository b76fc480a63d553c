"""The `bmad` command line."""
