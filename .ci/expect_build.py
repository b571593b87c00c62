"""pytest plugin for CI legs that test one particular build of bnfold (``-p expect_build`` with
``.ci/`` on PYTHONPATH): before any test runs it checks that the bnfold being tested is the build
the leg meant, so a leg cannot pass by testing another build.

Environment variables (each optional; unset means "not checked"):
  CI_EXPECT_BNFOLD_UNDER   bnfold must be imported from below this directory
  CI_EXPECT_OPENMP         "0" or "1": what ``bnfold.openmp_enabled()`` must say
  CI_EXPECT_KERNELS        the module ``bnfold.kernels.KERNEL_MODULE`` must name (e.g. bnfold._bn_kernels)

It also checks once more at the end of the session, so a run whose tests changed the kernel
choice for good is caught too.
"""

import os
import sys

import pytest


def _mismatches():
    import bnfold
    import bnfold.kernels

    problems = []
    under = os.environ.get("CI_EXPECT_BNFOLD_UNDER")
    if under:
        location = os.path.realpath(bnfold.__file__)
        if not location.startswith(os.path.realpath(under) + os.sep):
            problems.append(f"bnfold imported from {location}, expected below {under}")
    openmp = os.environ.get("CI_EXPECT_OPENMP")
    if openmp and bnfold.openmp_enabled() != (openmp == "1"):
        problems.append(f"bnfold.openmp_enabled() is {bnfold.openmp_enabled()}, expected {openmp == '1'}")
    kernels = os.environ.get("CI_EXPECT_KERNELS")
    if kernels and kernels != bnfold.kernels.KERNEL_MODULE:
        problems.append(f"bnfold.kernels.KERNEL_MODULE is {bnfold.kernels.KERNEL_MODULE}, expected {kernels}")
    return problems


def _describe():
    import bnfold
    import bnfold.kernels

    return (
        f"bnfold from {os.path.dirname(bnfold.__file__)}, openmp_enabled={bnfold.openmp_enabled()}, "
        f"kernels={bnfold.kernels.KERNEL_MODULE}"
    )


def pytest_configure(config):
    problems = _mismatches()
    if problems:
        raise pytest.UsageError("CI build check failed: " + "; ".join(problems))
    # Shown also under -q, which hides the report header.
    print("CI build check passed: " + _describe(), file=sys.stderr)


def pytest_report_header(config):
    return "CI build check: " + _describe()


def pytest_sessionfinish(session, exitstatus):
    problems = _mismatches()
    if problems:
        print("\nCI build check failed at the end of the session: " + "; ".join(problems))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
