"""The fold pass: a graph view over the model, BN screening, fold rules (one per file), the pass
that applies them, its report, and the cleanup after it."""

# What other stages use (they import from the package, never from its modules).
from bnfold.folding.cleanup import remove_unused
from bnfold.folding.fold_pass import fold, fold_file, inspect
from bnfold.folding.report import BATCH_NORM_KIND, CHAIN_KIND, FoldReport
from bnfold.folding.screening import screen_batch_norm
from bnfold.folding.tensors import FLOAT_TYPES, numpy_type, read_tensor
from bnfold.folding.view import (
    GraphView,
    ModelContext,
    get_attr,
    is_batch_norm,
    iter_graphs,
    node_label,
    node_subgraphs,
    outer_scope_reads,
    value_info_type,
)

__all__ = [
    "BATCH_NORM_KIND",
    "CHAIN_KIND",
    "FLOAT_TYPES",
    "FoldReport",
    "GraphView",
    "ModelContext",
    "fold",
    "fold_file",
    "get_attr",
    "inspect",
    "is_batch_norm",
    "iter_graphs",
    "node_label",
    "node_subgraphs",
    "numpy_type",
    "outer_scope_reads",
    "read_tensor",
    "remove_unused",
    "screen_batch_norm",
    "value_info_type",
]
