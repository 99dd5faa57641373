"""Products that sum over the channel dim: ``q.transpose(-2, -1) @ k`` over channels-first maps (EfficientViT,
SHViT), linear attention, and ``scaled_dot_product_attention`` on channels-last tokens with no head split.

A teacher operand holds every student channel as several copies, so a plain product would count each channel
once per copy. One operand is multiplied by the fan-in scale along the contracted dim (1/copies, or the first
copy only under ``grow``), the other is lined up with it by student position (``ex.pair``), and the contracted
channels of the two operands are coupled: channel i of one meets channel i of the other. For SDPA the softmax
scale stays the student's ``1/sqrt(E)``. A product that keeps the channels (rows of a, columns of b, a batch
dim such as heads) acts channel by channel: the output carries them. SDPA batched over heads is left to the
probe (``gpdc.rules.probe``).
"""

from __future__ import annotations

from dataclasses import dataclass

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..analyze import node_label
from ..errors import RuleError
from ..layout import Layout
from .probe import PROBED
from .registry import Rule, register_function_rule, register_method_rule


def _contracted(node: fx.Node, an, i: int, dim_from_end: int) -> Layout | None:
    """The layout of operand ``i`` if its channels sit in the dim the product sums over."""
    a = node.args[i]
    L = an.layout_of(a) if isinstance(a, fx.Node) else None
    nd = len(a.meta["gpdc.shape"]) if isinstance(a, fx.Node) and a.meta.get("gpdc.shape") else 0
    return L if isinstance(L, Layout) and nd >= dim_from_end and L.dim == nd - dim_from_end else None


@dataclass(frozen=True)
class Contraction:
    """A product summing over the channels: each operand's student layout (None: input-independent, gathered),
    the dim (from the end) it sums over, and the operand scaled by the fan-in."""

    layouts: tuple
    dims: tuple
    scaled: int


@dataclass(frozen=True)
class Batched:
    """A product keeping the channels (rows, columns or a batch dim): (operand, layout in the output's dims)."""

    kept: tuple


@dataclass(frozen=True)
class ChannelAttention:
    """Scaled dot-product attention summing over the channels of q and k."""

    q: Layout
    k: Layout


class MatmulRule(Rule):
    """``a @ b``: a's last dim and b's second-to-last are summed over (b 1-d: its only dim)."""

    def analyze(self, node: fx.Node, an):
        b = node.args[1]
        b_dim = 1 if len(b.meta["gpdc.shape"]) == 1 else 2
        La, Lb = _contracted(node, an, 0, 1), _contracted(node, an, 1, b_dim)
        if La is None and Lb is None:
            return self._batched(node, an)
        pairs = [(0, La, 1), (1, Lb, b_dim)]
        scaled = next(i for i, L, _ in pairs if L is not None)
        for i, L, dfe in pairs:
            if L is None and an.layout_of(node.args[i]) is not None:
                raise RuleError(f"node {node_label(node)} multiplies a tensor's channels by another tensor's channels "
                                "along different dims; gpdc follows products over the channels of both operands or "
                                "batched over channels.")
            if L is None and an.depends_on_input(node.args[i]):
                raise RuleError(f"node {node_label(node)} sums over widened channels against a tensor computed from "
                                "the input that carries no channels; gpdc cannot line the two up.")
        ref = La if La is not None else Lb
        for i, L, dfe in pairs:
            if L is not None and L is not ref:
                an.couple(ref, L.with_dim(ref.dim), node)
        an.record(node, Contraction((La, Lb), (1, b_dim), scaled))
        return None

    def _batched(self, node: fx.Node, an):
        """Channels in a dim the product keeps (rows of a, columns of b, or a batch dim such as heads): the
        output carries them; channels of both operands in one batch dim are paired."""
        a, b = node.args[:2]
        out_nd = len(node.meta["gpdc.shape"])
        kept = []
        for i, x in enumerate((a, b)):
            L = an.layout_of(x)
            if L is None:
                continue
            nd = len(x.meta["gpdc.shape"])
            if not isinstance(L, Layout) or nd < 2:
                raise RuleError(f"node {node_label(node)} multiplies a tensor whose channel dim is split across dims.")
            is_col = i == 1 and L.dim == nd - 1
            kept.append((x, L.with_dim(out_nd - 1 if is_col else L.dim + out_nd - nd)))
        dims = {L.dim for _, L in kept}
        if len(dims) > 1 or (len(kept) == 2 and dims.pop() >= out_nd - 2):
            raise RuleError(f"node {node_label(node)} multiplies two tensors that carry channels in different dims; "
                            "gpdc follows products over the channels of both or batched over the channels.")
        if len(kept) == 1:
            kept += _unwidened_partner(node, an, *kept[0], out_nd)
        if len(kept) == 2:
            an.couple(kept[0][1], kept[1][1], node)
        an.record(node, Batched(tuple(kept)))
        return kept[0][1]

    def expand(self, node: fx.Node, ex) -> None:
        facts = ex.facts(node)
        if isinstance(facts, Batched):
            return self._expand_batched(node, ex, facts.kept)
        layouts, dims, scaled = facts.layouts, facts.dims, facts.scaled
        T = ex.tl[node.args[scaled]]
        args = list(ex.arg(node.args))
        for i, (L, dfe) in enumerate(zip(layouts, dims)):
            nd = len(node.args[i].meta["gpdc.shape"])
            if L is None:  # input-independent: gathered to the teacher's channels
                args[i] = ex.index_select(node, args[i], nd - dfe, ex.student_pos(layouts[scaled], T))
            elif i == scaled:
                args[i] = _times_fanin(ex, node, args[i], T, dfe)
            elif (idx := ex.pair(layouts[scaled], T, L, ex.tl[node.args[i]])) is not None:
                args[i] = ex.index_select(node, args[i], nd - dfe, idx)
        ex.env[node] = ex.graph.create_node(node.op, node.target, tuple(args), ex.arg(node.kwargs), node.name)
        ex.tl[node] = None
        ex.log(node, f"sums over {layouts[scaled].width}->{T.width} channels, each student channel counted once")


    @staticmethod
    def _expand_batched(node: fx.Node, ex, kept) -> None:
        (ref, L_ref), *rest = kept
        T_ref = ex.tl[ref]
        args = list(ex.arg(node.args))
        for x, L in rest:  # the other operand's channels lined up with the first's (an unwidened one: pinned alike)
            if ex.tl.get(x) is not None and (idx := ex.pair(L_ref, T_ref, L, ex.tl[x])) is not None:
                i = list(node.args).index(x)
                args[i] = ex.index_select(node, args[i], ex.tl[x].dim, idx)
        ex.env[node] = ex.graph.create_node(node.op, node.target, tuple(args), ex.arg(node.kwargs), node.name)
        ex.tl[node] = T_ref.take(slice(None), dim=L_ref.dim)


