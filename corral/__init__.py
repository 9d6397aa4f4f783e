"""Corral's operator face: the `corral` command, its configuration and the process launcher."""

__version__ = "0.1.0"
