"""The steps every layer fold takes, written once: find the layer, read its weight and bias, fold
the chain (backward), compute the scaled weight and the new bias, refuse what would overflow or
lose precision, and rewrite.

A rule subclasses ``BackwardFold`` (layer -> [chain] -> BN) or ``ForwardFold`` (BN -> layer) and
says only what differs between layers:

* ``layer_ops`` and ``weight_role`` (how messages name input 1);
* ``layer_failure``: a refusal before the weight is read (a padded Conv, a transposed Gemm A);
* ``weight_failure``: the weight's shape against the BN's channels;
* ``output_channels``: how many channels the layer produces (the length of its bias);
* ``channel_layout``: where the per-channel factor goes on the weight — the axis of the BN's
  channels (Conv's output channels are axis 0, ConvTranspose's axis 1 within each group of
  axis 0, Gemm's depend on transB, MatMul's are the last axis), possibly in a grouped view;
* ``bias``: the layer's bias (default: an optional per-channel input 2), ``gains`` (Gemm's
  alpha and beta, else 1) and ``finish_layer`` (attribute edits after the rewrite).

With ``S``/``T`` the per-channel scale and shift (the BN's ``s``/``t``, backward combined with the
chain), ``W`` seen in ``channel_layout`` and the factor laid out along it::

    backward:  W' = alpha * S * W      b' = beta * b * S + T          (b' = T without a bias input)
    forward:   W' = alpha * s * W      b' = beta * b + alpha * (t through W)

``GemmLayer`` is the Gemm's part in both directions (alpha/beta, C, the rewrite to a plain Gemm).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np

from bnfold.folding.rules.base import (
    bias_or_failure,
    check_chain_and_combine,
    finish_backward,
    finish_forward,
    float_attr,
    forward_consumer,
    gemm_c_failure,
    int_attr,
    optional_input,
    representation_failure,
    trace_backward,
    weight_or_failure,
)
from bnfold.folding.rules.protocol import BatchNorm, Failure, Match
from bnfold.folding.tensors import to_float64
from bnfold.folding.view import GraphView, set_attr


@dataclass
class LayerBias:
    """The layer's bias input: its name ("" when it has none yet) and float64 value (zeros then)."""

    name: str
    value: np.ndarray


@dataclass
class ChannelLayout:
    """How the weight is seen while it is scaled: the ``shape`` to view it in (its own, or a
    grouped split) and the ``factor_shape`` the per-channel vector takes to broadcast in it."""

    shape: tuple
    factor_shape: tuple


def on_axis(weight: np.ndarray, axis: int) -> ChannelLayout:
    """The channels are axis ``axis`` of the weight as stored."""
    factor_shape = [1] * weight.ndim
    factor_shape[axis] = -1
    return ChannelLayout(weight.shape, tuple(factor_shape))


