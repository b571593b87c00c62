"""Option groups that subcommands subscribe to: each group adds its arguments (one definition, one
help text) and, in ``parse``, validates them under their command-line names and turns them into the
values the API takes (as Polygraphy's argument groups do).

A subcommand lists its groups in ``register`` (``add_option_groups(parser, ShapeOption(), ...)``,
in help order) and calls ``parse_options(args)`` in ``run`` at the point where bad options must be
refused (before any model is read). Options only one command has stay in that command's module.
"""

from __future__ import annotations

import argparse
import textwrap

# What the exit codes mean, in the same words in `bnfold --help`, every subcommand's help, the
# README and docs/safety.md.
EXIT_STATUS_COMMON = "3 internal error (a bug: please report it), 130 / 143 interrupted by Ctrl-C / SIGTERM"


def exit_status(ok: str, bad_input: str, failed: str | None = None) -> str:
    """The ``exit status:`` paragraph of a subcommand's help: what 0, 1 (if the command has a
    verdict that can fail) and 2 mean for it, then the codes every command shares."""
    codes = [f"0 {ok}"] + ([f"1 {failed}"] if failed else []) + [f"2 bad input ({bad_input})", EXIT_STATUS_COMMON]
    return textwrap.fill("exit status: " + ", ".join(codes) + ".", width=100, break_on_hyphens=False)


class OptionGroup:
    """Arguments shared by several subcommands: ``add_to`` puts them on a parser, ``parse``
    validates what was given (raising a one-line InputError) and stores parsed values on ``args``."""

    def add_to(self, parser) -> None:
        raise NotImplementedError

    def parse(self, args) -> None:
        """Nothing to validate unless a group says otherwise."""


def add_command(subparsers, name: str, *, help: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """A subcommand's parser: its one-line ``help`` in ``bnfold --help``, its ``description`` and
    an ``epilog`` (examples and exit status) printed as written."""
    return subparsers.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_option_groups(parser, *groups: OptionGroup) -> None:
    """Add each group's arguments to ``parser`` (in this order, which is the order of ``--help``)
    and remember the groups, so that ``parse_options`` validates exactly what the command has
    (a command may call this more than once, to place its own options between groups)."""
    for group in groups:
        group.add_to(parser)
    parser.set_defaults(option_groups=(*(parser.get_default("option_groups") or ()), *groups))


def parse_options(args) -> None:
    """Validate and parse the options of every group the command subscribed to, in order."""
    for group in getattr(args, "option_groups", ()):
        group.parse(args)


class _StoreWithOptionName(argparse.Action):
    """Store the value and, in ``<dest>_option``, the option string the user typed (an alias
    such as ``--report`` for ``--json``), so that messages name what is on the command line."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_option", option_string)


class VerboseOption(OptionGroup):
    """``-v/--verbose``: full tracebacks on errors. Accepted before the command (``bnfold -v
    fold ...``) and after it; the subcommand's copy never resets what the main parser set."""

    def __init__(self, main_parser: bool = False):
        self.main_parser = main_parser

    def add_to(self, parser) -> None:
        parser.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=False if self.main_parser else argparse.SUPPRESS,
            help="show full tracebacks on errors",
        )


class OutputOption(OptionGroup):
    """``-o/--output``: where the command writes its main result. ``aliases`` are older spellings
    that keep working, hidden from ``--help``."""

    def __init__(self, metavar: str, help: str, required: bool = True, aliases=()):
        self.metavar, self.help, self.required, self.aliases = metavar, help, required, aliases

    def add_to(self, parser) -> None:
        parser.add_argument("-o", "--output", metavar=self.metavar, required=self.required, help=self.help)
        for alias in self.aliases:
            parser.add_argument(alias, dest="output", metavar=self.metavar, help=argparse.SUPPRESS)


class JsonReportOption(OptionGroup):
    """``--json PATH``: the command's report as JSON. ``args.json_option`` is the option as typed
    (``--report`` is the old name of fold and calibrate, still accepted and hidden from ``--help``)."""

    def __init__(self, help: str, aliases=()):
        self.help, self.aliases = help, aliases

    def add_to(self, parser) -> None:
        parser.add_argument("--json", metavar="PATH", action=_StoreWithOptionName, help=self.help)
        for alias in self.aliases:
            parser.add_argument(alias, dest="json", metavar="PATH", action=_StoreWithOptionName, help=argparse.SUPPRESS)
        parser.set_defaults(json_option="--json")


