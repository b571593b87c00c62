"""bn_duplicate: a BatchNormalization that repeats an earlier one on the same input is removed.

Before::

    X -> BatchNormalization(p) -> Y1 -> ...
    X -> BatchNormalization(p) -> Y2 -> readers

After::

    X -> BatchNormalization(p) -> Y1 -> ...  and the readers of Y2 read Y1

Where it comes from: an untrained (freshly initialized) network exported by torch's TorchScript
exporter, whose BNs all hold the same statistics, so the exporter stores one copy of each equal
tensor and two BNs on one input (FastViT's RepMixer computes ``mixer(x) - norm(x)``, two BNs of
``x``) become one expression written twice. onnxruntime, onnxslim and onnxsim remove the copy by
common-subexpression elimination; the rule does the same, and a BN so freed of a second reader of
its input may then fold into the layer before it.

Conditions:
  1. Both are inference BNs of the same graph reading the same input, with the same attributes
     (epsilon, momentum, ...), and parameters that are the same tensors or constants of equal
     type, shape and bits: the two compute the same values in any runtime.
  2. The earlier one (lower node index) stays; the later one's output is not a graph output and
     is read only by nodes of this graph as their own inputs (not from inside a body), so that
     each reader can be pointed at the first BN's output.

Math: none, the two outputs are equal element for element.
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.rules.protocol import BatchNorm, Match
from bnfold.folding.view import GraphView, is_batch_norm


class BnDuplicate:
    name = "bn_duplicate"

    def check(self, view: GraphView, bn: BatchNorm) -> Match | None:
        node = view.nodes[bn.index]
        if view.is_graph_output(bn.y) or view.implicit_consumers.get(bn.y):
            return None
        for other in view.consumers.get(bn.x, []):
            if other >= bn.index or other in view.removed or not _same_computation(view, view.nodes[other], node):
                continue
            return Match(self.name, other, lambda first=other: _rewrite(view, bn, first))
        return None


RULE = BnDuplicate()


def _same_computation(view: GraphView, a, b) -> bool:
    if (
        not is_batch_norm(a)
        or a.domain != b.domain
        or len(a.input) != len(b.input)
        or len(a.output) != 1
        or len(b.output) != 1
    ):
        return False
    if sorted(x.SerializeToString() for x in a.attribute) != sorted(x.SerializeToString() for x in b.attribute):
        return False
    for name_a, name_b in zip(a.input[1:], b.input[1:]):
        if name_a == name_b:
            continue
        value_a, value_b = view.constant(name_a), view.constant(name_b)
        if value_a is None or value_b is None or view.constant_type(name_a) != view.constant_type(name_b):
            return False
        value_a, value_b = np.asarray(value_a), np.asarray(value_b)
        if value_a.shape != value_b.shape or value_a.tobytes() != value_b.tobytes():
            return False
    return True


def _rewrite(view: GraphView, bn: BatchNorm, first: int) -> None:
    kept = view.nodes[first].output[0]
    for reader in list(view.consumers.get(bn.y, [])):
        node = view.nodes[reader]
        for position, name in enumerate(node.input):
            if name == bn.y:
                view.redirect_input(reader, position, kept)
    view.remove_node(bn.index)
