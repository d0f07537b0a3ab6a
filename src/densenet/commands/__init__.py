"""Subcommands of the ``densenet`` CLI. Each module has ``register(subparsers)``."""

from densenet.commands import bench, export, list_models, summary

COMMANDS = (list_models, summary, export, bench)
