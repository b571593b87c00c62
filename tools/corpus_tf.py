"""Keras models exported to ONNX through tf2onnx, a family of bnfold's real-world corpus (issue 10).

What it builds
    keras.applications architectures (MobileNetV2, EfficientNetB0, DenseNet121, ResNet50V2,
    NASNetMobile) and a small hand-written Conv/Depthwise/Separable/ConvTranspose/Dense + BN model,
    all with ``weights=None`` (nothing is downloaded), 96x96 inputs (32x32 for the small model), in
    two Keras flavours:

    * **Keras 3** (``keras`` on the TensorFlow backend), exported the way Keras 3 documents it:
      ``model.export(path, format="onnx", opset_version=N)``, which runs tf2onnx on a concrete
      function.  Keras 3 computes BatchNormalization with ``tf.nn.batch_normalization`` (Rsqrt, Mul,
      Add), so these files hold no BatchNormalization node: TensorFlow's graph optimizer folds the
      affine map into Conv weights where it can and leaves per-channel Mul/Add elsewhere (after
      depthwise convolutions, after Concat).  They are the "no BN left" controls of the corpus.
    * **tf.keras** (Keras 2, the ``tf_keras`` package), exported with ``tf2onnx.convert.from_keras``.
      Its BN is ``FusedBatchNormV3``, which tf2onnx writes as BatchNormalization.  Variant
      ``tf2onnx`` is tf2onnx's defaults (its optimizer fuses every Conv -> BN whose Conv output has
      one reader, so only BNs after Add/Concat/MaxPool/the input stay); variant ``tf2onnx-keepbn``
      turns off only that Conv+BN fusion, so the BNs are left for bnfold to fold.

    Every model gets realistic BN statistics before export: gamma ~ U(0.5, 1.5), beta ~ N(0, 0.2),
    then moving mean/variance equal to the cumulative average of the batch statistics of three
    random train-mode batches (momentum set to k/(k+1) on the k-th batch).  Opsets 11, 13, 15 and
    17, dynamic and fixed (1) batch, NHWC input (tf2onnx's default) and one ``inputs_as_nchw``.

Where TensorFlow runs
    TensorFlow, tf_keras and tf2onnx are never imported into the calling process.  The exports run in
    at most two child processes (this same file with ``--worker``) of a Python that has the pinned
    versions below: the calling interpreter if it has them all, else a private virtual environment
    created once under ``<out_dir>/.venv`` (or ``$BNFOLD_CORPUS_TF_VENV``) with
    ``pip install`` of the pins.  The pins coexist with the project's onnx 1.23 / protobuf 7 /
    numpy 2.4, but the project's own environment is never changed.  Where no such Python can be had
    (unsupported Python or platform, no registry, pip fails), the family is reported
    ``unavailable`` with the reason, and the failure is remembered for a few hours so a warm call
    does not wait for pip again.

Cache
    ``<out_dir>/<name>.onnx`` and ``<out_dir>/<name>.json`` (the manifest entry, written by the
    child right after the file, so an interrupted build keeps what it finished).  ``build()`` exports
    only what is missing or was made by another spec; a warm call reads the JSON files and returns.

Environment
    ``BNFOLD_CORPUS_TF_VENV``: where the private venv lives (default ``<out_dir>/.venv``; a path
    outside a fingerprinted corpus directory keeps it across corpus rebuilds).
    ``BNFOLD_CORPUS_TF_PROCESSES``: export processes at once (default and maximum 2).

Run ``python tools/corpus_tf.py OUT_DIR`` to build into OUT_DIR, print the entries and check that
onnxruntime loads and runs each file on random input.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from typing import Optional

FAMILY = "keras"

# Versions that shape the files.  tensorflow-cpu 2.21 requires protobuf >= 6.31.1, < 8 and
# ml_dtypes < 1, so the project's protobuf 7 / onnx 1.23 / numpy 2.4 can stay as they are.
TENSORFLOW_VERSION = "2.21.0"
KERAS3_VERSION = "3.15.1"
TF_KERAS_VERSION = "2.21.0"
TF2ONNX_VERSION = "1.17.0"
PINNED_REQUIREMENTS = (
    f"tensorflow-cpu=={TENSORFLOW_VERSION}",
    f"keras=={KERAS3_VERSION}",
    f"tf2onnx=={TF2ONNX_VERSION}",
    "onnx==1.23.2",
    "protobuf==7.36.2",
    "numpy==2.4.6",
    "ml_dtypes==0.6.0",
    "h5py==3.14.0",
)
# tf_keras declares a dependency on `tensorflow`, the full wheel, which pip would install beside
# tensorflow-cpu (the same modules, another ~600 MB).  It is installed with --no-deps instead.
NO_DEPS_REQUIREMENTS = (f"tf_keras=={TF_KERAS_VERSION}",)
# Distribution names -> version, to decide whether an interpreter already has what we need.
REQUIRED_DISTRIBUTIONS = {
    "tensorflow-cpu": TENSORFLOW_VERSION,
    "keras": KERAS3_VERSION,
    "tf_keras": TF_KERAS_VERSION,
    "tf2onnx": TF2ONNX_VERSION,
    "onnx": "1.23.2",
}
# tensorflow-cpu 2.21 publishes wheels for CPython 3.10-3.13 on x86-64 Linux only.
SUPPORTED_PYTHONS = ((3, 10), (3, 11), (3, 12), (3, 13))
SUPPORTED_MACHINES = ("x86_64", "AMD64")

# Bump when the export code changes what it writes; part of every entry's spec key.
EXPORT_CODE_VERSION = "2"

MAX_PROCESSES = 2
# Below build_corpus.py's per-job limit (900 s), so a slow machine reports failures itself.
EXPORT_TIMEOUT_S = 780
PIP_TIMEOUT_S = 600
# A failed environment set-up is not retried before this many seconds (delete the marker to retry).
SETUP_FAILURE_MEMORY_S = 6 * 3600

THIS_FILE = os.path.abspath(__file__)
VENV_ENV_VAR = "BNFOLD_CORPUS_TF_VENV"
VENV_READY_MARKER = "bnfold-ready.json"
SETUP_FAILURE_MARKER = ".venv-setup-failed.json"


# ---------------------------------------------------------------------------------------------
# What is built
# ---------------------------------------------------------------------------------------------

KERAS3 = "keras3"
TF_KERAS = "tf.keras"
NAME_PREFIX = {KERAS3: "keras3", TF_KERAS: "tfkeras"}


@dataclasses.dataclass(frozen=True)
class Architecture:
    arch: str  # corpus id, lower case
    constructor: str  # keras.applications attribute, or "" for the hand-written model
    image_size: int
    cpu_cost: float  # rough seconds of one export on this machine; scheduling only


ARCHITECTURES = {
    a.arch: a
    for a in (
        Architecture("mobilenetv2", "MobileNetV2", 96, 6.0),
        Architecture("efficientnetb0", "EfficientNetB0", 96, 14.0),
        Architecture("densenet121", "DenseNet121", 96, 16.0),
        Architecture("resnet50v2", "ResNet50V2", 96, 22.0),
        Architecture("nasnetmobile", "NASNetMobile", 96, 55.0),
        Architecture("small-convbn", "", 32, 1.5),
    )
}


@dataclasses.dataclass(frozen=True)
class ExportJob:
    flavor: str  # KERAS3 | TF_KERAS
    arch: str
    opset: int
    fixed_batch: bool  # batch dimension 1 instead of symbolic
    keep_bn: bool = False  # tf.keras only: tf2onnx's Conv+BN fusion off
    nchw_input: bool = False  # tf.keras only: tf2onnx inputs_as_nchw

    @property
    def exporter_variant(self) -> str:
        if self.flavor == KERAS3:
            return "keras-export"
        return "tf2onnx" + ("-keepbn" if self.keep_bn else "") + ("-nchw" if self.nchw_input else "")

    @property
    def name(self) -> str:
        name = f"{NAME_PREFIX[self.flavor]}-{self.arch}.{self.exporter_variant}.op{self.opset}"
        return name + (".b1" if self.fixed_batch else "")

    @property
    def variant(self) -> str:
        return self.exporter_variant

    def spec_key(self) -> str:
        """Changes whenever anything that shapes this file changes (then it is exported again)."""
        text = json.dumps(
            [
                dataclasses.asdict(self),
                PINNED_REQUIREMENTS,
                NO_DEPS_REQUIREMENTS,
                EXPORT_CODE_VERSION,
                dataclasses.asdict(ARCHITECTURES[self.arch]),
            ]
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


PLANNED_EXPORTS = (
    # tf.keras: BatchNormalization nodes survive (all of them with keepbn).
    ExportJob(TF_KERAS, "mobilenetv2", 13, fixed_batch=False),
    ExportJob(TF_KERAS, "mobilenetv2", 17, fixed_batch=True, keep_bn=True),
    ExportJob(TF_KERAS, "efficientnetb0", 13, fixed_batch=False, keep_bn=True),
    ExportJob(TF_KERAS, "efficientnetb0", 17, fixed_batch=True),
    ExportJob(TF_KERAS, "densenet121", 13, fixed_batch=False),
    ExportJob(TF_KERAS, "densenet121", 17, fixed_batch=True, keep_bn=True),
    ExportJob(TF_KERAS, "resnet50v2", 13, fixed_batch=False, keep_bn=True),
    ExportJob(TF_KERAS, "nasnetmobile", 13, fixed_batch=False),
    ExportJob(TF_KERAS, "small-convbn", 13, fixed_batch=False),
    ExportJob(TF_KERAS, "small-convbn", 17, fixed_batch=True, keep_bn=True),
    ExportJob(TF_KERAS, "small-convbn", 11, fixed_batch=False, keep_bn=True),
    ExportJob(TF_KERAS, "small-convbn", 15, fixed_batch=False, nchw_input=True),
    # Keras 3: BN decomposed by TensorFlow, no BatchNormalization node in the files.
    ExportJob(KERAS3, "mobilenetv2", 15, fixed_batch=False),
    ExportJob(KERAS3, "mobilenetv2", 17, fixed_batch=True),
    ExportJob(KERAS3, "efficientnetb0", 17, fixed_batch=True),
    ExportJob(KERAS3, "densenet121", 15, fixed_batch=False),
    ExportJob(KERAS3, "small-convbn", 13, fixed_batch=False),
    ExportJob(KERAS3, "small-convbn", 17, fixed_batch=True),
)


def fingerprint_parts() -> list[str]:
    """Everything that changes the files: the pins, the export code version, the planned exports."""
    return [
        *PINNED_REQUIREMENTS,
        *NO_DEPS_REQUIREMENTS,
        f"export-code={EXPORT_CODE_VERSION}",
        *(f"{job.name}:{job.spec_key()}" for job in PLANNED_EXPORTS),
    ]


# ---------------------------------------------------------------------------------------------
# Driver side (the calling process: stdlib only, TensorFlow never imported here)
# ---------------------------------------------------------------------------------------------


def build(out_dir: str, *, log=print) -> dict:
    """Export every planned model missing from out_dir; return the family's manifest part."""
    os.makedirs(out_dir, exist_ok=True)
    result = {"models": [], "failed": [], "unavailable": []}
    with _exclusive_lock(os.path.join(out_dir, ".build.lock")):
        cached, missing = _split_cached(out_dir)
        result["models"].extend(cached)
        if not missing:
            return result
        log(f"keras: {len(cached)} cached, {len(missing)} to export")
        python, reason = _export_python(out_dir, log)
        if python is None:
            log(f"keras: unavailable: {reason}")
            result["unavailable"].append({"family": FAMILY, "reason": reason})
            return result
        started, cpu_before = time.monotonic(), _children_cpu_seconds()
        errors = _run_export_workers(python, out_dir, missing, log)
        log(
            f"keras: exports took {time.monotonic() - started:.0f} s wall, "
            f"{_children_cpu_seconds() - cpu_before:.0f} s CPU in the export processes"
        )
        built, still_missing = _split_cached(out_dir)
        result["models"] = built
        for job in still_missing:
            error = errors.get(job.name) or "export process ended without writing this model"
            result["failed"].append({"name": job.name, "error": error})
    return result


