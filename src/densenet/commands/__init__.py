"""Subcommands of the ``densenet`` CLI. Each module has ``register(subparsers)``."""

from densenet.commands import convert, list_models, predict, summary

COMMANDS = (list_models, summary, predict, convert)
