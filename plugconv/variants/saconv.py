"""Placeholder: being implemented (not registered yet)."""
