"""Corral's operator face: the `corral` command, its configuration and the process launcher."""

from events.auth import VERSION as __version__

__all__ = ["__version__"]
