"""What bnfold's branch folds buy on RepVGG-A0 and MobileOne-S0: fold an export made without
re-parameterization and compare it, in onnxruntime, with that export and with the export of the
model timm re-parameterized itself (``timm.utils.model.reparameterize_model``).

For each architecture (random weights, realistic BN statistics as tools/build_corpus.py makes
them, nothing downloaded):

* (a) ``exported``: TorchScript export with ``TrainingMode.PRESERVE`` (every BN kept, as the
  corpus' ``ts-preserve`` files), the multi-branch blocks as they are;
* ``folded``: (a) folded by ``bnfold.fold`` (conv_bn, bn_branch, conv_branches);
* (b) ``timm-reparam``: the model after ``reparameterize_model``, exported the same way.

It prints the Conv / BatchNormalization / Add counts of the three, the parity of ``folded``
against (a) (``bnfold.check``) and against PyTorch's own output, then latencies measured with
``bnfold.verify.benchmark`` (the machinery of ``bnfold bench``) in this process, all three models
interleaved round by round: the speed-up of ``folded`` over (a) (target >= 1.5x) and its latency
relative to (b) (target within 5 %). ``--corpus`` also prints the counts for the corpus files.

    python tools/bench_reparam.py                      # 224x224, opt level all, 3 s per cell
    python tools/bench_reparam.py --threads 1 --time 6 --opt-level all,disabled --corpus
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import pathlib
import sys
import tempfile

import numpy as np
import onnx

ARCHITECTURES = ("repvgg_a0", "mobileone_s0")
CORPUS_FILES = ("timm-repvgg_a0.ts-preserve-half.op20", "timm-mobileone_s0.ts-preserve.op11")
COUNTED_OPS = ("Conv", "BatchNormalization", "Add")


def _build_corpus_tools():
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import build_corpus

    return build_corpus


def op_counts(model: onnx.ModelProto) -> dict:
    counts = collections.Counter(node.op_type for node in model.graph.node)
    return {op: counts[op] for op in COUNTED_OPS}


def export(torch, model, example, path) -> onnx.ModelProto:
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        opset_version=17,
        training=torch.onnx.TrainingMode.PRESERVE,
        input_names=["input"],
        output_names=["output"],
    )
    return onnx.load(str(path))


def measure(arch: str, size: int, time_budget: float, threads, opt_levels, workdir: pathlib.Path) -> dict:
    import torch

    import bnfold
    from bnfold.verify import benchmark

    tools = _build_corpus_tools()
    import timm
    from timm.utils.model import reparameterize_model

    model = timm.create_model(arch)
    tools.make_statistics_realistic(model, (3, size, size), torch.Generator().manual_seed(0))
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    exported = export(torch, model, example, workdir / f"{arch}.onnx")
    reparameterized = reparameterize_model(copy.deepcopy(model))
    reparam_exported = export(torch, reparameterized, example, workdir / f"{arch}-reparam.onnx")
    with torch.no_grad():
        torch_output = model(example).numpy()
        torch_reparam_output = reparameterized(example).numpy()

    folded, report = bnfold.fold(exported)
    onnx.checker.check_model(folded, full_check=True)
    parity = bnfold.check(exported, folded, inputs={"input": example.numpy()})
    import onnxruntime as ort

    session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    folded_output = session.run(None, {"input": example.numpy()})[0]
    scale = float(np.max(np.abs(torch_output)))
    result = {
        "arch": arch,
        "counts": {
            "exported": op_counts(exported),
            "folded": op_counts(folded),
            "timm-reparam": op_counts(reparam_exported),
        },
        "bn_folded": dict(collections.Counter(f.rule for f in report.folded)),
        "bn_remaining": len(report.remaining),
        "merged": len(report.merged),
        "unmerged": len(report.unmerged),
        "parity_passed": parity.passed,
        "parity_max_abs_error": parity.max_abs_error,
        "folded_vs_torch_max_abs_error": float(np.max(np.abs(folded_output - torch_output))),
        "torch_reparam_vs_torch_max_abs_error": float(np.max(np.abs(torch_reparam_output - torch_output))),
        "output_scale": scale,
    }
    bench = benchmark(
        {"exported": exported, "folded": folded, "timm-reparam": reparam_exported},
        opt_levels=opt_levels,
        threads=threads,
        time_budget=time_budget,
        inputs={"input": example.numpy()},
        progress=False,
    )
    result["bench_table"] = bench.format_table()
    result["latency_ms"] = {level: {m: bench.result(m, level).median_ms for m in bench.models} for level in opt_levels}
    result["folded_speedup_vs_exported"] = {level: bench.speedup("folded", level) for level in opt_levels}
    result["folded_over_reparam_latency"] = {
        level: bench.result("folded", level).median_ms / bench.result("timm-reparam", level).median_ms
        for level in opt_levels
    }
    return result


def corpus_counts() -> list:
    import bnfold

    root = pathlib.Path.home() / ".cache" / "bnfold" / "corpus"
    manifests = sorted(root.glob("*/manifest.json"))
    if not manifests:
        return []
    manifest = json.loads(manifests[-1].read_text(encoding="utf-8"))
    entries = manifest["models"]
    rows = []
    for entry in entries:
        if entry["name"] not in CORPUS_FILES:
            continue
        path = pathlib.Path(entry["path"])
        if not path.is_absolute():
            path = manifests[-1].parent / path
        model = onnx.load(str(path))
        folded, report = bnfold.fold(model)
        parity = bnfold.check(model, folded)
        rows.append(
            {
                "name": entry["name"],
                "before": op_counts(model),
                "after": op_counts(folded),
                "merged": len(report.merged),
                "bn_folded": dict(collections.Counter(f.rule for f in report.folded)),
                "bn_remaining": len(report.remaining),
                "parity_passed": parity.passed,
                "parity_max_abs_error": parity.max_abs_error,
            }
        )
    return rows


def _counts_text(counts: dict) -> str:
    return ", ".join(f"{op} {n}" for op, n in counts.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--time", type=float, default=3.0, help="seconds of timed runs per model (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all)")
    parser.add_argument(
        "--opt-level", default="all", help="onnxruntime optimization levels, comma-separated (default all)"
    )
    parser.add_argument("--arch", action="append", choices=ARCHITECTURES, help="only these (default: both)")
    parser.add_argument("--corpus", action="store_true", help="also count the ops of the two corpus files")
    parser.add_argument("--json", help="write every figure to this JSON file")
    args = parser.parse_args(argv)

    import torch

    _build_corpus_tools()._define_torchvision_schemas(torch)  # timm imports torchvision
    torch.set_num_threads(1)
    results = {"architectures": [], "corpus": []}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch or ARCHITECTURES:
            r = measure(arch, args.size, args.time, args.threads, tuple(args.opt_level.split(",")), pathlib.Path(tmp))
            results["architectures"].append(r)
            print(f"== {arch} ({args.size}x{args.size}, batch 1)")
            for name, counts in r["counts"].items():
                print(f"  {name:13s} {_counts_text(counts)}")
            print(
                f"  BNs folded {r['bn_folded']}, {r['bn_remaining']} left; {r['merged']} Conv merges, "
                f"{r['unmerged']} Adds left apart"
            )
            print(
                f"  parity folded vs exported: {'passed' if r['parity_passed'] else 'FAILED'} (max abs error "
                f"{r['parity_max_abs_error']:.3g}); folded vs PyTorch {r['folded_vs_torch_max_abs_error']:.3g}, "
                f"PyTorch reparameterized vs PyTorch {r['torch_reparam_vs_torch_max_abs_error']:.3g} "
                f"(output scale {r['output_scale']:.3g})"
            )
            print("  " + r["bench_table"].replace("\n", "\n  "))
            for level in r["folded_speedup_vs_exported"]:
                print(
                    f"  opt level {level}: folded vs exported speed-up {r['folded_speedup_vs_exported'][level]:.2f}x "
                    f"(target >= 1.5x); folded / timm-reparam latency {r['folded_over_reparam_latency'][level]:.3f} "
                    "(target within 5 %)"
                )
    if args.corpus:
        results["corpus"] = corpus_counts()
        for row in results["corpus"]:
            print(f"== corpus {row['name']}")
            print(f"  before {_counts_text(row['before'])}")
            print(f"  after  {_counts_text(row['after'])}")
            print(
                f"  BNs folded {row['bn_folded']}, {row['bn_remaining']} left; {row['merged']} Conv merges; parity "
                f"{'passed' if row['parity_passed'] else 'FAILED'} (max abs error {row['parity_max_abs_error']:.3g})"
            )
    if args.json:
        from bnfold.io import write_json_atomic

        write_json_atomic(results, os.fspath(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
