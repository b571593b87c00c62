"""Input shapes: ``--shape NAME:D1xD2x...`` specs, ``shapes={...}`` arguments, the concrete shape
of every input of a model (dynamic dimensions from the given shapes, shared symbols or defaults)
and how a shape reads in messages.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np

from bnfold.errors import ArgumentTypeError, InputError

DEFAULT_DYNAMIC_DIM = 32
DEFAULT_BATCH_DIM = 1

_SHAPE_SPEC = re.compile(r"^(?P<name>.+):(?P<dims>\d+(?:[xX]\d+)*)$")


def parse_shape_specs(specs) -> dict:
    """Turn ``["input:1x3x224x224", "mask:1x128"]`` into ``{"input": (1, 3, 224, 224), ...}``.

    The name is everything before the last colon (input names may contain colons); a scalar
    input cannot be given a shape (it has no dynamic dimensions). Raises InputError on malformed
    specs or when one name is given twice with different shapes.
    """
    shapes: dict = {}
    for spec in specs or ():
        if not isinstance(spec, str):
            raise InputError(f"--shape: expected NAME:D1xD2x..., got {spec!r}")
        match = _SHAPE_SPEC.match(spec.strip())
        if not match:
            raise InputError(
                f"--shape {spec!r}: expected NAME:D1xD2x... with positive integer dimensions, e.g. input:1x3x224x224"
            )
        name = match.group("name")
        dims = tuple(int(d) for d in re.split("[xX]", match.group("dims")))
        reject_zero_dims(name, dims, f"--shape {spec.strip()!r}")
        if name in shapes and shapes[name] != dims:
            raise InputError(f"--shape: input {name!r} given twice with different shapes")
        shapes[name] = dims
    return shapes


def reject_zero_dims(name: str, dims, where: str) -> None:
    """A 0-sized dimension makes every output empty: a parity check on it compares nothing."""
    for i, d in enumerate(dims):
        if d == 0:
            raise InputError(
                f"{where}: input {name!r} has size 0 in dimension {i}; zero-size inputs compare nothing, "
                "every dimension must be >= 1"
            )


def validated_shapes(shapes, argument: str = "shapes") -> dict:
    """``shapes`` (``{input name: dims}`` or None) as ``{name: tuple of int}``; anything else is
    an error naming ``argument`` and the input: ArgumentTypeError (a TypeError) for a wrong type,
    InputError (a ValueError) for a dimension that is not >= 1."""
    if shapes is None:
        return {}
    if not isinstance(shapes, Mapping):
        raise ArgumentTypeError(f"{argument} must be a dict of input name -> dimensions, got {type(shapes).__name__}")
    clean = {}
    for name, dims in shapes.items():
        if not isinstance(name, str):
            raise ArgumentTypeError(f"{argument}: keys must be input names (str), got {name!r}")
        if isinstance(dims, (str, bytes)) or not isinstance(dims, Iterable):
            raise ArgumentTypeError(f"{argument}[{name!r}] must be a sequence of integer dimensions, got {dims!r}")
        dims = tuple(dims)
        for i, d in enumerate(dims):
            if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)):
                raise ArgumentTypeError(f"{argument}[{name!r}]: dimension {i} must be an integer, got {d!r}")
        reject_zero_dims(name, dims, argument)
        for i, d in enumerate(dims):
            if d < 0:
                raise InputError(f"{argument}[{name!r}]: dimension {i} is {d}; every dimension must be an integer >= 1")
        clean[name] = tuple(int(d) for d in dims)
    return clean


def format_shape(shape) -> str:
    if shape is None:
        return "?"
    if len(shape) == 0:
        return "scalar"
    return "x".join("?" if d is None else str(d) for d in shape)


def resolve_shapes(input_specs, shapes=None) -> dict:
    """Concrete shape for every input: static dims kept, dynamic dims from ``shapes`` or defaults."""
    shapes = validated_shapes(shapes)
    known = {s.name for s in input_specs}
    unknown = [n for n in shapes if n not in known]
    if unknown:
        raise InputError(
            f"--shape given for {', '.join(map(repr, unknown))}, which is not a model input "
            f"(inputs: {', '.join(sorted(known)) or 'none'})"
        )
    symbols: dict = {}
    resolved: dict = {}
    # Inputs the user shaped first, so their symbols propagate to the inputs they did not shape.
    ordered = sorted(input_specs, key=lambda s: s.name not in shapes)
    for spec in ordered:
        if spec.name in shapes:
            given = shapes[spec.name]
            if spec.shape is not None:
                if len(given) != len(spec.shape):
                    raise InputError(
                        f"--shape {spec.name}: {len(given)} dimensions given, the model's input has "
                        f"{len(spec.shape)} ({format_shape(spec.shape)})"
                    )
                for i, (g, d) in enumerate(zip(given, spec.shape)):
                    if isinstance(d, int) and d != g:
                        raise InputError(f"--shape {spec.name}: dimension {i} is fixed to {d} in the model, got {g}")
                    if isinstance(d, str):
                        symbols.setdefault(d, g)
            resolved[spec.name] = given
            continue
        if spec.shape is None:
            raise InputError(f"input {spec.name!r} has unknown rank; give its shape with --shape {spec.name}:D1xD2x...")
        dims = []
        for i, d in enumerate(spec.shape):
            if isinstance(d, int) and d >= 0:
                dims.append(d)
            elif isinstance(d, str) and d in symbols:
                dims.append(symbols[d])
            else:
                value = DEFAULT_BATCH_DIM if i == 0 else DEFAULT_DYNAMIC_DIM
                if isinstance(d, str):
                    symbols[d] = value
                dims.append(value)
        resolved[spec.name] = tuple(dims)
    return {s.name: resolved[s.name] for s in input_specs}
