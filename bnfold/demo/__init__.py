"""Built-in models (``zoo``) and the ``bnfold demo`` pipeline that folds, checks and benchmarks one."""

# What other stages use (they import from the package, never from its modules).
from bnfold.demo.run import run_demo

__all__ = [
    "run_demo",
]