class ForceOption(OptionGroup):
    """``--force``: write the result even when its parity check fails (the exit status stays 1)."""

    def __init__(self, condition: str = ""):
        self.condition = condition  # e.g. "with --fold: "

    def add_to(self, parser) -> None:
        parser.add_argument(
            "--force",
            action="store_true",
            help=f"{self.condition}write OUT even when the parity check fails (exit status still 1)",
        )


class ShapeOption(OptionGroup):
    """``--shape NAME:D1xD2x...`` (repeatable): shapes of inputs with dynamic dimensions;
    ``args.shapes`` is the parsed ``{name: (d1, d2, ...)}`` (empty when none is given)."""

    def __init__(self, purpose: str = ""):
        self.purpose = purpose  # what the shapes are for, when the command has several uses of inputs

    def add_to(self, parser) -> None:
        parser.add_argument(
            "--shape",
            action="append",
            default=[],
            metavar="NAME:D1xD2x...",
            help=f"shape of an input with dynamic dimensions{self.purpose}, e.g. input:1x3x224x224 (repeatable)",
        )

    def parse(self, args) -> None:
        from bnfold.verify import parse_shape_specs

        args.shapes = parse_shape_specs(args.shape) if args.shape else {}


class SeedOption(OptionGroup):
    """``--seed N``: seed of the random inputs."""

    def add_to(self, parser) -> None:
        parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")

    def parse(self, args) -> None:
        # Under the CLI's name, before any model is read; the API would refuse it in its own words.
        from bnfold.errors import InputError

        if args.seed < 0:
            raise InputError(f"--seed must be >= 0 (numpy's random generator takes no negative seeds), got {args.seed}")


class SamplesOption(OptionGroup):
    """``--samples K``: number of random input sets."""

    def add_to(self, parser) -> None:
        parser.add_argument(
            "--samples", type=int, default=1, metavar="K", help="number of random input sets (default 1)"
        )

    def parse(self, args) -> None:
        from bnfold.errors import InputError
        from bnfold.verify import MAX_SAMPLES

        if not 1 <= args.samples <= MAX_SAMPLES:
            raise InputError(
                f"--samples must be between 1 and {MAX_SAMPLES} (each sample is a full run of both "
                f"models), got {args.samples}"
            )


class InputsFileOption(OptionGroup):
    """``--inputs FILE.npz``: given inputs instead of random ones; excludes ``--shape`` (put
    ``ShapeOption`` before this group)."""

    def __init__(self, help: str):
        self.help = help

    def add_to(self, parser) -> None:
        parser.add_argument("--inputs", metavar="FILE.npz", help=self.help)

    def parse(self, args) -> None:
        from bnfold.errors import InputError

        if args.inputs and args.shapes:
            raise InputError("--shape cannot be combined with --inputs (the arrays' shapes are used)")


class ToleranceOptions(OptionGroup):
    """``--rtol`` / ``--atol`` ``[NAME:]VALUE`` (repeatable); ``args.tolerances`` is
    ``{"rtol": ..., "atol": ...}`` as ``bnfold.check`` takes them."""

    def add_to(self, parser) -> None:
        for name, kind in (("rtol", "relative"), ("atol", "absolute")):
            parser.add_argument(
                f"--{name}",
                action="append",
                metavar="[NAME:]VALUE",
                help=f"{kind} tolerance, for all outputs or (NAME:VALUE, repeatable) for one output",
            )

    def parse(self, args) -> None:
        from bnfold.verify import parse_tolerance_specs

        args.tolerances = {name: parse_tolerance_specs(getattr(args, name), name) for name in ("rtol", "atol")}


class ThreadsOption(OptionGroup):
    """``--threads N``: onnxruntime intra-op threads, between 1 and the cores bnfold may use."""

    def __init__(self, default=None, help: str = "onnxruntime intra-op threads (default: all cores)"):
        self.default, self.help = default, help

    def add_to(self, parser) -> None:
        parser.add_argument("--threads", type=int, default=self.default, help=self.help)

    def parse(self, args) -> None:
        from bnfold.errors import InputError
        from bnfold.verify import max_bench_threads

        if args.threads is not None and not 1 <= args.threads <= max_bench_threads():
            raise InputError(f"--threads must be between 1 and {max_bench_threads()}, got {args.threads}")


class NoProgressOption(OptionGroup):
    """``--no-progress``: no progress bar (it is drawn only on a terminal anyway)."""

    def add_to(self, parser) -> None:
        parser.add_argument("--no-progress", action="store_true", help="never draw the progress bar")
