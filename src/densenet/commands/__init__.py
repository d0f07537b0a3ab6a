"""Subcommands of the ``densenet`` CLI. Each module has ``register(subparsers)``."""

from densenet.commands import convert, eval, list_models, predict, summary, train

COMMANDS = (list_models, summary, train, eval, predict, convert)
