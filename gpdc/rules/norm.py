"""Normalisation layers: per-channel parameters follow the channel map, unscaled.

Teacher activations are replicated copies of the student's, so each copy sees the student's
values and BatchNorm is exact in eval mode (running stats) and train mode (batch stats) alike.
The student reads the affine parameters of the first copies and keeps its own running statistics.
Layer and group norms compute statistics *across* channels, so their teacher weights each student
channel once (``gpdc.weighted_norm``); with uniform copies a plain LayerNorm does that already.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..analyze import node_label
from ..errors import RuleError
from ..layout import Layout
from ..weighted_norm import WeightedGroupNorm, WeightedLayerNorm, weighted_group_norm, weighted_layer_norm
from .params import follow
from .context import ChannelsIn
from .registry import Rule, register_function_rule, register_module_rule


@dataclass(frozen=True)
class PerHeadNorm:
    """A layer norm over dims that hold no channels (a q/k norm over the head size): it acts per channel."""

    inp: Layout


class BatchNormRule(Rule):
    covers_own_forward = True  # timm's BatchNormAct2d: an activation (and dropout) after the normalisation

    def covers(self, module) -> bool:
        """Not a BatchNormAct2d whose activation has parameters (a PReLU): the rule widens the BatchNorm's own."""
        return all("." not in name for name, _ in module.named_parameters())

    def analyze(self, node: fx.Node, an):
        L = an.layout_of(node.args[0])
        m = an.module(node)
        if L is None:
            L = an.pinned_layout(node, 1, m.num_features, "input that is not widened")
        if not isinstance(L, Layout) or L.dim != 1:
            raise RuleError(f"BatchNorm '{node.target}' expects its channels in dim 1.")
        an.record(node, ChannelsIn(L))
        return L

    def expand(self, node: fx.Node, ex) -> None:
        m = ex.an.module(node)
        L = ex.facts(node).inp
        TI = ex.tin(node.args[0], L)
        pos = torch.as_tensor(ex.student_pos(L, TI))
        params = {k: p.detach().index_select(0, pos) for k, p in m.named_parameters(recurse=False)}
        buffers = {}
        for k, b in m.named_buffers(recurse=False):
            buffers[k] = b.detach().index_select(0, pos) if b is not None and b.dim() == 1 else (None if b is None else b.detach().clone())
        new = ex.clone(m, params=params, buffers=buffers, num_features=TI.width)
        ex.emit_module(node, new, ex.arg(node.args[0]), layout=TI)
        rows = TI.positions_of(ex.keys(L))
        for k in params:
            ex.share(node.target, k, index={0: rows})
        ex.log(node, f"batchnorm: {L.width}->{TI.width} channels")


for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
    register_module_rule(_cls, BatchNormRule())


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _stat_weight(ex, TI, per_group: int) -> np.ndarray:
    """Statistic weight per teacher channel: every student channel counts once (see weighted_norm)."""
    return ex.fanin_scale(TI) / per_group


