"""Spec commands: show, fmt, check, demo (filled in with the DSL)."""
