"""Built-in models (``zoo``) and the ``bnfold demo`` pipeline that folds, checks and benchmarks one."""
