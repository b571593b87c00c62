"""The fold pass: a graph view over the model, fold rules (one per file), the pass that applies
them, and its report."""

# What other stages use (they import from the package, never from its modules).
from bnfold.folding.fold_pass import (
    FoldReport,
    fold,
    fold_file,
    inspect,
)
from bnfold.folding.cleanup import remove_unused
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
)
from bnfold.folding.rules.base import inference_mode_failure

__all__ = [
    "FLOAT_TYPES",
    "FoldReport",
    "GraphView",
    "ModelContext",
    "fold",
    "fold_file",
    "get_attr",
    "inference_mode_failure",
    "inspect",
    "is_batch_norm",
    "iter_graphs",
    "node_label",
    "node_subgraphs",
    "numpy_type",
    "outer_scope_reads",
    "read_tensor",
    "remove_unused",
]
