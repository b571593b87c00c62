"""Build the Cython kernels in src_cy/ as bnfold._<name> extension modules.

OpenMP is detected by compiling *and running* a tiny program (a compiler that accepts -fopenmp
may still lack the runtime); when the probe fails the build warns and compiles the same kernels
serially, so results are identical and only speed differs.
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d\\n", n);
        return n > 0 ? 0 : 1;
    }
    """
)


def _openmp_flags(compiler_type):
    if compiler_type == "msvc":
        return ["/openmp"], []
    if sys.platform == "darwin":
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def _probe_openmp(compiler):
    """Return True when a program built with OpenMP flags compiles, links and runs."""
    if os.environ.get("BNFOLD_DISABLE_OPENMP"):
        return False
    compile_flags, link_flags = _openmp_flags(compiler.compiler_type)
    tmp = tempfile.mkdtemp(prefix="bnfold_omp_probe_")
    cwd = os.getcwd()
    try:
        os.chdir(tmp)
        with open("probe.c", "w") as f:
            f.write(OPENMP_PROBE)
        objects = compiler.compile(["probe.c"], extra_postargs=compile_flags)
        compiler.link_executable(objects, "probe", extra_postargs=link_flags)
        out = subprocess.run([os.path.join(tmp, "probe")], capture_output=True, text=True, timeout=60)
        return out.returncode == 0 and int(out.stdout.strip() or 0) > 0
    except Exception:  # noqa: BLE001 - any compile/link/run failure means "no usable OpenMP"
        return False
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExtWithOpenMP(build_ext):
    def build_extensions(self):
        has_openmp = _probe_openmp(self.compiler)
        if has_openmp:
            compile_flags, link_flags = _openmp_flags(self.compiler.compiler_type)
        else:
            warnings.warn(
                "bnfold: no working OpenMP compiler/runtime found; building serial kernels "
                "(same results, single-threaded).",
                stacklevel=1,
            )
            compile_flags, link_flags = [], []
        opt = ["/O2"] if self.compiler.compiler_type == "msvc" else ["-O3"]
        for ext in self.extensions:
            ext.extra_compile_args = opt + compile_flags + list(ext.extra_compile_args or [])
            ext.extra_link_args = link_flags + list(ext.extra_link_args or [])
            ext.define_macros = list(ext.define_macros or []) + [("BNFOLD_HAS_OPENMP", "1" if has_openmp else "0")]
        super().build_extensions()


def _extensions():
    from Cython.Build import cythonize

    exts = []
    for pyx in sorted(glob.glob(os.path.join("src_cy", "*.pyx"))):
        name = os.path.splitext(os.path.basename(pyx))[0]
        exts.append(
            Extension(
                f"bnfold.{name}",
                [pyx],
                include_dirs=[numpy.get_include(), "src_cy"],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            )
        )
    return cythonize(
        exts,
        include_path=["src_cy"],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExtWithOpenMP})
