"""Subcommands of the ``densenet`` CLI. Each module has ``register(subparsers)``."""

from densenet.commands import bench, convert, export, list_models, predict, summary

COMMANDS = (list_models, summary, predict, export, bench, convert)
