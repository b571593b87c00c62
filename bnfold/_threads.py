"""Resolve the user's ``n_threads`` argument into the thread count handed to compiled kernels,
and keep kernels working in processes made by ``fork()``.

Fork: GNU libgomp (GCC's OpenMP runtime) keeps its thread pool in memory across ``fork()``, but
the child has none of the pool's threads, so the child's first parallel region with more than one
thread waits for them forever. That is what Python's default ``multiprocessing`` start method on
Linux does to a worker pool. A parallel region of one thread never touches the pool, and does not
hang (tests/test_kernels_fork.py runs every kernel that way in forked children). So this module
records when the process first hands a count above 1 to a kernel (from then on the pool exists),
and a fork handler switches threads off for good in a child forked after that
(``bnfold._openmp.disable_threads``): its kernels run single-threaded, with the parent's results
bit for bit (the work split never depends on the thread count), and the first call that would
have used threads issues one ``BnfoldWarning`` saying so. A child forked before any threaded
call keeps its threads. Threads started by another library linked against the same OpenMP
runtime are not seen; the LLVM and Intel runtimes, which survive fork, are treated as libgomp.
"""

from __future__ import annotations

import numbers
import os
import sys
import warnings

from bnfold import _openmp
from bnfold._openmp import openmp_built, runtime_max_threads
from bnfold.errors import BnfoldWarning

# True once this process has handed more than one thread to a compiled loop: from then on
# libgomp's thread pool exists, and a forked child must not start a team on it.
_threads_started = False
# Whether this process has said that its kernels run single-threaded (once per process).
_fork_warned = False

_FORK_WARNING = (
    "bnfold: this process was forked after bnfold had started OpenMP threads, and the OpenMP "
    "runtime (GNU libgomp) cannot run threads in a forked child, so bnfold's kernels run "
    "single-threaded in this process (same results, slower); to keep threads in worker "
    "processes use the 'spawn' or 'forkserver' start method of multiprocessing "
    "(multiprocessing.get_context('forkserver')), or fork before the first threaded bnfold call"
)


def _after_fork_in_child() -> None:
    global _fork_warned
    _fork_warned = False  # a new process: it says it once itself
    if _threads_started:
        _openmp.disable_threads()


if hasattr(os, "register_at_fork"):  # absent on Windows, which has no fork()
    os.register_at_fork(after_in_child=_after_fork_in_child)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _stacklevel_outside_bnfold() -> int:
    """The warnings.warn stacklevel of the first caller outside the bnfold package, so the
    warning points at the user's line whichever bnfold function made the call."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _warn_single_threaded_once() -> None:
    global _fork_warned
    if _fork_warned:
        return
    _fork_warned = True  # before warning: under an "error" filter the next call still runs
    warnings.warn(_FORK_WARNING, BnfoldWarning, stacklevel=_stacklevel_outside_bnfold())


def effective_n_threads(n_threads, parallel: bool = True) -> int:
    """None -> all available threads (OMP_NUM_THREADS respected); a positive int is taken as is;
    0, negatives and non-integers are rejected. Either way no more than the CPUs the process may
    run on: the kernels are bound by memory, so extra threads only wait for each other (the
    staged backward was 5-20x slower at 32-64 threads on 2 cores), and a huge count could make
    the OpenMP runtime fail to start its threads. Without OpenMP every call is serial.

    ``parallel=False`` (a call too small to be worth threads) validates ``n_threads`` and returns
    1. A count above 1 is taken as handed to a kernel (threads started, which a forked child
    must know). In a child forked after threads were started (see the module docstring) the
    answer is 1, with a one-time warning where more threads would have been used."""
    if n_threads is None:
        n = runtime_max_threads()
    elif isinstance(n_threads, bool) or not isinstance(n_threads, numbers.Integral):
        raise TypeError(f"n_threads must be None or a positive int, got {n_threads!r}")
    elif n_threads < 1:
        raise ValueError(f"n_threads must be None or >= 1, got {n_threads}")
    else:
        n = int(n_threads)
    if not openmp_built() or not parallel:
        return 1
    n = min(n, available_cpus())
    if n <= 1:
        return 1
    if _openmp.threads_disabled():
        _warn_single_threaded_once()
        return 1
    global _threads_started
    _threads_started = True
    return n
