"""Modules that start a Ray cluster of their own (after the served cluster of tests/integration)."""