def on_axis_1_per_group(weight: np.ndarray, group: int) -> ChannelLayout:
    """A grouped Conv-family weight ``(A, B, k...)`` whose channel ``g * B + j`` is axis 1 index j
    of group g's block of axis 0: viewed as ``(group, A / group, B, k...)``."""
    blocks, per_group = weight.shape[0], weight.shape[1]
    kernel = weight.shape[2:]
    return ChannelLayout((group, blocks // group, per_group) + kernel, (group, 1, per_group) + (1,) * len(kernel))


@dataclass
class LayerConstants:
    """The layer's weight (as read, and seen in its channel layout), type and bias."""

    weight: np.ndarray
    data_type: int
    layout: ChannelLayout
    bias: LayerBias | None

    @property
    def seen(self) -> np.ndarray:
        return self.weight if self.layout.shape == self.weight.shape else self.weight.reshape(self.layout.shape)


class LayerFold:
    """What backward and forward folds share; see the module docstring for the hooks."""

    name: str
    layer_ops: tuple[str, ...]
    weight_role = "weight"
    # bn_conv has always scaled a float64 copy of its weight; kept so its results stay bit for bit.
    weight_in_float64 = False

    def check(self, view: GraphView, bn: BatchNorm) -> Match | Failure | None:
        raise NotImplementedError

    def layer_failure(self, view: GraphView, bn: BatchNorm, layer: int) -> Failure | None:
        return None

    def weight_failure(self, view: GraphView, bn: BatchNorm, layer: int, weight: np.ndarray) -> Failure | None:
        raise NotImplementedError

    def output_channels(self, node, weight: np.ndarray) -> int:
        raise NotImplementedError

    def channel_layout(self, node, weight: np.ndarray) -> ChannelLayout:
        raise NotImplementedError

    def gains(self, node) -> tuple[float, float]:
        return 1.0, 1.0

    def bias(self, view: GraphView, layer: int, weight: np.ndarray) -> LayerBias | Failure | None:
        """The optional per-channel bias input 2 (Conv, ConvTranspose); None: the layer has no bias input."""
        bias = bias_or_failure(view, layer, 2, self.output_channels(view.nodes[layer], weight))
        return bias if isinstance(bias, Failure) else LayerBias(*bias)

    def finish_layer(self, view: GraphView, node) -> None:
        pass

    def read_layer(self, view: GraphView, bn: BatchNorm, layer: int) -> LayerConstants | Failure:
        failure = self.layer_failure(view, bn, layer)
        if failure is not None:
            return failure
        weight = weight_or_failure(view, layer, 1, self.weight_role)
        if isinstance(weight, Failure):
            return weight
        w, data_type = weight  # the stored type: float64 only where the math needs it
        if self.weight_in_float64:
            w = to_float64(w)
        failure = self.weight_failure(view, bn, layer, w)
        if failure is not None:
            return failure
        bias = self.bias(view, layer, w)
        if isinstance(bias, Failure):
            return bias
        return LayerConstants(w, data_type, self.channel_layout(view.nodes[layer], w), bias)

    def folded(
        self,
        view: GraphView,
        bn: BatchNorm,
        layer: int,
        read: LayerConstants,
        factor: np.ndarray,
        new_bias: np.ndarray,
        finish: Callable[[], None],
        absorbed: Sequence[int] = (),
    ) -> Match | Failure:
        """The Match storing ``W * factor`` and ``new_bias``, or the Failure when they cannot be stored."""
        seen = read.seen
        old_bias = None if read.bias is None else read.bias.value
        unrepresentable = representation_failure(view, bn, layer, read.data_type, seen, factor, new_bias, old_bias)
        if unrepresentable is not None:
            return unrepresentable
        node = view.nodes[layer]
        bias_name = "" if read.bias is None else read.bias.name
        shape = None if seen is read.weight else read.weight.shape

        def rewrite():
            out = node.output[0]
            view.set_scaled_constant_input(
                layer, 1, seen, factor, read.data_type, node.input[1] or f"{out}_weight", shape=shape
            )
            view.set_constant_input(layer, 2, new_bias, read.data_type, bias_name or f"{out}_bias")
            self.finish_layer(view, node)
            finish()

        return Match(self.name, layer, rewrite, list(absorbed))


class BackwardFold(LayerFold):
    """layer -> [per-channel chain] -> BN: the BN (and chain) scale the layer's output channels."""

    def check(self, view: GraphView, bn: BatchNorm) -> Match | Failure | None:
        chain = trace_backward(view, bn, self.layer_ops)
        if chain is None:
            return None
        read = self.read_layer(view, bn, chain.layer)
        if isinstance(read, Failure):
            return read
        combined = check_chain_and_combine(view, bn, chain, read.weight.ndim)
        if isinstance(combined, Failure):
            return combined
        scale, shift = combined
        alpha, beta = self.gains(view.nodes[chain.layer])
        with np.errstate(over="ignore", invalid="ignore"):  # what is not finite is refused in folded()
            factor = alpha * scale.reshape(read.layout.factor_shape)
            new_bias = shift if read.bias is None else beta * read.bias.value * scale + shift
        return self.folded(
            view, bn, chain.layer, read, factor, new_bias, lambda: finish_backward(view, bn, chain), chain.nodes
        )


class ForwardFold(LayerFold):
    """BN -> layer: the BN scales the layer's input channels; its shift goes through the weight."""

    def shift_through_weight(self, read: LayerConstants, shift: np.ndarray) -> np.ndarray:
        """What the per-input-channel ``shift`` adds to each output channel (float64)."""
        raise NotImplementedError

    def check(self, view: GraphView, bn: BatchNorm) -> Match | Failure | None:
        layer = forward_consumer(view, bn, self.layer_ops)
        if layer is None or isinstance(layer, Failure):
            return layer
        read = self.read_layer(view, bn, layer)
        if isinstance(read, Failure):
            return read
        alpha, beta = self.gains(view.nodes[layer])
        with np.errstate(over="ignore", invalid="ignore"):  # what is not finite is refused in folded()
            through = alpha * self.shift_through_weight(read, bn.shift)
            new_bias = through if read.bias is None else beta * read.bias.value + through
            factor = alpha * bn.scale.reshape(read.layout.factor_shape)
        return self.folded(view, bn, layer, read, factor, new_bias, lambda: finish_forward(view, bn, layer))


def make_plain_gemm(view: GraphView, node) -> None:
    """Turn a folded Gemm or MatMul into ``Gemm(A, B', C')`` with alpha = beta = 1."""
    node.op_type = "Gemm"
    set_attr(node, "alpha", None)
    set_attr(node, "beta", None)
    if view.ctx.opset < 7:
        set_attr(node, "broadcast", 1)  # Gemm-1/6 needs it for a (N,) C


class GemmLayer:
    """A Gemm's part in a fold, either direction: alpha and beta, the optional C, a plain Gemm after."""

    weight_role = "B matrix"

    def output_channels(self, node, weight: np.ndarray) -> int:
        return weight.shape[0 if int_attr(node, "transB", 0) else 1]

    def gains(self, node) -> tuple[float, float]:
        return float_attr(node, "alpha", 1.0), float_attr(node, "beta", 1.0)

    def bias(self, view: GraphView, layer: int, weight: np.ndarray) -> LayerBias | Failure:
        """C as float64 (a zero scalar when absent), refused when it does not broadcast to the product."""
        node = view.nodes[layer]
        c_name = optional_input(node, 2)
        if not c_name:
            return LayerBias("", np.zeros(()))
        c_value = weight_or_failure(view, layer, 2, "C bias")
        if isinstance(c_value, Failure):
            return c_value
        c = to_float64(c_value[0])
        c_failure = gemm_c_failure(view, layer, c, self.output_channels(node, weight))
        if c_failure is not None:
            return c_failure
        if self.gains(node)[1] == 0.0:
            # beta = 0 adds nothing of C: onnxruntime (like BLAS) does not read it, so an Inf / NaN
            # in C must not become beta * C = NaN in the folded bias.
            return LayerBias(c_name, np.zeros(()))
        return LayerBias(c_name, c)

    def finish_layer(self, view: GraphView, node) -> None:
        make_plain_gemm(view, node)
