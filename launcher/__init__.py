"""Flotilla: one job spec, one train core, many ways to start it."""

__version__ = "0.1.0"
