"""conv_branches: merge the Convs of one input that an Add tree sums into one Conv (re-parameterization).

Before::

    X -> Conv(W1, b1, k1) --+
    X -> Conv(W2, b2, k2) --+--> Add [-> Add ...] -> Y      (RepVGG: 3x3 + 1x1; MobileOne: several kxk + 1x1)
    [other summands] -------+

After::

    X -> Conv(W, b, max(k1, k2)) --> Add [other summands] -> Y    (one Conv, no Add when nothing else is summed)

This is not a BN fold (the branches' own BNs fold first, ``conv_bn``; the identity BN folds into a
branch, ``bn_branch``): the fold pass offers every root Add of an Add tree (see ``add_tree``) to
``RULE.check(view, add)`` once no BN fold applies any more, and reports each merge in
``FoldReport.merged`` and each Add it cannot merge in ``FoldReport.unmerged``.

Conditions (all Convs of one input among the tree's leaves, at least two of them):
  1. Each Conv output is read only by its Add, once, and is not a graph output
     (``multiple_consumers`` / ``graph_output``).
  2. Weights (and biases) are constants of one float type (``non_constant_weight`` /
     ``unsupported_dtype``); biases are (Cout,) vectors (``not_per_channel``).
  3. Same strides, group, kernel rank and weight shape up to the kernel, and per axis the same
     dilation among the kernels wider than 1 there (``incompatible_branches``).
  4. Centres aligned: per axis and per side, ``begin = k//2 * d - pad_begin`` and
     ``end = (k - 1 - k//2) * d - pad_end`` agree between the branches (explicit pads, VALID, or
     SAME_UPPER/SAME_LOWER with stride 1, whose pads are then fixed), and the merged pads are not
     negative (``misaligned_branches``). Then every branch reads the input positions the merged
     kernel reads at the same offsets, so the outputs have the same shape and add up exactly.
  5. The merged float16 / bfloat16 weights and biases stay finite (``would_overflow``).

Math (float64, cast once to the weights' type), per axis ``K = max k``::

    W[:, :, m1 : m1 + k1, ...] += W1   with m = K//2 - k//2 (the centre offset)
    b = b1 + b2 + ...                  pads: K//2 * d - begin and (K - 1 - K//2) * d - end
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from bnfold.folding.rules.add_tree import conv_leaves_by_input, fold_leaf_into, is_sum, read_only_by, tree_leaves
from bnfold.folding.rules.base import bias_or_failure, sole_reader_failure, weight_or_failure
from bnfold.folding.rules.protocol import Failure, Reason
from bnfold.folding.tensors import FLOAT_TYPES, numpy_type, to_float64
from bnfold.folding.view import GraphView, get_attr, set_attr


@dataclass
class ConvGeometry:
    """Where a Conv's kernel sits on its input, per spatial axis: kernel size, stride, dilation,
    and the centre offsets ``begin = k//2 * d - pad_begin``, ``end = (k - 1 - k//2) * d - pad_end``."""

    kernel: tuple
    strides: tuple
    dilations: tuple
    begin: tuple
    end: tuple


