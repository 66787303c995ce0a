"""Reliability harness fixtures: none beyond tests/conftest.py (the harness starts its own services)."""
