"""Daemon wiring: configuration, supervisor, CLI, logging, exporters."""

__version__ = "0.1.0"
