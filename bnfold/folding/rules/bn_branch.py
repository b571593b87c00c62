"""bn_branch: fold an identity-branch BatchNormalization into a Conv branch of the same input.

Before (RepVGG / MobileOne blocks exported without re-parameterization)::

    X -> Conv(W, b) --------------------+
    X -> BatchNormalization(s, t) ------+--> Add [-> Add ...] -> Y

After::

    X -> Conv(W', b') -----------------------> [Add ...] -> Y

A BN of ``X`` is ``s * X + t`` per channel: a Conv of ``X`` with a centre-tap kernel. When an Add
tree (see ``add_tree``) sums it with a Conv of the same ``X`` whose output is centred on its input,
adding that kernel into the Conv's weight computes the same sum with one branch less. The Conv's
own BN folds first (``conv_bn``); the pass repeats, so this rule then sees the Conv itself summed.

Conditions (for the first Conv of ``X`` among the tree's leaves that meets them all):
  1. The BN output is read only by its Add, once, and is not a graph output
     (``multiple_consumers`` / ``graph_output``); the Conv output is read only by the tree.
  2. The Conv's weight (and bias) are float constants (``non_constant_weight`` /
     ``unsupported_dtype``), the bias a (C,) vector (``not_per_channel``).
  3. In channels == out channels == the BN's channels (``incompatible_branches``).
  4. Stride 1 and every kernel size odd with its centre on the output position: pads
     ``d * (k - 1) / 2`` on both sides, or auto_pad SAME_* (``misaligned_branches``).
  5. The new weights and bias are representable (float16 / bfloat16: ``representation_failure``).

Math (float64, cast once to W's type), for output channel o with ``C/group`` input channels per group::

    W'[o, o mod (C/group), centre] = W[o, o mod (C/group), centre] + s[o]
    b'[o]                          = b[o] + t[o]               (b = 0 when the Conv has none)
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.rules.add_tree import (
    conv_leaves_by_input,
    fold_leaf_into,
    is_sum,
    read_only_by,
    tree_leaves,
    tree_root,
)
from bnfold.folding.rules.base import bias_or_failure, representation_failure, sole_reader_failure, weight_or_failure
from bnfold.folding.rules.conv_branches import conv_geometry
from bnfold.folding.rules.protocol import BatchNorm, Failure, Match, Reason
from bnfold.folding.tensors import to_float64
from bnfold.folding.view import GraphView, get_attr


class BnBranch:
    name = "bn_branch"

    def check(self, view: GraphView, bn: BatchNorm) -> Match | Failure | None:
        adds = [r for r in view.readers(bn.y) if is_sum(view, r)]
        if not adds:
            return None
        add = adds[0]
        leaves = tree_leaves(view, tree_root(view, add))
        convs = conv_leaves_by_input(view, leaves).get(bn.x, [])
        if not convs:
            return None
        if not read_only_by(view, bn.y, add):
            return sole_reader_failure(view, bn.y, add, bn.index)
        failure = None
        for conv in sorted(convs):
            result = self._into(view, bn, conv)
            if isinstance(result, Match):
                return result
            failure = failure or result
        return failure

    def _into(self, view: GraphView, bn: BatchNorm, conv: int) -> Match | Failure:
        node = view.nodes[conv]
        out = node.output[0]
        reader = next(r for r in view.readers(out) if is_sum(view, r))
        if not read_only_by(view, out, reader):
            return sole_reader_failure(view, out, reader, conv)
        weight = weight_or_failure(view, conv, 1, "weight")
        if isinstance(weight, Failure):
            return weight
        value, data_type = weight
        group = int(get_attr(node, "group", 1))
        target = f"BatchNormalization '{bn.label}' (an identity branch) into {view.describe(conv)}"
        if value.ndim < 3 or group < 1 or not (value.shape[0] == value.shape[1] * group == bn.channels):
            return Failure(
                Reason.INCOMPATIBLE_BRANCHES,
                f"cannot fold {target}: weight shape {value.shape} with group {group} does not map the "
                f"{bn.channels} channels onto themselves (in channels must equal out channels)",
            )
        geometry = conv_geometry(view, conv, value.shape)
        if isinstance(geometry, Failure):
            return geometry
        centred = all(k % 2 == 1 for k in geometry.kernel) and not any(geometry.begin + geometry.end)
        if any(s != 1 for s in geometry.strides) or not centred:
            return Failure(
                Reason.MISALIGNED_BRANCHES,
                f"cannot fold {target}: its output is not centred on its input (strides "
                f"{list(geometry.strides)}, kernel {list(geometry.kernel)}, pads must be dilation * (k - 1) / 2 "
                "on both sides)",
            )
        bias = bias_or_failure(view, conv, 2, bn.channels)
        if isinstance(bias, Failure):
            return bias
        bias_name, old_bias = bias
        new_weight = to_float64(value)
        channels = np.arange(bn.channels)
        centre = tuple(k // 2 for k in geometry.kernel)
        new_weight[(channels, channels % value.shape[1]) + centre] += bn.scale
        new_bias = old_bias + bn.shift
        failure = representation_failure(
            view, bn, conv, data_type, new_weight, np.ones(()), new_bias, old_bias if bias_name else None
        )
        if failure is not None:
            return failure

        def rewrite():
            view.set_constant_input(conv, 1, new_weight, data_type, node.input[1] or f"{out}_weight")
            view.set_constant_input(conv, 2, new_bias, data_type, bias_name or f"{out}_bias")
            view.remove_node(bn.index)
            fold_leaf_into(view, bn.y, node.output[0])

        return Match(self.name, conv, rewrite)


RULE = BnBranch()
