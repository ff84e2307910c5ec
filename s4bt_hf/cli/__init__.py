"""The `s4bt` command (console script `s4bt_hf.cli:main`): train, evaluate, compress, compare
reductions, export, reproduce. `commands.py` holds the subcommands, `arg_types.py` the argument
converters. Not part of the remote code of checkpoints."""

from .commands import COMMANDS, CliError, build_parser, main

__all__ = ["COMMANDS", "CliError", "build_parser", "main"]
