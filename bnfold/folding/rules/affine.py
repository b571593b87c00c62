"""Decomposed BN: a per-channel affine chain with no BatchNormalization node, folded like one.

Keras 3 through tf2onnx writes every BN as ``Mul(x, s) -> Add(., t)``; torchvision's
``FrozenBatchNorm2d`` (detection and segmentation backbones) as ``Mul -> Add``; Paddle writes a
Conv bias as ``Conv -> Add``; caffe2 / caffe "Scale" layers put ``Mul -> Add`` after a BN; timm's
MobileOne adds a scalar 0 to each branch. Such a chain is a BN already reduced to its map
``y = S * x + T``. Its last node stands in for the BN (its ``BatchNorm`` has that node's own
map); the nodes before it are the chain the rules absorb as they do before a real BN.

A chain is Identity nodes and Add / Sub / Mul / Div nodes with one constant float operand;
its *end* is a chain node whose output is not read by exactly one further chain node (Identity
nodes in between do not count). Only
chains whose constants provably act per channel are folded: a chain that does not fold is not
reported (it need not be a BN at all), except where the precision search keeps one.

Rules, each offered a chain end (``check(view, end) -> Match | Failure | None``):

``conv_affine``, ``convtranspose_affine``, ``gemm_affine``, ``matmul_affine``
    layer -> chain: the backward layer rule (``conv_bn`` ...) with the chain end as its BN.
    The layer's weight gives the channel count and the output rank, so per-channel is proven
    without any declared shape. Conditions and math: those of the layer rule.

``bn_affine``
    BN -> chain (a caffe2 Scale layer): merged into the BN, whose output the chain's end value
    becomes. With the chain ``S * z + T`` on the BN's output z::

        scale' = S * scale        B' = S * B + T        (mean, var, epsilon kept)

``affine_bn``
    chain -> BN: merged into the BN, which then reads the chain's input x. With the chain
    ``a * x + b`` and the BN's ``s = scale / sqrt(var + eps)``::

        scale' = a * scale        B' = B + s * (b - mean + a * mean)    (mean, var, epsilon kept)

    A chain constant that varies along the channel axis could broadcast a one-channel x up to
    C channels, and the BN then would normalize a one-channel input; so such a constant is used
    only when x is proven to have the BN's C channels (it comes from a BN, a layer with a constant
    weight, or a shape-keeping elementwise op of one of them, or is a main-graph input declared
    with C channels: onnxruntime refuses inputs of other fixed sizes). Constants that are one value for
    every channel (scalars, shape (1, 1, 1)) need no proof beyond their rank.

``affine_gemm``, ``affine_matmul``, ``affine_conv`` (with forward folding on)
    chain -> layer: the forward layer rule (``bn_gemm`` ...) with the chain end as its BN: a
    normalization ``(x - mean) / std`` before a Dense layer, a scale before a MatMul. The proof
    of channels is that of ``affine_bn``; ``affine_conv`` needs an unpadded Conv like ``bn_conv``.

The BN merges keep the BN's parameter types; the new values must be finite in them
(``invalid_statistics``). Every value along the way is read by the next node only and, except
the end's, is not a graph output. Backward layer folds and merges into a BN go first each round;
a chain end read by a BN is left to that BN's rules (``conv_bn`` absorbs it with the BN) until
they have failed.
"""

from __future__ import annotations

import numpy as np

from bnfold.folding.rules import bn_conv, bn_gemm, bn_matmul, conv_bn, convtranspose_bn, gemm_bn, matmul_bn
from bnfold.folding.rules.base import (
    CHAIN_OPS,
    BackwardChain,
    chain_variable_operand,
    check_chain_and_combine,
    combine_chain,
    sole_reader_failure,
    trace_backward_from,
)
from bnfold.folding.rules.protocol import BatchNorm, Failure, Match, Reason
from bnfold.folding.rules.skeleton import BackwardFold, ForwardFold
from bnfold.folding.screening import inference_batch_norm
from bnfold.folding.tensors import FLOAT_TYPES, numpy_type, to_float64
from bnfold.folding.view import GraphView, get_attr, is_batch_norm, is_default_domain, value_info_type

# Elementwise ops whose output has their (first) input's shape: a channel count proven for the
# input holds for the output.
SHAPE_KEEPING_OPS = (
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Elu",
    "Selu",
    "Celu",
    "Gelu",
    "Softplus",
    "Softsign",
    "Mish",
    "Clip",
    "Identity",
    "Neg",
    "Abs",
    "Exp",
    "Erf",
)


