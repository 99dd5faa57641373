"""Rules for the layers that mix channels: convolutions (dense, depthwise, grouped) and Linear.

Teacher activations are *replicated* (every copy of a channel carries the student's value), so a
channel-mixing layer divides each input column by the number of copies of that channel in its
input (its fan-in scale) and its outputs need no scaling; per-channel ops then work unchanged.
Under ``grow`` the old outputs read only the old inputs and the new rows are freshly initialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..errors import RuleError
from ..layout import Layout
from ..weighted_norm import WeightedStdConv2d
from .registry import Rule, register_module_rule


def dense_weight(ex, w: torch.Tensor, rows_student: np.ndarray, TO, cols_student: np.ndarray,
                 colscale: np.ndarray) -> torch.Tensor:
    """Teacher weight [C'_out, C'_in, ...] for a channel-mixing layer, both strategies: rows and
    columns copy student rows/columns, columns times their fan-in scale; under grow the rows of
    new channels are fresh and old rows read only the student's own input channels (scale 0 elsewhere)."""
    w = w.detach()
    rows = torch.as_tensor(rows_student)
    cols = torch.as_tensor(cols_student)
    colscale = torch.as_tensor(colscale, dtype=w.dtype)
    bshape = [1, -1] + [1] * (w.dim() - 2)
    if ex.strategy == "replicate":
        return w.index_select(0, rows).index_select(1, cols) * colscale.view(bshape)
    fresh = torch.empty((TO.width, len(cols_student)) + tuple(w.shape[2:]), dtype=w.dtype)
    nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
    old_rows = torch.as_tensor(np.nonzero(TO.copy == 0)[0])
    block = w.index_select(0, rows[old_rows]).index_select(1, cols) * colscale.view(bshape)
    fresh[old_rows] = block
    return fresh


def dense_bias(ex, b: torch.Tensor, rows_student: np.ndarray, copy: np.ndarray) -> torch.Tensor:
    """Teacher bias of a channel-mixing layer: copies of the student rows (zero for new rows under grow)."""
    b = b.detach()[torch.as_tensor(rows_student)].clone()
    if ex.strategy == "grow":
        b[torch.as_tensor(copy > 0)] = 0
    return b


@dataclass(frozen=True)
class ChannelwiseLinear:
    """A Linear over a dim that does not carry the channels: it acts on each channel alike."""

    inp: Layout


@dataclass(frozen=True)
class Dense:
    """A layer mixing all its input channels into a new channel space."""

    inp: Layout
    out: Layout


@dataclass(frozen=True)
class Depthwise:
    """One filter per channel: output channel c is input channel c filtered, so it widens like it."""

    inp: Layout
    out: Layout  # an aligned space (``an.aligned_space``)


@dataclass(frozen=True)
class Grouped:
    """Channels mixed within groups: each group widens by whole teacher groups."""

    inp: Layout
    out: Layout


