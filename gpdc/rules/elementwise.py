"""Rules for ops that act on each channel alike: activations, dropout, pooling, resizing, and
elementwise binary ops (residual add, squeeze-excite gating).

Because every teacher copy of a channel carries the student's value, any such op is exact on the
teacher unchanged: no wrapper is needed even for non-homogeneous functions (SiLU, Hardswish,
sigmoid gates). Binary ops couple the channel spaces of their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..analyze import node_label
from ..errors import RuleError
from ..layout import Layout
from .params import follow
from .registry import Rule, register_function_rule, register_method_rule, register_module_rule


class ChannelwiseRule(Rule):
    """Unary ops applied to every channel alike (first argument carries the channels).

    ``spatial_only`` ops (pooling, resizing) additionally need the channels in dim 1."""

    def __init__(self, spatial_only: bool = False):
        self.spatial_only = spatial_only

    def analyze(self, node: fx.Node, an):
        L = an.layout_of(node.args[0]) if node.args else None
        if not isinstance(L, Layout):
            raise RuleError(f"node '{node.name}' ({node.target}) receives a channel dim split across dims.")
        if self.spatial_only and L.dim != 1:
            raise RuleError(f"node '{node.name}' pools/resizes spatial dims but its channels are in dim {L.dim}, not 1.")
        return L

    def expand(self, node: fx.Node, ex) -> None:
        if node.op == "call_module":
            m = ex.an.module(node)
            new = ex.clone(m)
            ex.emit_module(node, new, *[ex.arg(a) for a in node.args], layout=ex.tl[node.args[0]], kwargs=ex.arg(node.kwargs))
            ex.share_unchanged(node.target, m)
        else:
            ex.emit_copy(node, ex.tl[node.args[0]])


class PadRule(ChannelwiseRule):
    """``F.pad``: channelwise as long as it pads no channels (e.g. Swin pads H and W of a
    channels-last tensor)."""

    def analyze(self, node: fx.Node, an):
        L = super().analyze(node, an)
        pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
        k = len(node.args[0].meta["gpdc.shape"]) - 1 - L.dim  # pairs count from the last dim
        if any(pad[2 * k: 2 * k + 2]):
            raise RuleError(f"node '{node.name}' pads the channel dim; gpdc cannot widen padded channels.")
        return L


class RollRule(ChannelwiseRule):
    """``torch.roll`` over spatial dims (Swin's shifted windows); rolling channels is refused."""

    def analyze(self, node: fx.Node, an):
        L = super().analyze(node, an)
        dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
        nd = len(node.args[0].meta["gpdc.shape"])
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if not dims or L.dim in [d % nd for d in dims]:
            raise RuleError(f"node '{node.name}' rolls the channel dim (or the flattened tensor); gpdc cannot widen that.")
        return L


@dataclass(frozen=True)
class Paired:
    """Inputs combined channel for channel: each input's student layout (in the output's dims), the reference
    whose teacher layout the others are lined up with, and the input-independent tensors gathered to it."""

    out: Layout | None
    ref: fx.Node | None
    paired: dict  # input node -> Layout
    gathers: dict  # input-independent node -> Layout


class BinaryRule(Rule):
    """Elementwise ops of several tensors: inputs that carry channels are coupled.

    An unwidened tensor that meets widened channels channel-for-channel (not by broadcasting)
    pins the group: it cannot be widened."""

    def analyze(self, node: fx.Node, an):
        args = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
        lays = [(a, an.layout_of(a)) for a in args if a.meta.get("gpdc.shape") is not None]
        carried = [(a, L) for a, L in lays if L is not None]
        if any(not isinstance(L, Layout) for _, L in carried):
            raise RuleError(f"node {node.name} combines a tensor whose channel dim is split across dims.")
        out_shape = node.meta["gpdc.shape"]
        ref = carried[0][1]
        nd = len(out_shape)
        first, ref_node, paired = None, None, {}
        gathers = {}  # input-independent tensors that meet the channels: gathered per teacher channel
        for a, L in lays:
            shape = a.meta["gpdc.shape"]
            offset = nd - len(shape)
            if L is None:
                d = ref.dim - (len(carried[0][0].meta["gpdc.shape"]) - len(shape))
                if not (d >= 0 and shape[d] == ref.width and ref.width > 1):
                    continue
                L = follow(a, ref.with_dim(d), carried[0][0], an)
                if L is None and not an.depends_on_input(a):  # e.g. FrozenBatchNorm2d's scale from its buffers
                    gathers[a] = ref.with_dim(d)
                    continue
                L = L or an.pinned_layout(node, d, ref.width, f"meets the unwidened tensor '{a.name}' channel for channel")
            out_dim = L.dim + offset
            if shape[L.dim] == 1 and out_shape[out_dim] > 1:
                an.pin(L, f"is broadcast over the channels by {node_label(node)}")  # e.g. a one-channel spatial gate
                continue
            L = L.with_dim(out_dim)
            paired[a] = L
            if first is None:
                first, ref_node = L, a
            else:
                if first.dim != L.dim:
                    raise RuleError(f"node {node.name} combines tensors whose channels sit in different dims ({first.dim}, {L.dim}).")
                an.couple(first, L, node)
        an.record(node, Paired(first, ref_node, paired, gathers))
        return first

    def expand(self, node: fx.Node, ex) -> None:
        facts: Paired = ex.facts(node)
        first, gathers, paired, ref = facts.out, facts.gathers, facts.paired, facts.ref
        TO = None if ref is None else ex.tin(ref, paired[ref])  # an unwidened (pinned) reference: its own layout
        new_args = []
        for a in node.args:
            na = ex.arg(a)
            T = ex.tl.get(a) if isinstance(a, fx.Node) else None
            if isinstance(a, fx.Node) and a in gathers:
                Lc = gathers[a]
                na = ex.index_select(node, na, Lc.dim, ex.student_pos(Lc, TO))
                ex.log(node, f"input-independent '{a.name}' gathered to the teacher's {TO.width} channels")
            elif isinstance(a, fx.Node) and a in paired and T is not None and a is not ref:
                idx = ex.pair(first, TO, paired[a], T)
                na = na if idx is None else ex.index_select(node, na, T.dim, idx)
            new_args.append(na)
        if TO is not None:
            TO = TO.take(slice(None), dim=first.dim)
        ex.emit_copy(node, TO, args=tuple(new_args))


_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Threshold, nn.LogSigmoid, nn.Tanhshrink,
)
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)
_UNARY_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.sigmoid, F.tanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.sqrt, torch.clamp,
    torch.clip, torch.neg, operator.neg,
)
_SPATIAL_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
)
_UNARY_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "exp", "abs", "sqrt",
    "neg", "float", "to", "type_as", "clone", "detach",
)
_BINARY_FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.addcmul,
)
_BINARY_METHODS = ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum")


def register_elementwise(*targets, spatial_only: bool = False) -> None:
    """Declare modules types, functions or method names that act on each channel alike."""
    rule = ChannelwiseRule(spatial_only)
    for t in targets:
        if isinstance(t, str):
            register_method_rule(t, rule)
        elif isinstance(t, type):
            register_module_rule(t, rule)
        else:
            register_function_rule(t, rule)


register_elementwise(*_UNARY_MODULES, *_UNARY_FUNCTIONS, *_UNARY_METHODS)
register_elementwise(*_SPATIAL_MODULES, *_SPATIAL_FUNCTIONS, spatial_only=True)
register_function_rule(F.pad, PadRule())
register_function_rule(torch.roll, RollRule())
for _fn in _BINARY_FUNCTIONS:
    register_function_rule(_fn, BinaryRule())
for _m in _BINARY_METHODS:
    register_method_rule(_m, BinaryRule())