def conv_geometry(view: GraphView, conv: int, weight_shape: tuple) -> ConvGeometry | Failure:
    """The Conv's geometry, or a ``misaligned_branches`` Failure when its pads depend on the input size."""
    node = view.nodes[conv]
    kernel = tuple(int(k) for k in weight_shape[2:])
    rank = len(kernel)
    strides = tuple(int(s) for s in get_attr(node, "strides", [1] * rank))
    dilations = tuple(int(d) for d in get_attr(node, "dilations", [1] * rank))
    auto_pad = get_attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if any(s != 1 for s in strides):
            return Failure(
                Reason.MISALIGNED_BRANCHES,
                f"{view.describe(conv)} pads with auto_pad={auto_pad} and strides {list(strides)}: "
                "its padding depends on the input size",
            )
        total = [d * (k - 1) for k, d in zip(kernel, dilations)]
        small = [t // 2 for t in total]
        large = [t - t // 2 for t in total]
        pads_begin, pads_end = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    elif auto_pad == "VALID":
        pads_begin, pads_end = [0] * rank, [0] * rank
    else:
        pads = [int(p) for p in get_attr(node, "pads", [0] * (2 * rank))]
        pads_begin, pads_end = pads[:rank], pads[rank:]
    begin = tuple(k // 2 * d - p for k, d, p in zip(kernel, dilations, pads_begin))
    end = tuple((k - 1 - k // 2) * d - p for k, d, p in zip(kernel, dilations, pads_end))
    return ConvGeometry(kernel, strides, dilations, begin, end)


@dataclass
class Merge:
    """Convs of one input summed by one Add tree that merge into ``target`` (the first of them)."""

    rule: str
    target: int
    convs: list[int]  # every merged Conv, target first
    rewrite: Callable[[], None]


@dataclass
class _Branch:
    conv: int
    weight: np.ndarray  # float64
    data_type: int
    bias_name: str
    bias: np.ndarray  # float64, zeros when the Conv has none
    geometry: ConvGeometry


class ConvBranches:
    name = "conv_branches"

    def check(self, view: GraphView, add: int) -> Merge | Failure | None:
        """Merge for the Convs of one input summed by the tree rooted at ``add``; None when no
        two Convs of one input are summed there."""
        leaves = tree_leaves(view, add)
        groups = [convs for convs in conv_leaves_by_input(view, leaves).values() if len(convs) >= 2]
        if not groups:
            return None
        failure = None
        for convs in groups:
            result = self._merge(view, sorted(convs))
            if isinstance(result, Merge):
                return result
            failure = failure or result
        return failure

    def _merge(self, view: GraphView, convs: list[int]) -> Merge | Failure:
        names = ", ".join(view.describe(c) for c in convs)
        branches = []
        for conv in convs:
            branch = _read_branch(view, conv)
            if isinstance(branch, Failure):
                return branch
            branches.append(branch)
        first = branches[0]
        for branch in branches[1:]:
            same = (
                branch.data_type == first.data_type
                and branch.weight.shape[:2] == first.weight.shape[:2]
                and branch.weight.ndim == first.weight.ndim
                and branch.geometry.strides == first.geometry.strides
                and _group(view, branch.conv) == _group(view, first.conv)
            )
            if not same:
                return Failure(
                    Reason.INCOMPATIBLE_BRANCHES,
                    f"the summed {names} differ in weight type, weight shape (output or input channels, kernel "
                    "rank), strides or group; they cannot be one Conv",
                )
        dilations = _common_dilations(branches)
        if dilations is None:
            return Failure(
                Reason.INCOMPATIBLE_BRANCHES,
                f"the summed {names} have different dilations on an axis where their kernels are wider than 1",
            )
        for branch in branches[1:]:
            if branch.geometry.begin != first.geometry.begin or branch.geometry.end != first.geometry.end:
                return Failure(
                    Reason.MISALIGNED_BRANCHES,
                    f"the kernel centres of the summed {names} are not aligned (k//2 * dilation - pad differs: "
                    f"{list(first.geometry.begin)}/{list(first.geometry.end)} vs "
                    f"{list(branch.geometry.begin)}/{list(branch.geometry.end)}); they read different input positions",
                )
        kernel = tuple(max(b.weight.shape[2 + a] for b in branches) for a in range(first.weight.ndim - 2))
        pads_begin = [k // 2 * d - c for k, d, c in zip(kernel, dilations, first.geometry.begin)]
        pads_end = [(k - 1 - k // 2) * d - c for k, d, c in zip(kernel, dilations, first.geometry.end)]
        if min(pads_begin + pads_end) < 0:
            return Failure(
                Reason.MISALIGNED_BRANCHES,
                f"merging {names} into one {list(kernel)} kernel would need negative pads "
                f"{pads_begin + pads_end} (the branches crop their input)",
            )
        weight = np.zeros(first.weight.shape[:2] + kernel)
        for branch in branches:
            window = tuple(slice(k // 2 - s // 2, k // 2 - s // 2 + s) for k, s in zip(kernel, branch.weight.shape[2:]))
            weight[(slice(None), slice(None)) + window] += branch.weight
        bias = np.sum([b.bias for b in branches], axis=0)
        has_bias = any(b.bias_name for b in branches)
        failure = _overflow_failure(view, names, first.data_type, branches, weight, bias)
        if failure is not None:
            return failure

        def rewrite():
            target = view.nodes[first.conv]
            out = target.output[0]
            view.set_constant_input(first.conv, 1, weight, first.data_type, target.input[1] or f"{out}_weight")
            if has_bias:
                view.set_constant_input(first.conv, 2, bias, first.data_type, first.bias_name or f"{out}_bias")
            set_attr(target, "auto_pad", None)
            set_attr(target, "pads", pads_begin + pads_end)
            set_attr(target, "kernel_shape", list(kernel))
            set_attr(target, "dilations", list(dilations))
            for branch in branches[1:]:
                value = view.nodes[branch.conv].output[0]
                view.remove_node(branch.conv)
                fold_leaf_into(view, value, target.output[0])

        return Merge(self.name, first.conv, convs, rewrite)


RULE = ConvBranches()


def _common_dilations(branches: list[_Branch]):
    """Per axis, the one dilation of the branches whose kernel is wider than 1 there (a 1-wide
    kernel reads one position whatever its dilation: RepVGG's 1x1 beside a dilated 3x3); None
    when they differ."""
    dilations = []
    for axis in range(branches[0].weight.ndim - 2):
        wide = {b.geometry.dilations[axis] for b in branches if b.weight.shape[2 + axis] > 1}
        if len(wide) > 1:
            return None
        dilations.append(wide.pop() if wide else branches[0].geometry.dilations[axis])
    return tuple(dilations)


def _group(view: GraphView, conv: int) -> int:
    return int(get_attr(view.nodes[conv], "group", 1))


def _read_branch(view: GraphView, conv: int) -> _Branch | Failure:
    node = view.nodes[conv]
    out = node.output[0]
    add = next(r for r in view.readers(out) if is_sum(view, r))  # it is a leaf: a tree Add reads it
    if not read_only_by(view, out, add):
        return sole_reader_failure(view, out, add, conv)
    weight = weight_or_failure(view, conv, 1, "weight")
    if isinstance(weight, Failure):
        return weight
    value, data_type = weight
    if value.ndim < 3 or _group(view, conv) < 1:
        return Failure(
            Reason.NOT_PER_CHANNEL,
            f"{view.describe(conv)} has weight shape {value.shape} and group {_group(view, conv)}",
        )
    bias = bias_or_failure(view, conv, 2, value.shape[0])
    if isinstance(bias, Failure):
        return bias
    bias_name, bias_value = bias
    if bias_name and view.constant_type(bias_name) != data_type:
        return Failure(Reason.INCOMPATIBLE_BRANCHES, f"{view.describe(conv)} bias type differs from its weight type")
    geometry = conv_geometry(view, conv, value.shape)
    if isinstance(geometry, Failure):
        return geometry
    return _Branch(conv, to_float64(value), data_type, bias_name, bias_value, geometry)


def _overflow_failure(view, names, data_type, branches, weight, bias) -> Failure | None:
    """``would_overflow`` when a merged value leaves the type's range where every summand was finite."""
    largest = float(np.finfo(numpy_type(data_type)).max) if data_type in FLOAT_TYPES else np.inf
    finite_weights = all(np.all(np.isfinite(b.weight)) for b in branches)
    finite_biases = all(np.all(np.isfinite(b.bias)) for b in branches)
    with np.errstate(invalid="ignore"):
        bad_weight = finite_weights and not np.all(np.abs(weight) <= largest)
        bad_bias = finite_biases and not np.all(np.abs(bias) <= largest)
    if bad_weight or bad_bias:
        return Failure(
            Reason.WOULD_OVERFLOW,
            f"merging {names} would give {'weights' if bad_weight else 'a bias'} beyond the largest "
            f"{FLOAT_TYPES[data_type]} ({largest:.5g}); left as they are",
        )
    return None