class LayerNormRule(Rule):
    """``nn.LayerNorm`` and ``F.layer_norm`` over the channel dim, which must be the last dim
    (ConvNeXt-style channels-first norms permute before and after, which the movement rules follow),
    or over dims that hold no channels (a q/k norm over the head size), which needs nothing."""

    def analyze(self, node: fx.Node, an):
        x = node.args[0]
        L = an.layout_of(x)
        m = an.module(node)
        shape = tuple(m.normalized_shape) if m is not None else tuple(_arg(node, 1, "normalized_shape"))
        nd = len(x.meta["gpdc.shape"])
        if isinstance(L, Layout) and L.dim < nd - len(shape):  # e.g. a q/k norm over the head size: per head
            an.record(node, PerHeadNorm(L))
            return L
        if not isinstance(L, Layout) or L.dim != nd - 1 or len(shape) != 1:
            raise RuleError(
                f"layer norm {node_label(node)} normalises over {shape} but the widened channels are in dim "
                f"{getattr(L, 'dim', '?')} of a {nd}-d tensor; gpdc widens a LayerNorm over the last dim only "
                "(normalize over channels only, e.g. permute channels last first).")
        if m is None:
            for i, name in ((2, "weight"), (3, "bias")):
                p = _arg(node, i, name)
                if isinstance(p, fx.Node) and follow(p, L.with_dim(0), x, an) is None:
                    raise RuleError(f"the {name} of layer norm {node_label(node)} is not a parameter of the model; "
                                    "gpdc cannot widen it.")
        an.record(node, ChannelsIn(L))
        return L

    def expand(self, node: fx.Node, ex) -> None:
        L = ex.facts(node).inp
        TI = ex.tin(node.args[0], L)
        if isinstance(ex.facts(node), PerHeadNorm):
            return self._unchanged(node, ex, TI)
        w = _stat_weight(ex, TI, L.width)
        uniform = bool(np.allclose(w, w[0]))
        m = ex.an.module(node)
        if m is None:
            x, weight, bias = (ex.arg(_arg(node, i, k)) for i, k in ((0, "input"), (2, "weight"), (3, "bias")))
            eps = _arg(node, 4, "eps", 1e-5)
            if uniform:
                ex.env[node] = ex.graph.call_function(F.layer_norm, (x, (TI.width,), weight, bias, eps))
            else:
                sw = ex.buffer(node, "stat_weight", torch.as_tensor(w, dtype=torch.float32))
                ex.env[node] = ex.graph.call_function(weighted_layer_norm, (x, sw, weight, bias, eps))
            ex.tl[node] = TI
        else:
            pos = torch.as_tensor(ex.student_pos(L, TI))
            weight, bias = (None if p is None else p.detach().index_select(0, pos) for p in (m.weight, m.bias))
            if uniform:
                new = ex.clone(m, params={k: v for k, v in (("weight", weight), ("bias", bias)) if v is not None},
                               normalized_shape=(TI.width,))
            else:
                new = WeightedLayerNorm(m, TI.width, torch.as_tensor(w, dtype=torch.float32), weight, bias)
            ex.emit_module(node, new, ex.arg(node.args[0]), layout=TI)
            rows = TI.positions_of(ex.keys(L))
            for k in ("weight", "bias"):
                if getattr(m, k, None) is not None:
                    ex.share(node.target, k, index={0: rows})
        ex.log(node, f"layer norm: {L.width}->{TI.width} channels, {'plain' if uniform else 'weighted'} statistics")


    @staticmethod
    def _unchanged(node: fx.Node, ex, TI) -> None:
        """A norm over dims that hold no channels runs on every teacher copy as on the student's."""
        m = ex.an.module(node)
        if m is None:
            ex.emit_copy(node, TI)
            return
        ex.emit_module(node, ex.clone(m), ex.arg(node.args[0]), layout=TI)
        ex.share_unchanged(node.target, m)
        ex.log(node, "layer norm over dims without channels: unchanged")


class GroupNormRule(Rule):
    """``nn.GroupNorm`` and ``F.group_norm`` (channels in dim 1): each teacher channel joins the
    group of its student channel, with weighted statistics."""

    def analyze(self, node: fx.Node, an):
        x = node.args[0]
        L = an.layout_of(x)
        if not isinstance(L, Layout) or L.dim != 1:
            raise RuleError(f"group norm {node_label(node)} expects its widened channels in dim 1.")
        if an.module(node) is None:
            for i, name in ((2, "weight"), (3, "bias")):
                p = _arg(node, i, name)
                if isinstance(p, fx.Node) and follow(p, L.with_dim(0), x, an) is None:
                    raise RuleError(f"the {name} of group norm {node_label(node)} is not a parameter of the model.")
        an.record(node, ChannelsIn(L))
        return L

    def expand(self, node: fx.Node, ex) -> None:
        L = ex.facts(node).inp
        TI = ex.tin(node.args[0], L)
        m = ex.an.module(node)
        G = m.num_groups if m is not None else _arg(node, 1, "num_groups")
        per = L.width // G
        spos = ex.student_pos(L, TI)
        onehot = torch.zeros(TI.width, G)
        onehot[torch.arange(TI.width), torch.as_tensor(spos // per)] = 1.0
        w = torch.as_tensor(_stat_weight(ex, TI, per), dtype=torch.float32)
        if m is None:
            x, weight, bias = (ex.arg(_arg(node, i, k)) for i, k in ((0, "input"), (2, "weight"), (3, "bias")))
            g, sw = ex.buffer(node, "groups", onehot), ex.buffer(node, "stat_weight", w)
            ex.env[node] = ex.graph.call_function(weighted_group_norm, (x, g, sw, weight, bias, _arg(node, 4, "eps", 1e-5)))
            ex.tl[node] = TI
        else:
            pos = torch.as_tensor(spos)
            weight, bias = (None if p is None else p.detach().index_select(0, pos) for p in (m.weight, m.bias))
            ex.emit_module(node, WeightedGroupNorm(m, onehot, w, weight, bias), ex.arg(node.args[0]), layout=TI)
            rows = TI.positions_of(ex.keys(L))
            for k in ("weight", "bias"):
                if getattr(m, k, None) is not None:
                    ex.share(node.target, k, index={0: rows})
        ex.log(node, f"group norm: {G} groups, {L.width}->{TI.width} channels, weighted statistics")


register_module_rule(nn.LayerNorm, LayerNormRule())
register_function_rule(F.layer_norm, LayerNormRule())
register_module_rule(nn.GroupNorm, GroupNormRule())
register_function_rule(F.group_norm, GroupNormRule())