def is_chain_node(view: GraphView, index: int) -> bool:
    """An Add / Sub / Mul / Div of the default domain with exactly one constant float operand."""
    node = view.nodes[index]
    if node.op_type not in CHAIN_OPS or not is_default_domain(node) or len(node.input) != 2 or len(node.output) != 1:
        return False
    variable = chain_variable_operand(view, node)
    return variable is not None and view.constant_type(node.input[1 - variable]) in FLOAT_TYPES


def chain_ends(view: GraphView) -> list[int]:
    """Indices of the chain nodes whose output is not read by exactly one further chain node
    (through Identity nodes)."""
    ends = []
    for index in range(len(view.nodes)):
        if index in view.removed or not is_chain_node(view, index):
            continue
        follower = _sole_reader(view, view.nodes[index].output[0])
        while follower is not None and _is_identity(view, follower):  # Identity nodes are part of a chain
            follower = _sole_reader(view, view.nodes[follower].output[0])
        if follower is None or not is_chain_node(view, follower):
            ends.append(index)
    return ends


def _sole_reader(view: GraphView, value: str):
    readers = view.readers(value)
    return readers[0] if len(readers) == 1 and not view.is_graph_output(value) else None


def end_batch_norm(view: GraphView, end: int, rank: int, channels: int) -> BatchNorm | None:
    """The chain end as a BN of ``channels`` channels on a rank-``rank`` value: its own per-channel
    map, or None when its constant does not act per channel (or divides by zero)."""
    node = view.nodes[end]
    with np.errstate(all="ignore"):  # what is not finite is refused just below
        mapped = combine_chain(view, BackwardChain(end, [end]), rank, channels)
    if isinstance(mapped, Failure):
        return None
    scale, shift = mapped
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        return None
    variable = chain_variable_operand(view, node)
    return BatchNorm(end, view.labels[end], node.input[variable], node.output[0], scale, shift)


class LayerAffine:
    """layer -> chain: the backward layer rule, offered the chain end as its BN."""

    def __init__(self, layer_rule: BackwardFold, name: str):
        self.layer_rule = layer_rule
        self.name = name

    def check(self, view: GraphView, end: int) -> Match | Failure | None:
        node = view.nodes[end]
        chain = trace_backward_from(view, node.input[chain_variable_operand(view, node)], self.layer_rule.layer_ops)
        if chain is None:
            return None
        layer = view.nodes[chain.layer]
        weight = view.constant(layer.input[1]) if len(layer.input) > 1 else None
        if weight is None or np.ndim(weight) < 2:
            return None  # a product of two activations, or a layer the rule refuses anyway
        weight = np.asarray(weight)
        try:
            channels = int(self.layer_rule.output_channels(layer, weight))
        except (IndexError, ValueError, TypeError):
            return None  # attributes the layer rule would refuse
        bn = end_batch_norm(view, end, weight.ndim, channels)
        if bn is None:
            return None
        result = self.layer_rule.check(view, bn)
        if isinstance(result, Match):
            result.rule = self.name
        return result


def layer_input_channels(node, weight: np.ndarray) -> int:
    """How many channels a layer reads: Conv ``group * W.shape[1]``, Gemm's K, MatMul's rows."""
    if node.op_type == "Conv":
        return int(get_attr(node, "group", 1)) * weight.shape[1]
    if node.op_type == "Gemm":
        return weight.shape[1 if get_attr(node, "transB", 0) else 0]
    return weight.shape[0]


class AffineLayer:
    """chain -> layer: the forward layer rule (``bn_gemm`` ...), offered the chain end as its BN.

    The layer's weight gives the channel count and the rank, but of the layer's input, which is
    the chain's output: a constant that varies along the channels is used only when the chain's
    input x provably has them already (see ``AffineBn``), and x must have the same rank."""

    def __init__(self, layer_rule: ForwardFold, name: str):
        self.layer_rule = layer_rule
        self.name = name

    def check(self, view: GraphView, end: int) -> Match | Failure | None:
        node = view.nodes[end]
        readers = view.readers(node.output[0])
        if len(readers) != 1 or view.nodes[readers[0]].op_type not in self.layer_rule.layer_ops:
            return None
        layer = view.nodes[readers[0]]
        if layer.input[0] != node.output[0] or len(layer.input) < 2 or not is_default_domain(layer):
            return None
        weight = view.constant(layer.input[1])
        if weight is None or np.ndim(weight) < 2:
            return None
        weight = np.asarray(weight)
        rank = weight.ndim
        x = node.input[chain_variable_operand(view, node)]
        if view.rank(x) != rank:
            return None
        try:
            channels = int(layer_input_channels(layer, weight))
        except (IndexError, ValueError, TypeError):
            return None
        bn = end_batch_norm(view, end, rank, channels)
        if bn is None:
            return None
        constant = np.asarray(view.constant(node.input[1 - chain_variable_operand(view, node)]))
        if constant.size != 1 and proven_channels(view, x) != channels:
            return None
        result = self.layer_rule.check(view, bn)
        if isinstance(result, Match):
            result.rule = self.name
        return result


