"""The ``bnfold`` command line: one parser, subcommands registered from the ``bnfold.cli`` modules.

Every subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func(args) -> int`` as the handler. This module owns what all commands share: ``--version``,
``--verbose``, and turning errors into one line on stderr with the documented exit codes
(0 ok, 1 parity failure (``ParityError``), 2 bad input, 3 internal error, 130 Ctrl-C, 143
SIGTERM; temporary files are removed on both). Options that several commands share are defined
once, in ``bnfold.cli.options``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import warnings

from bnfold._version import __version__
from bnfold.cli.options import EXIT_STATUS_COMMON, VerboseOption
from bnfold.errors import (
    BnfoldWarning,
    InputError,
    ParityError,
    unbuilt_extension_error,
)

# Order is the order shown in --help.
COMMAND_MODULES = ("fold", "inspect", "check", "bench", "calibrate", "demo")

EPILOG = (
    """examples:
  bnfold demo                                  fold, check and benchmark a built-in CNN
  bnfold fold model.onnx -o folded.onnx        fold every foldable BatchNormalization
  bnfold inspect model.onnx                    list BN nodes and whether each can be folded
  bnfold check model.onnx folded.onnx          onnxruntime parity of two models
  bnfold bench model.onnx                      latency before/after folding
  bnfold calibrate model.onnx -o out.onnx --data calib.npz --fold

Options shared by the commands: -o (output model; demo: its directory), --json PATH (report),
--shape, --seed, --force, --threads, -v.
exit status: 0 ok, 1 a parity check failed (fold, calibrate --fold, demo) or check found a mismatch,
2 bad input or usage (one line on stderr; -v shows the traceback),
"""
    + EXIT_STATUS_COMMON
    + "."
)


class _OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors are one line, like every other bnfold error (argparse prints the usage
    block first); ``--help`` shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _get_option_tuples(self, option_string):
        # An abbreviation that matches several spellings of one option (``demo --ou``: ``--out``,
        # its old name, and ``--output``; they share a dest) means that option, not an ambiguity;
        # the spelling shown in --help wins.
        by_dest = {}
        for candidate in super()._get_option_tuples(option_string):
            action = candidate[0]
            kept = by_dest.get(action.dest)
            if kept is None or (kept[0].help == argparse.SUPPRESS and action.help != argparse.SUPPRESS):
                by_dest[action.dest] = candidate
        return list(by_dest.values())


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog="bnfold",
        description="Batch-normalization toolkit for CPU inference: fold BN into ONNX weights, "
        "prove parity with onnxruntime, re-estimate BN statistics from data.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bnfold {__version__}")
    VerboseOption(main_parser=True).add_to(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"bnfold.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"bnfold.cli.{name}":
                continue  # command not shipped in this build
            raise
        module.register(subparsers)
    return parser


class Terminated(BaseException):
    """SIGTERM arrived (``timeout``, ``kill``, a cancelled CI job): unwinds like Ctrl-C, so that
    temporary files are removed on the way out."""


# The signal that interrupted this run, once one has: an exception raised in a signal handler
# while an extension module initializes comes out as that module's ImportError, which must
# still end as an interruption, not as an internal error.
_interrupted_by = []


def _on_sigterm(signum, frame):
    _interrupted_by.append(signal.SIGTERM)
    raise Terminated()


def _on_sigint(signum, frame):
    _interrupted_by.append(signal.SIGINT)
    raise KeyboardInterrupt()


def main(argv=None) -> int:
    try:
        return _main(argv)
    except Terminated:  # a signal that came while an error was being reported
        return _interrupted(signal.SIGTERM)
    except KeyboardInterrupt:
        return _interrupted(signal.SIGINT)


def _resignal_if_swallowed(unraisable) -> None:
    """``sys.unraisablehook`` while a command runs: a signal whose exception was raised inside a
    finalizer (``__del__``, a weakref callback) is swallowed by Python with an "Exception
    ignored" traceback; instead, the signal is sent again, so that it unwinds the command."""
    if isinstance(unraisable.exc_value, (Terminated, KeyboardInterrupt)):
        signum = signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
        # From a thread and a moment later: a signal sent here would be handled inside this
        # hook, still within the finalizer.
        threading.Timer(0.01, _resend_while_running, (signum,)).start()
        return
    _default_unraisablehook(unraisable)


_default_unraisablehook = sys.unraisablehook
# Set while a command runs: a signal resent after the command has ended (it was already
# interrupted, or finished) would kill the exiting process with the default handler instead.
_command_running = threading.Event()


def _resend_while_running(signum) -> None:
    if _command_running.is_set():
        os.kill(os.getpid(), signum)


def _main(argv) -> int:
    previous = {}
    del _interrupted_by[:]
    args = None
    try:
        if threading.current_thread() is threading.main_thread():
            # First of all, so that no moment of start-up (imports, argument parsing) ends in a
            # traceback.
            previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_sigterm)
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_sigint)
            sys.unraisablehook = _resignal_if_swallowed
            _command_running.set()
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        with warnings.catch_warnings():
            _show_bnfold_warnings_as_lines(args)
            return int(args.func(args) or 0)
    except Terminated:
        return _interrupted(signal.SIGTERM)
    except KeyboardInterrupt:
        return _interrupted(signal.SIGINT)
    except InputError as e:
        return _fail(args, e, 2)
    except ParityError as e:  # a verdict, not a failure to run: the line says what was not done
        prefix = f"bnfold {args.command}: " if getattr(args, "command", None) else "bnfold: "
        print(prefix + str(e).strip().splitlines()[0], file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        return _fail(args, e, 2)
    except ModuleNotFoundError as e:
        unbuilt = unbuilt_extension_error(e)
        if _interrupted_by:
            return _interrupted(_interrupted_by[0])
        if unbuilt is None:
            return _fail(args, e, 3, internal=True)
        return _fail(args, unbuilt, 3)
    except MemoryError as e:  # sizes that passed every bound and still do not fit
        return _fail(args, InputError(f"not enough memory ({e or 'MemoryError'}); try smaller inputs"), 2)
    except Exception as e:  # noqa: BLE001 - an internal error: still one line unless --verbose
        if _interrupted_by:
            return _interrupted(_interrupted_by[0])
        return _fail(args, e, 3, internal=True)
    finally:
        _command_running.clear()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if previous:
            sys.unraisablehook = _default_unraisablehook


def _interrupted(signum) -> int:
    print("bnfold: interrupted" if signum == signal.SIGINT else "bnfold: terminated", file=sys.stderr)
    return 128 + signum


def _show_bnfold_warnings_as_lines(args) -> None:
    """bnfold's own warnings become one ``bnfold CMD: warning: ...`` line each (once per message);
    other libraries' warnings keep Python's format."""
    shown = set()
    default_show = warnings.showwarning
    prefix = f"bnfold {args.command}: " if getattr(args, "command", None) else "bnfold: "

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, BnfoldWarning):
            return default_show(message, category, filename, lineno, file, line)
        text = str(message)
        if text not in shown:
            shown.add(text)
            print(f"{prefix}warning: {text}", file=sys.stderr)

    warnings.showwarning = show
    warnings.simplefilter("always", BnfoldWarning)


def _fail(args, error: BaseException, code: int, internal: bool = False) -> int:
    if getattr(args, "verbose", False):
        import traceback

        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    prefix = f"bnfold {args.command}: " if getattr(args, "command", None) else "bnfold: "
    if internal:
        text = f"internal error: {type(error).__name__}: {text} (run with --verbose for the traceback)"
    print(prefix + "error: " + text, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