def _children_cpu_seconds() -> float:
    try:
        import resource
    except ImportError:
        return 0.0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _entry_path(out_dir: str, job: ExportJob) -> tuple[str, str]:
    return os.path.join(out_dir, job.name + ".onnx"), os.path.join(out_dir, job.name + ".json")


def _split_cached(out_dir: str) -> tuple[list[dict], list[ExportJob]]:
    """Entries whose file and JSON exist and match the current spec, and the jobs still to run."""
    cached, missing = [], []
    for job in PLANNED_EXPORTS:
        model_path, entry_path = _entry_path(out_dir, job)
        entry = None
        if os.path.exists(model_path) and os.path.exists(entry_path):
            try:
                with open(entry_path, encoding="utf-8") as handle:
                    stored = json.load(handle)
                if stored.get("spec_key") == job.spec_key():
                    entry = stored["entry"]
            except (OSError, ValueError, KeyError):
                entry = None
        if entry is None:
            missing.append(job)
        else:
            cached.append(entry)
    return cached, missing


@contextlib.contextmanager
def _exclusive_lock(path: str):
    """One build per directory at a time (two test sessions may start the corpus together)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no concurrent builds to guard against in practice
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _interpreter_has_pins() -> bool:
    import importlib.metadata

    for distribution, version in REQUIRED_DISTRIBUTIONS.items():
        try:
            if importlib.metadata.version(distribution) != version:
                return False
        except importlib.metadata.PackageNotFoundError:
            return False
    return True


def _venv_dir(out_dir: str) -> str:
    return os.environ.get(VENV_ENV_VAR) or os.path.join(out_dir, ".venv")


def _venv_python(venv: str) -> str:
    if os.name == "nt":
        return os.path.join(venv, "Scripts", "python.exe")
    return os.path.join(venv, "bin", "python")


def _requirements_key() -> str:
    text = json.dumps([PINNED_REQUIREMENTS, NO_DEPS_REQUIREMENTS, sys.version_info[:2]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _export_python(out_dir: str, log) -> "tuple[Optional[str], str]":
    """A Python that has the pins: this one, or the private venv (created here if needed)."""
    if _interpreter_has_pins():
        return sys.executable, ""
    if sys.version_info[:2] not in SUPPORTED_PYTHONS:
        return None, (
            f"tensorflow-cpu {TENSORFLOW_VERSION} has no wheel for Python {sys.version_info[0]}.{sys.version_info[1]}"
        )
    if not sys.platform.startswith("linux") or platform.machine() not in SUPPORTED_MACHINES:
        return None, (f"tensorflow-cpu {TENSORFLOW_VERSION} has no wheel for {sys.platform}/{platform.machine()}")
    venv = _venv_dir(out_dir)
    marker = os.path.join(venv, VENV_READY_MARKER)
    try:
        with open(marker, encoding="utf-8") as handle:
            if json.load(handle).get("requirements") == _requirements_key():
                return _venv_python(venv), ""
    except (OSError, ValueError):
        pass
    failure_marker = os.path.join(out_dir, SETUP_FAILURE_MARKER)
    try:
        with open(failure_marker, encoding="utf-8") as handle:
            failure = json.load(handle)
        if (
            failure.get("requirements") == _requirements_key()
            and time.time() - failure.get("time", 0) < SETUP_FAILURE_MEMORY_S
        ):
            return None, failure["reason"] + f" (remembered; delete {failure_marker} to retry)"
    except (OSError, ValueError, KeyError):
        pass
    reason = _create_venv(venv, log)
    if reason:
        with open(failure_marker, "w", encoding="utf-8") as handle:
            json.dump({"requirements": _requirements_key(), "time": time.time(), "reason": reason}, handle)
        return None, reason
    with contextlib.suppress(FileNotFoundError):
        os.remove(failure_marker)
    return _venv_python(venv), ""


def _create_venv(venv: str, log) -> str:
    """Create the venv and install the pins; return "" or the reason it could not be done."""
    started = time.monotonic()
    log(
        f"keras: creating {venv} with {', '.join(PINNED_REQUIREMENTS + NO_DEPS_REQUIREMENTS)} "
        "(once per machine; takes a few minutes)"
    )
    shutil.rmtree(venv, ignore_errors=True)
    # venv builds on the base interpreter either way; naming it says that nothing installed in the
    # calling venv is visible in the new one.
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    pip_install = [
        _venv_python(venv),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        "--timeout",
        "60",
        "--retries",
        "2",
    ]
    steps = [
        ("python -m venv", [base_python, "-m", "venv", venv]),
        ("pip install " + " ".join(PINNED_REQUIREMENTS), pip_install + list(PINNED_REQUIREMENTS)),
        (
            "pip install --no-deps " + " ".join(NO_DEPS_REQUIREMENTS),
            pip_install + ["--no-deps"] + list(NO_DEPS_REQUIREMENTS),
        ),
    ]
    for description, command in steps:
        try:
            completed = subprocess.run(
                command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, env=_child_environment()
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            shutil.rmtree(venv, ignore_errors=True)
            return f"{description}: {error}"
        if completed.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            return f"{description} failed: {_last_error_line(completed.stderr)}"
    with open(os.path.join(venv, VENV_READY_MARKER), "w", encoding="utf-8") as handle:
        json.dump(
            {"requirements": _requirements_key(), "pins": list(PINNED_REQUIREMENTS + NO_DEPS_REQUIREMENTS)}, handle
        )
    log(f"keras: venv ready in {time.monotonic() - started:.0f} s")
    return ""


def _last_error_line(stderr: str) -> str:
    # pip prints a warning per missing local index directory here; the reason is the last ERROR.
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1][:300]


def _child_environment() -> dict:
    env = dict(os.environ)
    # The child must see only its own site-packages, not the caller's venv or user site.
    for variable in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(variable, None)
    env.update(
        {
            "PYTHONNOUSERSITE": "1",
            "TF_CPP_MIN_LOG_LEVEL": "3",
            # No GPU here; without this TensorFlow probes CUDA and logs errors.
            "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1",
        }
    )
    return env


def _schedule(jobs: list[ExportJob], n_processes: int) -> list[list[ExportJob]]:
    """Split the jobs into batches of whole (flavour, arch) groups, one child process each.

    A batch holds one Keras flavour only: Keras 3's exporter patches tf2onnx in place (for numpy 2),
    and the tf.keras files must come from an unpatched tf2onnx whatever order the jobs run in.  About
    two batches per process slot, longest first, so that the slots finish close together.
    """
    groups: dict[tuple[str, str], list[ExportJob]] = {}
    for job in jobs:
        groups.setdefault((job.flavor, job.arch), []).append(job)

    def cost(key) -> float:  # building + calibrating costs about one export
        return ARCHITECTURES[key[1]].cpu_cost * (1 + len(groups[key]))

    unit = sum(cost(key) for key in groups) / (2 * n_processes)
    batches: list[tuple[float, list[ExportJob]]] = []
    for flavor in sorted({key[0] for key in groups}):
        keys = sorted((key for key in groups if key[0] == flavor), key=lambda k: -cost(k))
        n_bins = max(1, min(len(keys), round(sum(cost(k) for k in keys) / unit)))
        bins = [[0.0, []] for _ in range(n_bins)]
        for key in keys:
            target = min(bins, key=lambda b: b[0])
            target[0] += cost(key)
            target[1].extend(groups[key])
        batches.extend((b[0], b[1]) for b in bins if b[1])
    batches.sort(key=lambda b: -b[0])
    return [b[1] for b in batches]


def _die_with_parent(parent_pid: int) -> None:
    """In the child: end when the build process dies (build_corpus kills a worker that is too slow,
    and the export must not run on unseen).  Linux only; elsewhere the child runs to its end."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(3)


