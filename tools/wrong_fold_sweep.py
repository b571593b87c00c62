"""Does the parity check catch a wrong fold? Outputs only against outputs + intermediate values.

For each model: fold it with ``bnfold.fold_file`` (as ``bnfold fold`` does), check the fold
against the original with ``bnfold.check`` outputs-only and with ``intermediates=True`` (both must
pass), then make wrong folds - one layer's weights x 1.01 at the first, a middle and the last
layer the fold changed (the first, middle and last Conv/ConvTranspose/Gemm/MatMul with constant
weights when nothing was folded, e.g. tf2onnx exports whose BNs are folded already) - and check
each both ways. A wrong fold must fail; the table shows which ones the outputs-only check misses.

    python tools/wrong_fold_sweep.py MODEL.onnx [MODEL.onnx ...] [--shape NAME:D1xD2x...]
    python tools/wrong_fold_sweep.py --manifest /tmp/drv/manifest.json [--match ppocrv5-det]
    python tools/wrong_fold_sweep.py ... --json out.json

With ``--manifest`` (a corpus manifest: ``models[].path`` relative to the manifest, and
``example_inputs`` for models with dynamic sizes) every listed model is swept, or those whose
name contains ``--match``. Times are wall-clock seconds of each ``check`` call on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import numpy_helper

import bnfold
from bnfold.errors import InputError
from bnfold.folding.fold_pass import fold_file
from bnfold.verify.shapes import parse_shape_specs

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _node_by_label(graph, label):
    for index, node in enumerate(graph.node):
        if node.name == label or (not node.name and f"{node.op_type}#{index}" == label):
            return node
    return None


def folded_layers(original: onnx.ModelProto, folded: onnx.ModelProto, report) -> list:
    """Names of the values produced by layers the fold changed, in the folded model's node
    order: for a backward fold the layer now produces the BN's output, for a forward fold the
    layer keeps its own output name."""
    produced = {}
    for index, node in enumerate(folded.graph.node):
        for name in node.output:
            produced[name] = index
    wanted = set()
    for entry in report.folded:
        if entry.graph:
            continue  # main graph only: subgraph bodies are not swept
        bn = _node_by_label(original.graph, entry.bn)
        target = _node_by_label(original.graph, entry.target)
        if bn is None or target is None:
            continue
        name = bn.output[0] if bn.output[0] in produced else target.output[0]
        if name in produced and folded.graph.node[produced[name]].op_type in LAYER_OPS:
            wanted.add(name)
    return sorted(wanted, key=produced.get)


def weighted_layers(model: onnx.ModelProto) -> list:
    """Output names of Conv/ConvTranspose/Gemm/MatMul nodes whose weight is an initializer."""
    initializers = {t.name for t in model.graph.initializer}
    return [
        n.output[0]
        for n in model.graph.node
        if n.op_type in LAYER_OPS and len(n.input) > 1 and n.input[1] in initializers
    ]


def sabotaged(model: onnx.ModelProto, layer_output: str, factor: float = 1.01) -> onnx.ModelProto:
    """A copy of ``model`` in which the layer producing ``layer_output`` has its weight x factor
    (a fresh initializer, so that a weight shared with another layer stays as it was)."""
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    node = next(n for n in wrong.graph.node if layer_output in n.output)
    weight = next(t for t in wrong.graph.initializer if t.name == node.input[1])
    array = numpy_helper.to_array(weight)
    new_name = f"{weight.name}_x{factor:g}"
    wrong.graph.initializer.append(numpy_helper.from_array((array * factor).astype(array.dtype), new_name))
    node.input[1] = new_name
    return wrong


def _verdict(report) -> dict:
    first = report.failed_intermediates[0] if report.failed_intermediates else None
    worst = report.worst_intermediate
    return {
        "passed": report.passed,
        "outputs_passed": not report.failed_outputs,
        "intermediates": len(report.intermediates),
        "intermediates_failed": len(report.failed_intermediates),
        "first_failing": None if first is None else f"{first.name} ({first.producer_text})",
        "worst_ratio": None if worst is None else worst.error_over_tolerance,
        "output_ratio": max((o.error_over_tolerance for o in report.outputs), default=0.0),
        "note": report.intermediates_note,
    }


def sweep(path: str, shapes: dict, tmp_dir: str) -> dict:
    name = os.path.basename(path)
    folded_path = os.path.join(tmp_dir, "folded.onnx")
    report = fold_file(path, folded_path)
    original, folded = onnx.load(path), onnx.load(folded_path)
    row = {"model": name, "bns_folded": report.n_folded, "bns_left": report.n_remaining}
    timings = {}
    for label, intermediates in (("outputs", False), ("intermediates", True)):
        start = time.perf_counter()
        check = bnfold.check(path, folded_path, shapes=shapes or None, intermediates=intermediates)
        timings[label] = time.perf_counter() - start
        row[f"fold_{label}"] = _verdict(check)
    row["seconds"] = timings
    layers = folded_layers(original, folded, report)
    row["sabotaged_kind"] = "folded layer"
    if not layers:
        layers, row["sabotaged_kind"] = weighted_layers(folded), "layer (nothing folded)"
    picks = sorted({0, len(layers) // 2, len(layers) - 1}) if layers else []
    row["wrong"] = []
    for k in picks:
        wrong = sabotaged(folded, layers[k])
        wrong_path = os.path.join(tmp_dir, "wrong.onnx")
        onnx.save(wrong, wrong_path)
        entry = {"layer": layers[k], "position": f"{k + 1}/{len(layers)}"}
        for label, intermediates in (("outputs", False), ("intermediates", True)):
            entry[label] = _verdict(bnfold.check(path, wrong_path, shapes=shapes or None, intermediates=intermediates))
        row["wrong"].append(entry)
    return row


def _print_row(row) -> None:
    f_o, f_i = row["fold_outputs"], row["fold_intermediates"]
    print(
        f"{row['model']}: {row['bns_folded']} BNs folded, {row['bns_left']} left; check M fold(M): outputs "
        f"{'pass' if f_o['passed'] else 'FAIL'}, intermediates {'pass' if f_i['passed'] else 'FAIL'} "
        f"({f_i['intermediates']} values, worst {f_i['worst_ratio'] or 0:.2g} x "
        f"tol{'; ' + f_i['note'] if f_i['note'] else ''}); "
        f"check time {row['seconds']['outputs']:.2f} s -> {row['seconds']['intermediates']:.2f} s"
    )
    for entry in row["wrong"]:
        o, i = entry["outputs"], entry["intermediates"]
        print(
            f"  {row['sabotaged_kind']} {entry['position']} '{entry['layer']}' weights x 1.01: outputs-only "
            f"{'pass (MISSED)' if o['passed'] else 'FAIL'} (output at {o['output_ratio']:.2g} x tol); "
            f"with intermediates {'pass (MISSED)' if i['passed'] else 'FAIL'}"
            + (f", first failing {i['first_failing']}" if i["first_failing"] else "")
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--manifest")
    parser.add_argument("--match", action="append", default=[])
    parser.add_argument("--shape", action="append", default=[])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    jobs = [(m, parse_shape_specs(args.shape)) for m in args.models]
    if args.manifest:
        root = os.path.dirname(os.path.abspath(args.manifest))
        with open(args.manifest) as f:
            for entry in json.load(f)["models"]:
                if args.match and not any(m in entry["name"] for m in args.match):
                    continue
                shapes = {k: tuple(v) for k, v in (entry.get("example_inputs") or {}).items()}
                jobs.append((os.path.join(root, entry["path"]), shapes))
    rows = []
    for path, shapes in jobs:
        with tempfile.TemporaryDirectory(prefix="bnfold-sweep-") as tmp_dir:
            try:
                row = sweep(path, shapes, tmp_dir)
            except InputError as e:
                print(f"{os.path.basename(path)}: skipped ({e})")
                continue
        _print_row(row)
        sys.stdout.flush()
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=float)
    missed = sum(e["intermediates"]["passed"] for r in rows for e in r["wrong"])
    false_failures = sum(not r["fold_intermediates"]["passed"] for r in rows)
    print(
        f"{len(rows)} models; correct folds failing with intermediates: {false_failures}; wrong folds missed with "
        f"intermediates: {missed} of {sum(len(r['wrong']) for r in rows)}; missed outputs-only: "
        f"{sum(e['outputs']['passed'] for r in rows for e in r['wrong'])}"
    )
    return 1 if missed or false_failures else 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
