"""Which tolerances an output is compared with: per-dtype defaults, loosened to the lowest float
precision a model computes in, or the caller's ``rtol`` / ``atol`` (``--rtol`` / ``--atol`` specs
parsed and validated against the outputs).
"""

from __future__ import annotations

import math

import onnx

from bnfold.errors import InputError

# dtype name -> (rtol, atol); atol is scaled by max(1, max|reference|) when it is a default.
DEFAULT_TOLERANCES = {
    "float64": (1e-9, 1e-10),
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 1e-3),
    "bfloat16": (5e-2, 5e-3),
}

# TensorProto float element types by precision, lowest first.
_FLOAT_PRECISIONS = (
    (onnx.TensorProto.BFLOAT16, "bfloat16"),
    (onnx.TensorProto.FLOAT16, "float16"),
    (onnx.TensorProto.FLOAT, "float32"),
    (onnx.TensorProto.DOUBLE, "float64"),
)


def tolerance_for(name: str, dtype: str, value, kind: str, working_precision=None):
    """(value, is_default) for one output from a float, a dict {name: float} or None; the default
    is the looser of the output dtype's and the models' working precision's."""
    if isinstance(value, dict):
        value = value.get(name)
    if value is None:
        if dtype not in DEFAULT_TOLERANCES:
            return 0.0, True
        k = 0 if kind == "rtol" else 1
        default = DEFAULT_TOLERANCES[dtype][k]
        if working_precision in DEFAULT_TOLERANCES:
            default = max(default, DEFAULT_TOLERANCES[working_precision][k])
        return default, True
    return float(value), False


def working_precision(model: onnx.ModelProto):
    """Name of the lowest float precision the model computes in (initializers, Constant values,
    Cast targets, declared value types), or None when it has no float tensors."""
    from bnfold.folding import iter_graphs

    seen = set()
    for graph in iter_graphs(model.graph):
        seen.update(t.data_type for t in graph.initializer)
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            seen.add(vi.type.tensor_type.elem_type)
        for node in graph.node:
            for attr in node.attribute:
                if attr.name == "to" and node.op_type in ("Cast", "CastLike", "RandomNormal", "RandomUniform"):
                    seen.add(attr.i)
                elif attr.type == onnx.AttributeProto.TENSOR:
                    seen.add(attr.t.data_type)
    for data_type, name in _FLOAT_PRECISIONS:
        if data_type in seen:
            return name
    return None


def lowest_precision(*models: onnx.ModelProto):
    """The lowest of the ``models``' working precisions (``working_precision``), or None when none
    has float tensors: a model and its fold are compared with the tolerances of the lower one."""
    order = [name for _, name in _FLOAT_PRECISIONS]
    precisions = [p for p in map(working_precision, models) if p]
    return min(precisions, key=order.index) if precisions else None


def validate_tolerance(value, kind: str, output_names) -> None:
    items = value.items() if isinstance(value, dict) else ([(None, value)] if value is not None else [])
    for name, v in items:
        if name is not None and name not in output_names:
            raise InputError(
                f"--{kind} given for {name!r}, which is not a model output (outputs: {', '.join(output_names)})"
            )
        if v is None and name is not None:
            continue
        try:
            ok = float(v) >= 0 and math.isfinite(float(v))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"--{kind}: expected a non-negative number, got {v!r}")


def parse_tolerance_specs(values, kind: str):
    """``--rtol``/``--atol`` values ("1e-3" or "NAME:1e-3", repeatable) -> float, dict or None.

    A bare value applies to every output; ``NAME:value`` overrides it for one output. The result
    is what ``check(rtol=..., atol=...)`` takes: a dict when any per-output value was given
    (the bare value, if any, is then applied to all other outputs).
    """
    if not values:
        return None
    default = None
    per_output: dict = {}
    for raw in values:
        name, sep, number = raw.rpartition(":")
        try:
            value = float(number)
        except ValueError:
            raise InputError(f"--{kind} {raw!r}: expected a number or NAME:number") from None
        if not math.isfinite(value) or value < 0:
            raise InputError(f"--{kind} {raw!r}: must be a non-negative finite number")
        if sep:
            if not name:
                raise InputError(f"--{kind} {raw!r}: empty output name before ':'")
            per_output[name] = value
        else:
            default = value
    if not per_output:
        return default
    return _DefaultingDict(default, per_output)


class _DefaultingDict(dict):
    """Per-output tolerances with a fallback for outputs not named (None -> per-dtype default)."""

    def __init__(self, default, values):
        super().__init__(values)
        self.default = default

    def get(self, key, fallback=None):
        if key in self:
            return self[key]
        return self.default if self.default is not None else fallback