class DenseRule(Rule):
    """Conv (any groups) and Linear: open a new channel space for the output."""

    opens_space = True
    out_dim = 0  # the weight's output-channel dim ([C_out, C_in / groups, k...])

    def analyze(self, node: fx.Node, an):
        m = an.module(node)
        is_linear = isinstance(m, nn.Linear)
        shape = node.args[0].meta["gpdc.shape"] if isinstance(node.args[0], fx.Node) else None
        cin = m.in_features if is_linear else m.in_channels
        cout = m.out_features if is_linear else m.out_channels
        cdim = len(shape) - 1 if is_linear else 1
        L = an.layout_of(node.args[0])
        if L is None:
            L = an.pinned_layout(node, cdim, cin, "input that is not widened (e.g. the data input)")
        if not isinstance(L, Layout):
            raise RuleError(f"layer '{node.target}' receives a tensor whose channel dim is split across dims; reshape it back first.")
        if L.dim != cdim:
            if is_linear:  # a Linear over a non-channel dim acts channel-wise
                an.record(node, ChannelwiseLinear(L))
                return L
            raise RuleError(f"layer '{node.target}' expects channels in dim {cdim}, but its input carries them in dim {L.dim}.")
        groups = 1 if is_linear else m.groups
        if groups == 1:
            facts = Dense(L, Layout.of_space(cdim, an.new_space(cout, node), cout))
        elif groups == cin == cout:  # output channel c is input channel c filtered: widens like it
            facts = Depthwise(L, an.aligned_space(L, node))
        else:
            if np.any(L.sub):
                raise RuleError(f"grouped conv '{node.target}' receives flattened features; not supported.")
            facts = Grouped(L, Layout.of_space(cdim, an.new_space(cout, node), cout))
            an.set_quantum(facts.out, cout // groups, node)
            an.set_quantum(L, cin // groups, node)
        an.record(node, facts)
        return facts.out

    def expand(self, node: fx.Node, ex) -> None:
        facts = ex.facts(node)
        _EXPAND[type(facts)](self, node, ex, ex.an.module(node), facts)


def _expand_channelwise(rule: DenseRule, node: fx.Node, ex, m: nn.Module, facts: ChannelwiseLinear) -> None:
    ex.emit_module(node, ex.clone(m), ex.arg(node.args[0]), layout=ex.tin(node.args[0], facts.inp))
    ex.share_unchanged(node.target, m)


def _expand_dense(rule: DenseRule, node: fx.Node, ex, m: nn.Module, facts: Dense) -> None:
    L, Lout = facts.inp, facts.out
    TI, TO = ex.tin(node.args[0], L), ex.canonical(Lout)
    cols = ex.student_pos(L, TI)
    o, i = rule.out_dim, 1 - rule.out_dim
    params = {"weight": dense_weight(ex, m.weight.transpose(0, o), TO.index, TO, cols, ex.fanin_scale(TI)).transpose(0, o)}
    if m.bias is not None:
        params["bias"] = dense_bias(ex, m.bias, TO.index, TO.copy)
    attrs = {"in_features": TI.width, "out_features": TO.width} if isinstance(m, nn.Linear) else {
        "in_channels": TI.width, "out_channels": TO.width}
    ex.emit_module(node, ex.clone(m, params=params, **attrs), ex.arg(node.args[0]), layout=TO)
    rows, in_pos = TO.positions_of(ex.keys(Lout)), TI.positions_of(ex.keys(L))
    colscale = ex.fanin_scale(TI)[in_pos]
    ex.share(node.target, "weight", index={o: rows, i: in_pos}, scale={i: 1.0 / colscale})
    if m.bias is not None:
        ex.share(node.target, "bias", index={0: rows})
    ex.log(node, f"dense: {L.width}->{TI.width} in, {Lout.width}->{TO.width} out")


def _expand_depthwise(rule: DenseRule, node: fx.Node, ex, m: nn.Module, facts: Depthwise) -> None:
    L = facts.inp
    TI = ex.tin(node.args[0], L)
    TO = ex.aligned_teacher(L, TI, facts.out)
    pos = torch.as_tensor(ex.student_pos(L, TI))
    params = {"weight": m.weight.detach().index_select(0, pos)}
    if m.bias is not None:
        params["bias"] = m.bias.detach().index_select(0, pos)
    new = ex.clone(m, params=params, in_channels=TI.width, out_channels=TI.width, groups=TI.width)
    ex.emit_module(node, new, ex.arg(node.args[0]), layout=TO)
    rows = TI.positions_of(ex.keys(L))
    ex.share(node.target, "weight", index={0: rows})
    if m.bias is not None:
        ex.share(node.target, "bias", index={0: rows})
    ex.log(node, f"depthwise: {L.width}->{TI.width} channels")


def _expand_grouped(rule: DenseRule, node: fx.Node, ex, m: nn.Module, facts: Grouped) -> None:
    """Teacher group t computes student group sigma(t) from one copy of its inputs."""
    L, Lout = facts.inp, facts.out
    TI, TO = ex.tin(node.args[0], L), ex.canonical(Lout)
    x = ex.arg(node.args[0])
    a, b = m.in_channels // m.groups, m.out_channels // m.groups
    in_keys = ex.keys(L)
    gather = []
    for t in range(TO.width // b):
        sigma, c = TO.index[t * b] // b, TO.copy[t * b]
        want = in_keys[sigma * a : (sigma + 1) * a]
        have = c if np.isin(want, TI.keys[TI.copy == c]).all() else 0
        gather.append(TI.positions_of(want, copy=have))
    gather = np.concatenate(gather)
    if not np.array_equal(gather, np.arange(TI.width)):
        x = ex.index_select(node, x, 1, gather)
        ex.log(node, f"grouped conv reads {len(gather)} of {TI.width} input channels through a gather")
    rows = torch.as_tensor(TO.index)
    params = {"weight": m.weight.detach().index_select(0, rows)}
    if m.bias is not None:
        params["bias"] = m.bias.detach().index_select(0, rows)
    new = ex.clone(m, params=params, in_channels=len(gather), out_channels=TO.width, groups=TO.width // b)
    ex.emit_module(node, new, x, layout=TO)
    out_rows = TO.positions_of(ex.keys(Lout))
    ex.share(node.target, "weight", index={0: out_rows})
    if m.bias is not None:
        ex.share(node.target, "bias", index={0: out_rows})
    ex.log(node, f"grouped conv: {m.groups}->{TO.width // b} groups, {Lout.width}->{TO.width} out")


_EXPAND = {ChannelwiseLinear: _expand_channelwise, Dense: _expand_dense, Depthwise: _expand_depthwise,
           Grouped: _expand_grouped}


for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear):
    register_module_rule(_cls, DenseRule())


class TransposedConvRule(DenseRule):
    """ConvTranspose (decoders, upsampling heads): its weight is [C_in, C_out / groups, k...], so the dense
    rewrite reads rows and columns from the other dims; a depthwise one ([C, 1, k...]) is a depthwise conv's."""

    out_dim = 1

    def analyze(self, node: fx.Node, an):
        out = super().analyze(node, an)
        if isinstance(an.facts(node), Grouped):
            raise RuleError(f"grouped transposed conv '{node.target}' is not supported (dense or depthwise only); keep "
                            "the layers around it at ratio 1 with expand.layers.")
        return out


for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_module_rule(_cls, TransposedConvRule())
class StdConvRule(DenseRule):
    """Weight-standardised convs (timm ``StdConv2d``): the teacher copies the raw weights unscaled and
    standardises each row with statistics that count every student input channel once, then applies
    the fan-in scale (``gpdc.weighted_norm.WeightedStdConv2d``). Depthwise ones need nothing extra."""

    def analyze(self, node: fx.Node, an):
        out = super().analyze(node, an)
        if isinstance(an.facts(node), Grouped):
            raise RuleError(f"grouped weight-standardised conv '{node.target}' is not supported (dense or depthwise only).")
        return out

    def expand(self, node: fx.Node, ex) -> None:
        facts = ex.facts(node)
        if not isinstance(facts, Dense):
            return super().expand(node, ex)
        m = ex.an.module(node)
        L, Lout = facts.inp, facts.out
        TI, TO = ex.tin(node.args[0], L), ex.canonical(Lout)
        cols = ex.student_pos(L, TI)
        scale = ex.fanin_scale(TI)
        w = dense_weight(ex, m.weight, TO.index, TO, cols, (scale > 0).astype(np.float64))  # raw, unscaled
        b = None if m.bias is None else dense_bias(ex, m.bias, TO.index, TO.copy)
        col_weight = torch.as_tensor(scale / L.width, dtype=torch.float32)
        new = WeightedStdConv2d(m, w, b, col_weight, torch.as_tensor(scale, dtype=torch.float32))
        ex.emit_module(node, new, ex.arg(node.args[0]), layout=TO)
        ex.share(node.target, "weight", index={0: TO.positions_of(ex.keys(Lout)), 1: TI.positions_of(ex.keys(L))})
        if m.bias is not None:
            ex.share(node.target, "bias", index={0: TO.positions_of(ex.keys(Lout))})
        ex.log(node, f"weight-standardised dense: {L.width}->{TI.width} in, {Lout.width}->{TO.width} out")
