"""Exception types shared by the API and the CLI.

The CLI maps them to exit codes: InputError -> 2 (bad file, bad argument, bad data),
ParityError -> 1 (the folded/calibrated model does not compute what the original does, so it
was not written).
InputError is a ValueError, and ArgumentTypeError (a wrong argument type) also a TypeError, so
API users can catch what Python's own argument checks raise.
Kernels raise the built-in TypeError / ValueError directly, as numpy users expect.
``BnfoldWarning`` is what bnfold says about an input it accepted but had to read generously (the
CLI prints it as one ``warning:`` line).
"""


class BnfoldError(Exception):
    """Base class of bnfold's own errors."""


class InputError(BnfoldError, ValueError):
    """The user's input (file, model, data, option) is unusable; the message is one line."""


class ArgumentTypeError(InputError, TypeError):
    """An API argument has the wrong type (the message names the argument). A TypeError for API
    users, as Python's own argument checks raise, and an InputError, so that the CLI reports it
    as bad input (exit 2) should a command ever pass one on."""


class ParityError(BnfoldError):
    """A transformed model failed its onnxruntime parity check, and so was not written: what
    ``bnfold fold`` and ``bnfold calibrate --fold`` raise when the check blocks the write
    (without ``--force``); the CLI prints the message as one line and exits with 1. The API
    functions do not raise it: ``bnfold.check`` returns a report whose ``passed`` says the
    verdict, and ``bnfold.fold_file(verify=...)`` leaves the output unwritten when ``verify``
    refuses."""


class BnfoldWarning(UserWarning):
    """An input was accepted as onnxruntime accepts it, though it breaks a rule of the ONNX spec;
    the message says what bnfold did about it (one line)."""


def unbuilt_extension_error(error: ImportError):
    """An ImportError that says how to build bnfold when ``error`` is a compiled module of
    bnfold missing (a source checkout imported without ``pip install -e .``), else None."""
    name = getattr(error, "name", None) or ""
    if not (isinstance(error, ModuleNotFoundError) and name.startswith("bnfold._")):
        return None
    return ImportError(
        f"bnfold's compiled module {name} is not built: install bnfold with "
        "`python -m pip install -e .` (or build in place with `python setup.py build_ext --inplace`)"
    )
