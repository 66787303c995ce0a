"""The installed version of the tierkv distribution (the engine and kvstore ship in it)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """What `--version` and the server's `/version` report."""
    try:
        return version("tierkv")
    except PackageNotFoundError:
        return "unknown (not installed)"