def _merge_failure(view: GraphView, bn_index: int, values: dict) -> Failure | None:
    """Failure when a BN parameter's new float64 value is not finite in its type."""
    node = view.nodes[bn_index]
    for position, value in values.items():
        stored = numpy_type(view.constant_type(node.input[position]))
        with np.errstate(all="ignore"):
            cast = value.astype(stored)
        if not np.all(np.isfinite(to_float64(cast))):
            return Failure(
                Reason.INVALID_STATISTICS,
                f"merging the per-channel constants into {view.describe(bn_index)} would make its "
                f"{'scale' if position == 1 else 'B'} non-finite in its type",
            )
    return None


def _write_parameters(view: GraphView, bn_index: int, values: dict) -> None:
    node = view.nodes[bn_index]
    for position, value in values.items():
        name = node.input[position]
        view.set_constant_input(bn_index, position, value, view.constant_type(name), name)


class BnAffine:
    """BN -> chain: the chain's map goes into the BN's scale and B."""

    name = "bn_affine"

    def check(self, view: GraphView, end: int) -> Match | Failure | None:
        node = view.nodes[end]
        chain = trace_backward_from(view, node.input[chain_variable_operand(view, node)], ("BatchNormalization",))
        if chain is None:
            return None
        real = inference_batch_norm(view, chain.layer)
        if isinstance(real, Failure):
            return None
        rank = view.rank(real.x)
        if rank is None or rank < 2:
            return None
        bn = end_batch_norm(view, end, rank, real.channels)
        if bn is None:
            return None
        combined = check_chain_and_combine(view, bn, chain, rank)
        if isinstance(combined, Failure):
            return combined
        scale, shift = combined
        bn_node = view.nodes[chain.layer]
        gamma, beta = (to_float64(view.constant(bn_node.input[k])) for k in (1, 2))
        with np.errstate(all="ignore"):  # refused by _merge_failure when not finite
            values = {1: scale * gamma, 2: scale * beta + shift}
        failure = _merge_failure(view, chain.layer, values)
        if failure is not None:
            return failure

        def rewrite():
            _write_parameters(view, chain.layer, values)
            for index in chain.nodes + [end]:
                view.remove_node(index)
            view.rename_output(chain.layer, 0, bn.y)

        return Match(self.name, chain.layer, rewrite, list(chain.nodes))


class AffineBn:
    """chain -> BN: the chain's map goes into the BN's scale and B; the BN reads the chain's input."""

    name = "affine_bn"

    def check(self, view: GraphView, end: int) -> Match | Failure | None:
        output = view.nodes[end].output[0]
        readers = view.readers(output)
        if len(readers) != 1 or not is_batch_norm(view.nodes[readers[0]]):
            return None
        bn_index = readers[0]
        if view.nodes[bn_index].input[0] != output or view.is_graph_output(output):
            return None
        real = inference_batch_norm(view, bn_index)
        if isinstance(real, Failure):
            return None
        nodes = [end]
        while True:  # the whole single-reader chain that ends here
            head = view.nodes[nodes[0]]
            value = head.input[chain_variable_operand(view, head)] if head.op_type != "Identity" else head.input[0]
            producer = view.producer_of(value)
            if producer is None or view.is_graph_output(value) or len(view.readers(value)) != 1:
                break
            if not (is_chain_node(view, producer) or _is_identity(view, producer)):
                break
            nodes.insert(0, producer)
        for producer, reader in zip(nodes[:-1], nodes[1:]):
            if sole_reader_failure(view, view.nodes[producer].output[0], reader, producer) is not None:
                return None
        head = view.nodes[nodes[0]]
        x = head.input[chain_variable_operand(view, head)] if head.op_type != "Identity" else head.input[0]
        rank = view.rank(x)
        if rank is None or rank < 2 or view.rank(output) != rank:
            return None
        chain = BackwardChain(nodes[0], nodes)
        with np.errstate(all="ignore"):  # what is not finite is refused just below
            combined = combine_chain(view, chain, rank, real.channels)
        if isinstance(combined, Failure):
            return None
        a, b = combined
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            return None
        if not self._channels_kept(view, nodes, x, real.channels):
            return None
        bn_node = view.nodes[bn_index]
        gamma, beta, mean = (to_float64(view.constant(bn_node.input[k])) for k in (1, 2, 3))
        with np.errstate(all="ignore"):
            values = {1: a * gamma, 2: beta + real.scale * (b - mean + a * mean)}
        failure = _merge_failure(view, bn_index, values)
        if failure is not None:
            return failure

        def rewrite():
            _write_parameters(view, bn_index, values)
            for index in nodes:
                view.remove_node(index)
            view.redirect_input(bn_index, 0, x)

        return Match(self.name, bn_index, rewrite, nodes[:-1])

    @staticmethod
    def _channels_kept(view: GraphView, nodes: list[int], x: str, channels: int) -> bool:
        """True when no chain constant can broadcast ``x`` up to more channels: each is one value
        for all channels, or ``x`` provably has ``channels`` channels already."""
        uniform = True
        for index in nodes:
            node = view.nodes[index]
            if node.op_type == "Identity":
                continue
            constant = np.asarray(view.constant(node.input[1 - chain_variable_operand(view, node)]))
            if constant.size != 1:
                uniform = False
        return uniform or proven_channels(view, x) == channels