def _run_export_workers(python: str, out_dir: str, jobs: list[ExportJob], log) -> dict:
    """Run the export children (at most MAX_PROCESSES at once); return {name: error} of failures."""
    try:
        n_processes = max(1, min(MAX_PROCESSES, int(os.environ.get("BNFOLD_CORPUS_TF_PROCESSES", MAX_PROCESSES))))
    except ValueError:
        n_processes = MAX_PROCESSES
    batches = _schedule(jobs, n_processes)
    log_lock = threading.Lock()  # the caller's log need not be thread-safe
    errors: dict[str, str] = {}
    errors_lock = threading.Lock()
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    pending = list(batches)
    pending_lock = threading.Lock()

    def run_one(batch: list[ExportJob]) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, dir=out_dir, prefix=".jobs-") as handle:
            json.dump([dataclasses.asdict(job) for job in batch], handle)
            job_file = handle.name
        command = [python, THIS_FILE, "--worker", out_dir, job_file, str(os.getpid())]
        try:
            process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_child_environment()
            )
        except OSError as error:
            with errors_lock:
                errors.update({job.name: f"cannot start the export process: {error}" for job in batch})
            os.remove(job_file)
            return
        timer = threading.Timer(max(1.0, deadline - time.monotonic()), process.kill)
        timer.start()
        tail: list[str] = []
        try:
            for line in process.stderr:
                line = line.rstrip()
                if line.startswith(WORKER_LOG_PREFIX):
                    with log_lock:
                        log("keras: " + line[len(WORKER_LOG_PREFIX) :])
                elif line.startswith(WORKER_ERROR_PREFIX):
                    name, _, error = line[len(WORKER_ERROR_PREFIX) :].partition(" ")
                    with errors_lock:
                        errors[name] = error
                elif line:
                    tail = (tail + [line])[-5:]
            process.wait()
        finally:
            timer.cancel()
            with contextlib.suppress(FileNotFoundError):
                os.remove(job_file)
        if process.returncode != 0:
            why = (
                "timed out"
                if time.monotonic() >= deadline
                else f"export process exited with {process.returncode}: {tail[-1] if tail else ''}"
            )
            with errors_lock:
                for job in batch:
                    errors.setdefault(job.name, why)

    def runner() -> None:
        while True:
            with pending_lock:
                if not pending:
                    return
                batch = pending.pop(0)
            if time.monotonic() >= deadline:
                with errors_lock:
                    errors.update({job.name: f"not started: exports ran past {EXPORT_TIMEOUT_S} s" for job in batch})
                continue
            run_one(batch)

    threads = [threading.Thread(target=runner, daemon=True) for _ in range(min(n_processes, len(batches)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


# ---------------------------------------------------------------------------------------------
# Export child (runs in the Python that has TensorFlow; imports it lazily)
# ---------------------------------------------------------------------------------------------

WORKER_LOG_PREFIX = "@log "
WORKER_ERROR_PREFIX = "@error "
CALIBRATION_BATCHES = 3
CALIBRATION_BATCH_SIZE = 8


def _worker_log(message: str) -> None:
    print(WORKER_LOG_PREFIX + message, file=sys.stderr, flush=True)


def worker_main(out_dir: str, job_file: str, parent_pid: int) -> int:
    _die_with_parent(parent_pid)
    with open(job_file, encoding="utf-8") as handle:
        jobs = [ExportJob(**fields) for fields in json.load(handle)]
    # Threads: one TensorFlow thread per process (at most two processes share two cores).
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    groups: dict[tuple[str, str], list[ExportJob]] = {}
    for job in jobs:
        groups.setdefault((job.flavor, job.arch), []).append(job)
    failures = 0
    for (flavor, arch), group in groups.items():
        started, cpu_started = time.monotonic(), time.process_time()
        try:
            keras = _import_keras(flavor)
            model, bn_layers = _build_model_with_statistics(keras, ARCHITECTURES[arch], seed=_seed(flavor, arch))
        except Exception as error:  # noqa: BLE001  (reported per model; the other groups go on)
            for job in group:
                _report_failure(job, f"building the Keras model: {_first_line(error)}")
            failures += len(group)
            continue
        _worker_log(
            f"{flavor} {arch}: built, {bn_layers} BN layers, statistics set "
            f"({time.monotonic() - started:.1f} s, {time.process_time() - cpu_started:.1f} s CPU)"
        )
        for job in group:
            job_started, job_cpu_started = time.monotonic(), time.process_time()
            try:
                entry = _export_one(tf, keras, model, job, bn_layers, out_dir)
            except Exception as error:  # noqa: BLE001
                _report_failure(job, _first_line(error))
                failures += 1
                continue
            _worker_log(
                f"{job.name}: {entry['bn_nodes']} BatchNormalization nodes, "
                f"{os.path.getsize(os.path.join(out_dir, entry['path'])) / 1e6:.1f} MB "
                f"({time.monotonic() - job_started:.1f} s, "
                f"{time.process_time() - job_cpu_started:.1f} s CPU)"
            )
        del model
        keras.backend.clear_session()
    return 1 if failures else 0


def _report_failure(job: ExportJob, error: str) -> None:
    print(WORKER_ERROR_PREFIX + job.name + " " + error.replace("\n", " ")[:400], file=sys.stderr, flush=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _seed(flavor: str, arch: str) -> int:
    # Stable across runs and machines (hash() is salted per process).
    return zlib.crc32(f"{flavor}/{arch}".encode()) % (2**31)


def _import_keras(flavor: str):
    if flavor == KERAS3:
        import keras

        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(f"Keras 3 backend is {keras.backend.backend()}, not tensorflow (KERAS_BACKEND)")
        return keras
    import tf_keras

    return tf_keras


def _small_convbn_model(keras, size: int):
    """Conv/BN layouts a user writes by hand, beside what keras.applications has."""
    layers = keras.layers
    inputs = keras.Input((size, size, 3), name="image")
    x = layers.BatchNormalization(name="input_bn")(inputs)  # BN before any Conv (forward fold only)
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(16, 3, padding="same", use_bias=True)(x)  # Conv bias and BN shift both present
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.DepthwiseConv2D(3, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.SeparableConv2D(32, 3, padding="same", strides=2)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.Conv2DTranspose(16, 2, strides=2, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(32)(x)
    x = layers.BatchNormalization()(x)  # rank-2 BN after Dense (not fused by tf.keras)
    x = layers.ReLU()(x)
    outputs = layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="small_convbn")


def _all_layers(layer):
    yield layer
    for sub in getattr(layer, "layers", None) or ():
        yield from _all_layers(sub)


def _build_model_with_statistics(keras, architecture: Architecture, *, seed: int):
    """The model, with gamma/beta drawn and moving statistics from random train-mode batches."""
    import numpy as np

    keras.utils.set_random_seed(seed)
    size = architecture.image_size
    if architecture.constructor:
        constructor = getattr(keras.applications, architecture.constructor)
        model = constructor(weights=None, input_shape=(size, size, 3))
    else:
        model = _small_convbn_model(keras, size)
    bn_layers = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    rng = np.random.default_rng(seed)
    for layer in bn_layers:
        channels = int(layer.gamma.shape[0])
        layer.gamma.assign(rng.uniform(0.5, 1.5, channels).astype("float32"))
        layer.beta.assign(rng.normal(0.0, 0.2, channels).astype("float32"))
    saved_momentum = [layer.momentum for layer in bn_layers]
    try:
        for step in range(CALIBRATION_BATCHES):
            # moving = m * moving + (1 - m) * batch with m = k/(k+1): the cumulative average of the
            # k+1 batches seen so far (the first batch replaces the 0/1 initial values).
            for layer in bn_layers:
                layer.momentum = step / (step + 1)
            batch = rng.standard_normal((CALIBRATION_BATCH_SIZE, size, size, 3)).astype("float32")
            model(batch, training=True)
    finally:
        for layer, momentum in zip(bn_layers, saved_momentum):
            layer.momentum = momentum
    return model, len(bn_layers)


@contextlib.contextmanager
def _tf2onnx_conv_bn_fusion(enabled: bool):
    """tf2onnx's optimizer with or without its Conv -> BatchNormalization fusion (all else as is)."""
    if enabled:
        yield
        return
    from tf2onnx.optimizer import back_to_back_optimizer

    handlers = back_to_back_optimizer._func_map  # pylint: disable=protected-access
    key = ("Conv", "BatchNormalization")
    if key not in handlers:
        raise RuntimeError("tf2onnx has no Conv+BatchNormalization fusion to turn off (changed version?)")
    handler = handlers.pop(key)
    try:
        yield
    finally:
        handlers[key] = handler


def _convert_with_tf2onnx_retry(convert) -> None:
    """Run a tf2onnx conversion without its defensive deep copies, then as it comes if that fails.

    TF2ONNX_CATCH_ERRORS=FALSE only stops tf2onnx from deep-copying the graph before each optimizer
    pass so that it can roll a failing pass back: a conversion that succeeds writes the same file
    (measured: about half the export time saved).  If a pass does raise, the conversion is repeated
    with tf2onnx's default behaviour, which skips that pass.
    """
    os.environ["TF2ONNX_CATCH_ERRORS"] = "FALSE"
    try:
        convert()
        return
    except Exception:  # noqa: BLE001
        pass
    finally:
        os.environ.pop("TF2ONNX_CATCH_ERRORS", None)
    convert()


def _export_one(tf, keras, model, job: ExportJob, bn_layers: int, out_dir: str) -> dict:
    size = ARCHITECTURES[job.arch].image_size
    batch = 1 if job.fixed_batch else None
    model_path, entry_path = _entry_path(out_dir, job)
    temporary = model_path + ".partial"
    spec = tf.TensorSpec((batch, size, size, 3), tf.float32, name="input")
    if job.flavor == KERAS3:

        def convert():
            model.export(temporary, format="onnx", opset_version=job.opset, input_signature=[spec], verbose=False)
    else:
        import tf2onnx

        def convert():
            with _tf2onnx_conv_bn_fusion(enabled=not job.keep_bn):
                tf2onnx.convert.from_keras(
                    model,
                    input_signature=(spec,),
                    opset=job.opset,
                    inputs_as_nchw=["input"] if job.nchw_input else None,
                    output_path=temporary,
                )

    try:
        _convert_with_tf2onnx_retry(convert)
        facts = _onnx_facts(temporary)
        os.replace(temporary, model_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
    entry = _make_entry(job, facts, bn_layers)
    with open(entry_path + ".partial", "w", encoding="utf-8") as handle:
        json.dump({"spec_key": job.spec_key(), "entry": entry}, handle, indent=1)
    os.replace(entry_path + ".partial", entry_path)
    return entry


def _onnx_facts(path: str) -> dict:
    """What the manifest says about a file, read from the file (full checker run on it too)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    graph = model.graph
    initializer_names = {init.name for init in graph.initializer}
    inputs = {}
    for value in graph.input:
        if value.name in initializer_names:
            continue
        inputs[value.name] = [
            dim.dim_param if dim.dim_param else (dim.dim_value if dim.dim_value > 0 else "?")
            for dim in value.type.tensor_type.shape.dim
        ]
    constants = {init.name: init for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    affine_after_conv = 0
    for node in graph.node:
        # A decomposed BN left by TensorFlow: per-channel Mul right after a convolution or MatMul.
        if node.op_type == "Mul" and len(node.input) == 2:
            producer = producers.get(node.input[0])
            constant = constants.get(node.input[1])
            if (
                producer is not None
                and producer.op_type in ("Conv", "MatMul")
                and constant is not None
                and np.asarray(numpy_helper.to_array(constant)).size > 1
            ):
                affine_after_conv += 1
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return {
        "inputs": inputs,
        "opset": int(opset),
        "ir_version": int(model.ir_version),
        "bn_nodes": sum(1 for node in graph.node if node.op_type == "BatchNormalization"),
        "mul_after_conv": affine_after_conv,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
    }


def _make_entry(job: ExportJob, facts: dict, bn_layers: int) -> dict:
    architecture = ARCHITECTURES[job.arch]
    origin = (
        f"keras.applications.{architecture.constructor}(weights=None, "
        f"input_shape=({architecture.image_size}, {architecture.image_size}, 3))"
        if architecture.constructor
        else "hand-written Conv/Depthwise/Separable/ConvTranspose/Dense + BN model"
    )
    if job.flavor == KERAS3:
        how = (
            f"Keras {KERAS3_VERSION} (TensorFlow {TENSORFLOW_VERSION} backend) model.export(format='onnx', "
            f"opset_version={job.opset}) -> tf2onnx {TF2ONNX_VERSION}"
        )
        bn_form = (
            f"Keras 3 BN is tf.nn.batch_normalization (no fused op): TensorFlow folded it into Conv "
            f"weights where it could; {facts['mul_after_conv']} per-channel Mul after Conv/MatMul remain "
            f"(decomposed BN), {facts['bn_nodes']} BatchNormalization nodes"
        )
    else:
        how = (
            f"tf_keras {TF_KERAS_VERSION} (TensorFlow {TENSORFLOW_VERSION}) tf2onnx {TF2ONNX_VERSION} "
            f"convert.from_keras(opset={job.opset}" + (", inputs_as_nchw=['input']" if job.nchw_input else "") + ")"
        )
        if job.keep_bn:
            how += " with tf2onnx's Conv+BatchNormalization fusion turned off (all other optimizers on)"
        bn_form = (
            f"{facts['bn_nodes']} BatchNormalization nodes (FusedBatchNormV3"
            + ("" if job.keep_bn else "; tf2onnx fused those after a single-reader Conv")
            + ")"
        )
        if facts["mul_after_conv"]:
            bn_form += f", {facts['mul_after_conv']} per-channel Mul after Conv/MatMul (unfused BN of rank 2)"
    notes = (
        f"{origin}; {how}; {bn_layers} Keras BN layers, gamma~U(0.5,1.5), beta~N(0,0.2), moving "
        f"statistics = cumulative average over {CALIBRATION_BATCHES} random N(0,1) train-mode batches of "
        f"{CALIBRATION_BATCH_SIZE}; {bn_form}; IR {facts['ir_version']}"
    )
    return {
        "name": job.name,
        "path": job.name + ".onnx",
        "source": "keras3" if job.flavor == KERAS3 else "tf.keras",
        "arch": job.arch,
        "exporter": "tf2onnx",
        "variant": job.variant,
        "opset": facts["opset"],
        "batch": "fixed" if job.fixed_batch else "dynamic",
        "float16": "none",
        "external_data": False,
        "fresh_stats": False,
        "inputs": facts["inputs"],
        "bn_modules": bn_layers,
        "bn_nodes": facts["bn_nodes"],
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------
# Stand-alone run: build, print, check every file with onnxruntime
# ---------------------------------------------------------------------------------------------


def check_with_onnxruntime(path: str, seed: int = 0) -> str:
    """Load the file in onnxruntime and run it on random input; return "" or what went wrong."""
    import numpy as np
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(seed)
        feeds = {}
        for value in session.get_inputs():
            shape = [dim if isinstance(dim, int) and dim > 0 else 1 for dim in value.shape]
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
        outputs = session.run(None, feeds)
    except Exception as error:  # noqa: BLE001
        return _first_line(error)
    bad = [i for i, output in enumerate(outputs) if not np.all(np.isfinite(output))]
    return f"non-finite values in outputs {bad}" if bad else ""


def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "--worker":
        return worker_main(argv[1], argv[2], int(argv[3]))
    if len(argv) != 1:
        print(f"usage: {os.path.basename(THIS_FILE)} OUT_DIR", file=sys.stderr)
        return 2
    out_dir = argv[0]
    started = time.monotonic()
    result = build(out_dir, log=lambda message: print(message, file=sys.stderr, flush=True))
    elapsed = time.monotonic() - started
    problems = 0
    for entry in result["models"]:
        path = os.path.join(out_dir, entry["path"])
        error = check_with_onnxruntime(path)
        problems += bool(error)
        print(json.dumps(entry))
        print(f"  {os.path.getsize(path) / 1e6:.1f} MB, onnxruntime: {error or 'ok'}", file=sys.stderr)
    for failure in result["failed"]:
        print(f"FAILED {failure['name']}: {failure['error']}", file=sys.stderr)
    for item in result["unavailable"]:
        print(f"UNAVAILABLE {item['family']}: {item['reason']}", file=sys.stderr)
    print(
        f"{len(result['models'])} models, {len(result['failed'])} failed, {problems} onnxruntime problems, "
        f"build {elapsed:.1f} s",
        file=sys.stderr,
    )
    return 1 if problems or result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
