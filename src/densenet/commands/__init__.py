"""Subcommands of the ``densenet`` CLI. Each module has ``register(subparsers)``."""

from densenet.commands import eval, list_models, summary, train

COMMANDS = (list_models, summary, train, eval)
