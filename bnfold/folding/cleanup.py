"""Graph cleanup after the folds: delete the initializers and constant-only nodes the folds made
unused, and the ``value_info`` of values nothing produces any more.
"""

from __future__ import annotations

import onnx

from bnfold.folding.view import defined_names, iter_graphs, node_subgraphs


def remove_unused(model: onnx.ModelProto, candidates: set[str], vanished: set[str] = frozenset()) -> None:
    """Delete initializers and constant-only nodes among ``candidates`` that nothing reads any more.

    Only names the pass released are candidates, so tensors the model already carried unused stay.
    Reads are collected over the whole model (bodies included), which can only keep more.
    ``value_info`` entries of ``vanished`` values that nothing produces any more are dropped too.
    """
    candidates = set(candidates)
    ir_version = model.ir_version
    changed = True
    while changed:
        changed = False
        read = set()
        for g in iter_graphs(model.graph):
            for node in g.node:
                read.update(node.input)
            read.update(o.name for o in g.output)
        for g in iter_graphs(model.graph):
            for k in range(len(g.node) - 1, -1, -1):
                node = g.node[k]
                outs = [o for o in node.output if o]
                if (
                    outs
                    and all(o in candidates and o not in read for o in outs)
                    and not any(True for _ in node_subgraphs(node))
                ):
                    candidates.update(i for i in node.input if i)
                    del g.node[k]
                    changed = True
            for k in range(len(g.initializer) - 1, -1, -1):
                name = g.initializer[k].name
                if name in candidates and name not in read:
                    del g.initializer[k]
                    if ir_version < 4:
                        for j in range(len(g.input) - 1, -1, -1):
                            if g.input[j].name == name:
                                del g.input[j]
                    changed = True
    for g in iter_graphs(model.graph):
        produced = defined_names(g)
        for k in range(len(g.value_info) - 1, -1, -1):
            name = g.value_info[k].name
            if (name in vanished or name in candidates) and name not in produced:
                del g.value_info[k]