def _is_identity(view: GraphView, index: int) -> bool:
    node = view.nodes[index]
    return node.op_type == "Identity" and is_default_domain(node) and len(node.input) == 1


LAYER_RULES = {
    "Conv": conv_bn.RULE,
    "ConvTranspose": convtranspose_bn.RULE,
    "Gemm": gemm_bn.RULE,
    "MatMul": matmul_bn.RULE,
}


def proven_channels(view: GraphView, value: str, _depth: int = 0):
    """The channel count (axis 1) of ``value`` when its producer proves it: a BN with constant
    parameters, a layer with a constant weight (through shape-keeping elementwise ops), or a fixed
    dimension declared for a main-graph input; else None."""
    index = view.producer_of(value)
    if index is None and view.parent is None and value in view.input_names and view.constant(value) is None:
        # The main graph's inputs are the one declaration onnxruntime enforces (fixed dimensions).
        for declared in view.graph.input:
            if declared.name == value:
                described = value_info_type(declared)
                dims = None if described is None else described[1]
                return dims[1] if dims is not None and len(dims) > 1 else None
    if index is None or _depth > 32:
        return None
    node = view.nodes[index]
    if not is_default_domain(node):
        return None
    if is_batch_norm(node):
        real = inference_batch_norm(view, index)
        return None if isinstance(real, Failure) else real.channels
    rule = LAYER_RULES.get(node.op_type)
    if rule is not None and len(node.input) > 1:
        weight = view.constant(node.input[1])
        if weight is None or np.ndim(weight) < 2:
            return None
        if node.op_type in ("Gemm", "MatMul") and np.ndim(weight) != 2:
            return None
        if node.op_type == "MatMul" and view.rank(node.input[0]) != 2:
            return None  # a MatMul's columns are axis 1 only for a rank-2 product
        try:
            return int(rule.output_channels(node, np.asarray(weight)))
        except (IndexError, ValueError, TypeError):
            return None
    if node.op_type in SHAPE_KEEPING_OPS and node.input and node.input[0]:
        return proven_channels(view, node.input[0], _depth + 1)
    if is_chain_node(view, index):  # keeps its input's channels unless its constant broadcasts them up
        variable = chain_variable_operand(view, node)
        channels = proven_channels(view, node.input[variable], _depth + 1)
        rank = view.rank(node.input[variable])
        constant_shape = np.shape(view.constant(node.input[1 - variable]))
        if channels is None or rank is None or rank < 2 or len(constant_shape) > rank:
            return None
        aligned = (1,) * (rank - len(constant_shape)) + tuple(constant_shape)
        return channels if aligned[1] in (1, channels) else None
    return None


RULES = (
    LayerAffine(conv_bn.RULE, "conv_affine"),
    LayerAffine(convtranspose_bn.RULE, "convtranspose_affine"),
    LayerAffine(gemm_bn.RULE, "gemm_affine"),
    LayerAffine(matmul_bn.RULE, "matmul_affine"),
    BnAffine(),
    AffineBn(),
)
# Offered after RULES, and only when forward folding is on.
FORWARD_RULES = (
    AffineLayer(bn_gemm.RULE, "affine_gemm"),
    AffineLayer(bn_matmul.RULE, "affine_matmul"),
    AffineLayer(bn_conv.RULE, "affine_conv"),
)
