"""Corral's operator face: the `corral` command, its configuration and the process launcher."""

from typing import Any

__all__ = ["__version__"]


def __getattr__(name: str) -> Any:
    # looked up when asked for: importing the package (corral/entry.py, first thing of every
    # command) loads nothing else, so a `corral run` starts its DuckDB worker before its imports
    if name == "__version__":
        from events.auth import VERSION

        return VERSION
    raise AttributeError(f"module 'corral' has no attribute {name!r}")