def _unwidened_partner(node: fx.Node, an, x: fx.Node, L: Layout, out_nd: int) -> list:
    """The other operand of a product batched over channels (heads) when it carries no widened channels but has
    them in the same batch dim, not broadcast: it meets them one for one, so they keep their width (pinned)."""
    other = next((a for a in node.args[:2] if isinstance(a, fx.Node) and a is not x), None)
    shape = other.meta.get("gpdc.shape") if other is not None else None
    if not shape or L.dim >= out_nd - 2:
        return []
    d = L.dim - (out_nd - len(shape))
    if d < 0 or shape[d] != L.width or L.width == 1:
        return []
    pinned = an.pinned_layout(node, d, L.width, f"meets the unwidened tensor '{other.name}' one for one")
    return [(other, pinned.with_dim(L.dim))]


def _times_fanin(ex, node: fx.Node, x, T, dim_from_end: int):
    """``x`` times the fan-in scale of its teacher channels along dim ``-dim_from_end``."""
    w = torch.as_tensor(ex.fanin_scale(T), dtype=torch.float32).view([-1] + [1] * (dim_from_end - 1))
    return ex.graph.call_function(operator.mul, (x, ex.buffer(node, "fanin", w)))


class AttentionProductRule(Rule):
    """``F.scaled_dot_product_attention`` on tokens whose channels are the last dim (no head split): q·k sums
    over the channels (q scaled by the fan-in, k lined up, the student's softmax scale kept), the output
    carries v's channels. Batched over heads, it is left to the probe."""

    def analyze(self, node: fx.Node, an):
        Lq, Lk = _contracted(node, an, 0, 1), _contracted(node, an, 1, 1)
        if Lq is None and Lk is None:
            return PROBED.analyze(node, an)
        if Lq is None or Lk is None or "scale" in node.kwargs and node.kwargs["scale"] is not None:
            raise RuleError(f"scaled_dot_product_attention {node_label(node)} sums over widened channels of only one "
                            "of q and k (or with an explicit scale); gpdc widens both or neither.")
        an.couple(Lq, Lk, node)
        an.record(node, ChannelAttention(Lq, Lk))
        return an.layout_of(node.args[2])

    def expand(self, node: fx.Node, ex) -> None:
        facts = ex.facts(node)
        if not isinstance(facts, ChannelAttention):
            return PROBED.expand(node, ex)
        q, k, v = node.args[:3]
        TQ, TK = ex.tl[q], ex.tl[k]
        nq = len(q.meta["gpdc.shape"])
        idx = ex.pair(facts.q, TQ, facts.k, TK)
        kq = ex.arg(k) if idx is None else ex.index_select(node, ex.arg(k), nq - 1, idx)
        args = (_times_fanin(ex, node, ex.arg(q), TQ, 1), kq, *ex.arg(node.args[2:]))
        kwargs = dict(ex.arg(node.kwargs), scale=1 / math.sqrt(facts.q.width))
        ex.env[node] = ex.graph.create_node(node.op, node.target, args, kwargs, node.name)
        ex.tl[node] = ex.tl[v]
        ex.log(node, f"attention sums over {facts.q.width}->{TQ.width} channels with the student's scale")


for _fn in (operator.matmul, torch.matmul, torch.bmm):
    register_function_rule(_fn, MatmulRule())
for _m in ("matmul", "bmm", "__matmul__"):
    register_method_rule(_m, MatmulRule())
register_function_rule(F.scaled_dot_product_attention, AttentionProductRule())
