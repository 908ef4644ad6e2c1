"""The command line (the top layer: nothing else in pyboundary imports it). Entry point: :func:`main`."""

from .main import COMMANDS, build_parser, main

__all__ = ["main", "build_parser", "COMMANDS"]
