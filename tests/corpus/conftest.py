"""Fixtures for the real-world model corpus (tools/build_corpus.py).

The corpus is built once per machine into a cache (``$BNFOLD_CORPUS_DIR`` or
``~/.cache/bnfold/corpus/<fingerprint>/``) and reused; the first session on a machine builds it
(3 to 9 minutes on two shared cores), later sessions find it at once.  Tests here are skipped when
the ``corpus`` extra (torch, torchvision, timm, ultralytics, onnxscript, onnxconverter-common) is
not installed, or when ``BNFOLD_SKIP_CORPUS=1`` -- unless ``BNFOLD_REQUIRE_CORPUS=1`` (set by
``.ci/run``), which turns either into a failure, so CI can never pass by skipping the corpus.

Fixtures:
  ``corpus_builder``  the tools/build_corpus.py module (loaded by path)
  ``corpus_dir``      the built corpus directory
  ``corpus_manifest`` its manifest.json as a dict
  ``corpus_entry``    a test that asks for it runs once per model of the manifest (id = its name);
                      ``corpus_entry["path"]`` is relative to ``corpus_dir``.  Parametrizing needs
                      the manifest, so collecting such a test ensures the corpus (also when ``-k``
                      deselects it afterwards).
  ``corpus_entry_per_arch``  the same, once per architecture: its export with the most BN nodes
                      (for the slowest checks, whose result depends on the network, not the exporter).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILDER_PATH = os.path.join(ROOT, "tools", "build_corpus.py")
REQUIRED_MODULES = ("torch", "torchvision", "timm", "ultralytics", "onnxscript", "onnxconverter_common")

_builder = None
_corpus_dir = None


def load_builder():
    global _builder
    if _builder is None:
        spec = importlib.util.spec_from_file_location("bnfold_build_corpus", BUILDER_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        _builder = module
    return _builder


def skip_reason():
    """Why the corpus cannot be built here, or None."""
    if os.environ.get("BNFOLD_SKIP_CORPUS") == "1":
        return "BNFOLD_SKIP_CORPUS=1"
    # find_spec only looks for the package: importing torch here would slow every session.
    missing = [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        return f"corpus extra not installed (missing {', '.join(missing)}): pip install -e .[corpus]"
    return None


def _progress(message):
    # The build can take minutes: show its progress even while pytest captures output.
    print(f"corpus: {message}", file=sys.__stderr__, flush=True)


def corpus_required() -> bool:
    return os.environ.get("BNFOLD_REQUIRE_CORPUS") == "1"


def ensure_corpus_dir():
    """Build (or find) the corpus once per session; skip when it cannot be built here (fail
    instead when the corpus is required)."""
    global _corpus_dir
    reason = skip_reason()
    if reason:
        if corpus_required():
            pytest.fail(f"BNFOLD_REQUIRE_CORPUS=1 but the corpus cannot run: {reason}", pytrace=False)
        pytest.skip(reason)
    if _corpus_dir is None:
        _corpus_dir = load_builder().ensure_corpus(jobs=2, log=_progress)
    return _corpus_dir


@pytest.fixture(scope="session")
def corpus_builder():
    return load_builder()


@pytest.fixture(scope="session")
def corpus_dir():
    return ensure_corpus_dir()


@pytest.fixture(scope="session")
def corpus_manifest(corpus_dir, corpus_builder):
    return corpus_builder.load_manifest(corpus_dir)


def one_per_architecture(entries):
    """Of each architecture's exports, the one with the most BN nodes (the first of those)."""
    chosen = {}
    for entry in entries:
        best = chosen.get(entry["arch"])
        if best is None or entry.get("bn_nodes", 0) > best.get("bn_nodes", 0):
            chosen[entry["arch"]] = entry
    return [entry for entry in entries if chosen[entry["arch"]] is entry]


def pytest_generate_tests(metafunc):
    names = [n for n in ("corpus_entry", "corpus_entry_per_arch") if n in metafunc.fixturenames]
    if not names:
        return
    name = names[0]
    reason = skip_reason()
    if reason:
        if corpus_required():
            raise pytest.UsageError(f"BNFOLD_REQUIRE_CORPUS=1 but the corpus cannot run: {reason}")
        metafunc.parametrize(name, [pytest.param(None, marks=pytest.mark.skip(reason=reason))], ids=["corpus"])
        return
    # Parametrizing needs the manifest at collection time, so the corpus is ensured here.
    manifest = load_builder().load_manifest(ensure_corpus_dir())
    entries = manifest["models"] if name == "corpus_entry" else one_per_architecture(manifest["models"])
    metafunc.parametrize(name, entries, ids=[entry["name"] for entry in entries])
