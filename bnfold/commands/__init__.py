"""One module per ``bnfold`` subcommand; each exposes ``register(subparsers)`` (see bnfold.cli)."""
