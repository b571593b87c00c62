"""Kernels in processes made by fork(): they finish, and compute the parent's results bit for bit.

GNU libgomp keeps its thread pool across fork() without the pool's threads, so a forked child's
first multi-threaded parallel region used to hang forever (issue 11); bnfold._threads now runs
such a child's kernels on one thread and warns once. A hang must fail a test, not stall pytest,
so every fork happens in a subprocess (a small script written here) run with a timeout; the
script saves what the parent and its children computed into .npz files, and the test compares
them.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import bnfold
from bnfold import _openmp, _threads

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

TIMEOUT = 60  # seconds; a healthy run takes ~2 s, most of it importing bnfold

# Shared by every script: the kernels on one input per loop family (rows, slabs, cols, 2-D), each
# large enough for threads (>= 32768 values), so a parent that runs them starts libgomp's pool.
COMMON = textwrap.dedent(
    """
    import json, os, sys, warnings
    import numpy as np
    import bnfold
    from bnfold import _openmp, _threads

    OUT = sys.argv[2]
    rng = np.random.default_rng(11)
    CASES = {
        "rows": (rng.standard_normal((64, 8, 16, 16)).astype(np.float32) * 3 + 1, 1),
        "slabs": (rng.standard_normal((64, 16, 7, 7)).astype(np.float32), 1),
        "cols": (rng.standard_normal((32, 8, 8, 16)).astype(np.float32) + 5, -1),
        "flat64": (rng.standard_normal((4096, 16)), 1),
    }

    def run_all(n_threads=None):
        res = {}
        for name, (x, axis) in CASES.items():
            C = x.shape[axis]
            w, b = np.linspace(0.5, 2, C), np.linspace(-1, 1, C)
            mean, var = bnfold.batch_stats(x, axis=axis, n_threads=n_threads)
            m = bnfold.Moments.from_array(x, axis=axis, n_threads=n_threads)
            rm, rv = np.zeros(C, x.dtype), np.ones(C, x.dtype)
            y, sm, si = bnfold.batch_norm_train(x, w, b, rm, rv, momentum=0.1, axis=axis,
                                                n_threads=n_threads)
            yi = bnfold.batch_norm_infer(x, w, b, rm, rv, axis=axis, n_threads=n_threads)
            dy = np.cos(x).astype(x.dtype)
            dx, dw, db = bnfold.batch_norm_backward(dy, x, w, sm, si, axis=axis,
                                                    n_threads=n_threads)
            rm2, rv2 = np.zeros(C, x.dtype), np.ones(C, x.dtype)
            yr, *_, r, d = bnfold.batch_renorm_train(x, w, b, rm2, rv2, axis=axis,
                                                     n_threads=n_threads)
            for key, value in dict(mean=mean, var=var, m_mean=m.mean, m_m2=m.m2, y=y, sm=sm,
                                   si=si, rm=rm, rv=rv, yi=yi, dx=dx, dw=dw, db=db, yr=yr, r=r,
                                   d=d, rm2=rm2, rv2=rv2).items():
                res[f"{name}.{key}"] = np.array(value)  # a copy: outputs may be cached buffers
        return res

    def facts(ask_threads=True):
        meta = {
            "pid": os.getpid(),
            "openmp_enabled": bnfold.openmp_enabled(),
            "max_threads": _openmp.max_threads(),
            "threads_disabled": _openmp.threads_disabled(),
            "threads_started": _threads._threads_started,
            "os_threads": len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None,
        }
        if ask_threads:  # a count > 1 handed out counts as threads started
            meta["effective_n_threads"] = _threads.effective_n_threads(None)
        return meta

    def run_recorded(tag, calls):
        # every BnfoldWarning is recorded ("always"), so a second one would show
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = [run_all(n) for n in calls]
        mine = [w for w in caught if issubclass(w.category, bnfold.BnfoldWarning)]
        meta = facts()
        meta["warnings"] = [str(w.message) for w in mine]
        meta["warning_files"] = [os.path.basename(w.filename) for w in mine]
        for i, res in enumerate(results):
            np.savez(os.path.join(OUT, f"{tag}.{i}.npz"), **res)
        with open(os.path.join(OUT, f"{tag}.json"), "w") as f:
            json.dump(meta, f)

    def fork_and_wait(child):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                child()
                code = 0
            finally:
                os._exit(code)  # never run the parent's remaining script in the child
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
    """
)

SCRIPTS = {
    # parent runs every kernel with threads, then forks; the child forks a grandchild in turn
    "after": """
        def grandchild():
            run_recorded("grandchild", [None])

        def child():
            run_recorded("child", [None, 2, None])  # n_threads=None, an explicit 2, None again
            fork_and_wait(grandchild)

        run_recorded("parent", [None])
        fork_and_wait(child)
    """,
    # nothing threaded before the fork: the child keeps its threads
    "before": """
        def child():
            run_recorded("child", [None])

        meta = facts(ask_threads=False)
        fork_and_wait(child)
        run_recorded("parent", [None])
        with open(os.path.join(OUT, "before_fork.json"), "w") as f:
            json.dump(meta, f)
    """,
    # a DataLoader-style pool with Python's default start method on Linux
    "pool": """
        import multiprocessing

        def task(i):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = run_all(None)
            n = sum(issubclass(w.category, bnfold.BnfoldWarning) for w in caught)
            return i, os.getpid(), n, bnfold.openmp_enabled(), res

        run_recorded("parent", [None])
        with multiprocessing.get_context("fork").Pool(2) as pool:
            out = pool.map(task, range(6), chunksize=1)
        summary = []
        for i, pid, n, enabled, res in out:
            np.savez(os.path.join(OUT, f"task{i}.0.npz"), **res)
            summary.append({"pid": pid, "warnings": n, "openmp_enabled": enabled})
        with open(os.path.join(OUT, "pool.json"), "w") as f:
            json.dump(summary, f)
    """,
}


def _run(mode, out_dir):
    script = out_dir / f"fork_{mode}.py"
    script.write_text(COMMON + textwrap.dedent(SCRIPTS[mode]))
    # its own session, so that a hang can be ended with every process it forked (a hung child
    # outlives a killed parent)
    proc = subprocess.Popen(
        [sys.executable, str(script), mode, str(out_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"fork script {mode!r} hung for {TIMEOUT} s (stderr: {stderr[-2000:]!r})")
    assert proc.returncode == 0, stderr


def _load(out_dir, tag, i=0):
    with np.load(out_dir / f"{tag}.{i}.npz") as f:
        return {k: f[k] for k in f.files}


def _meta(out_dir, tag):
    return json.loads((out_dir / f"{tag}.json").read_text())


def _assert_bit_identical(expected, got, what):
    assert expected.keys() == got.keys()
    for key in expected:
        a, b = expected[key], got[key]
        assert a.dtype == b.dtype and a.shape == b.shape, (what, key)
        # bit for bit: compare the bytes, so that even the sign of a zero must match
        assert a.tobytes() == b.tobytes(), f"{what}: {key} differs from the parent's"


# The parent starts threads only where it may use more than one CPU and OpenMP is built in.
THREADED = _openmp.openmp_built() and _threads.available_cpus() > 1


@pytest.fixture(scope="module")
def after_fork(tmp_path_factory):
    out = tmp_path_factory.mktemp("fork_after")
    _run("after", out)
    return out


def test_parent_really_started_threads_before_forking(after_fork):
    out = after_fork
    parent = _meta(out, "parent")
    assert parent["threads_started"] is THREADED
    assert parent["openmp_enabled"] is _openmp.openmp_built()
    if THREADED and parent["os_threads"] is not None:
        # libgomp's pool threads outlive the parallel region: the child inherits a live pool
        # (without its threads), the case that used to hang
        assert parent["os_threads"] > 1


def test_every_kernel_in_a_child_forked_after_threaded_calls_gives_the_parents_bits(after_fork):
    out = after_fork
    parent = _load(out, "parent")
    assert len(parent) == 4 * 18
    for i in range(3):  # n_threads None, 2, None
        _assert_bit_identical(parent, _load(out, "child", i), f"child run {i}")
    _assert_bit_identical(parent, _load(out, "grandchild"), "grandchild")


def test_forked_child_warns_once_and_reports_one_thread(after_fork):
    out = after_fork
    for tag in ("child", "grandchild"):  # each forked process says it once itself
        meta = _meta(out, tag)
        if not THREADED:
            assert meta["warnings"] == [] and meta["threads_disabled"] is False
            continue
        assert len(meta["warnings"]) == 1, meta["warnings"]
        message = meta["warnings"][0]
        assert "single-threaded" in message and "forked" in message
        assert "'spawn'" in message and "'forkserver'" in message
        # the warning points at the user's line, not into bnfold
        assert meta["warning_files"] == ["fork_after.py"]
        assert meta["threads_disabled"] is True
        assert meta["openmp_enabled"] is False
        assert meta["max_threads"] == 1 and meta["effective_n_threads"] == 1


def test_child_forked_before_any_threaded_call_keeps_its_threads(tmp_path):
    _run("before", tmp_path)
    assert _meta(tmp_path, "before_fork")["threads_started"] is False
    child = _meta(tmp_path, "child")
    assert child["warnings"] == []
    assert child["threads_disabled"] is False
    assert child["openmp_enabled"] is _openmp.openmp_built()
    assert child["threads_started"] is THREADED
    _assert_bit_identical(_load(tmp_path, "parent"), _load(tmp_path, "child"), "child")


def test_fork_pool_workers_compute_the_parents_results(tmp_path):
    _run("pool", tmp_path)
    parent = _load(tmp_path, "parent")
    summary = json.loads((tmp_path / "pool.json").read_text())
    assert len(summary) == 6
    for i in range(6):
        _assert_bit_identical(parent, _load(tmp_path, f"task{i}"), f"pool task {i}")
    per_worker = {}
    for s in summary:
        per_worker[s["pid"]] = per_worker.get(s["pid"], 0) + s["warnings"]
        assert s["openmp_enabled"] is (not THREADED and _openmp.openmp_built())
    assert set(per_worker.values()) == ({1} if THREADED else {0})


def test_effective_n_threads_after_threads_are_switched_off(monkeypatch):
    # In-process check of the policy, without forking pytest: what a serial child sees.
    monkeypatch.setattr(_openmp, "threads_disabled", lambda: True)
    monkeypatch.setattr(_threads, "available_cpus", lambda: 4)
    monkeypatch.setattr(_threads, "openmp_built", lambda: True)
    monkeypatch.setattr(_threads, "_fork_warned", False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        counts = [_threads.effective_n_threads(3), _threads.effective_n_threads(None)]
    assert counts == [1, 1]
    assert [w.category for w in record] == [bnfold.BnfoldWarning]
    assert "single-threaded" in str(record[0].message)
    # too small for threads anyway: nothing to say; bad counts are still refused
    monkeypatch.setattr(_threads, "_fork_warned", False)
    assert _threads.effective_n_threads(3, parallel=False) == 1
    assert _threads._fork_warned is False
    with pytest.raises(ValueError, match="n_threads"):
        _threads.effective_n_threads(0)
