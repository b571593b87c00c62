"""The ``bnfold`` command line: ``app`` (parser, signals, exit codes) and one module per subcommand."""

from bnfold.cli.app import main

__all__ = ["main"]
