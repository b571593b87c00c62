"""The one place onnxruntime sessions are made (parity checks, benchmarks, calibration runs).

Every session bnfold makes runs on the CPU provider, logs only fatal errors (a model onnxruntime
cannot load or run becomes an ``InputError`` quoting onnxruntime's message; its own log line on
stderr would be a second line beside the CLI's one) and is created from a path or serialized bytes.
"""

from __future__ import annotations

from bnfold.common import first_line
from bnfold.errors import InputError

OPT_LEVELS = ("disabled", "basic", "extended", "all")


def ort_level(level: str):
    """onnxruntime's ``GraphOptimizationLevel`` for one of ``OPT_LEVELS``."""
    import onnxruntime as ort

    levels = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if level not in levels:
        raise InputError(f"unknown optimization level {level!r}; choose one of {', '.join(OPT_LEVELS)}")
    return levels[level]


def create_session(
    source,
    *,
    opt_level: str,
    threads: int | None = None,
    spinning: bool = True,
    config: dict | None = None,
    failure: str = "onnxruntime cannot load the model",
):
    """An onnxruntime CPU session of ``source`` (a path or serialized model bytes).

    ``threads``: intra-op threads (inter-op 1), onnxruntime's default when None. ``spinning=False``
    keeps onnxruntime's idle threads from spinning after each run (they would steal the cores
    bnfold's own OpenMP kernels run on between runs). ``config``: extra session config entries.
    A load failure is an ``InputError`` reading ``"{failure} ({onnxruntime's first line})"``.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort_level(opt_level)
    options.log_severity_level = 4
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - whatever the library raises, it is the input's fault
        raise InputError(f"{failure} ({first_line(e)})") from None


def run_session(session, feeds: dict, label: str, output_names, shape_hint: str = "") -> dict:
    try:
        values = session.run(list(output_names), feeds)
    except Exception as e:  # noqa: BLE001 - whatever the library raises, it is the input's fault
        raise InputError(f"{label}: onnxruntime failed to run the model{shape_hint} ({first_line(e)})") from None
    return dict(zip(output_names, values))
