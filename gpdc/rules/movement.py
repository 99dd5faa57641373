"""Rules for ops that move channels around: reshape/view/flatten, transpose/permute, slicing,
chunk/split, concatenation, and reductions.

The student's layout after a reshape is found by running the op itself on a *tag tensor* whose
entries name their source channel and spatial position, so flatten-after-pooling, channel
shuffles (view → transpose → view) and slices need no per-model code. In the teacher:

* order-preserving moves (flatten, squeeze, transpose, spatial slicing) run unchanged, with any
  literal channel size in a view/reshape replaced by the teacher's;
* reorderings and channel subsets (slices, chunk/split, shuffles) become one ``index_select``
  (by index sets, not prefixes) from the tensor where the rearrangement started.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from ..analyze import node_label
from ..errors import RuleError
from ..layout import Layout, SplitLayout, cat_layouts, cat_teacher, decode_tags, encode_tags
from .params import follow
from .context import ChannelsIn
from .heads import (HeadSplit, LaneSplit, expand_split_heads, expand_unflatten_lanes, lane_split, split_factors,
                    split_heads, unflatten_lanes)
from .probe import PROBED, call_node, known_value
from .registry import Rule, find_rule, register_function_rule, register_method_rule, register_module_rule
from .shapes import is_reshape, patch_shape


def _value(a, src, tags, an):
    if isinstance(a, fx.Node):
        if a is src:
            return tags
        known = a.meta.get("gpdc.value")
        return known_value(an.gm, a) if known is None and a.meta.get("gpdc.shape") is not None else known
    if isinstance(a, (list, tuple)):
        return type(a)(_value(x, src, tags, an) for x in a)
    if isinstance(a, dict):
        return {k: _value(v, src, tags, an) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_value(a.start, src, tags, an), _value(a.stop, src, tags, an), _value(a.step, src, tags, an))
    return a


def _run_on(node: fx.Node, src: fx.Node, tags: torch.Tensor, an):
    """The op of ``node`` run on ``tags`` in place of its input ``src`` (other tensors: their known values)."""
    args, kwargs = _value(node.args, src, tags, an), _value(node.kwargs, src, tags, an)
    tensors_unknown = [a for a in node.all_input_nodes if a is not src and a.meta.get("gpdc.shape") is not None
                       and a.meta.get("gpdc.value") is None and known_value(an.gm, a) is None]
    if tensors_unknown:
        raise RuleError(f"node {node_label(node)} moves channels using the tensor '{tensors_unknown[0].name}', whose "
                        "values gpdc does not know (a float or a large tensor used as an index); index with a small "
                        "integer tensor or register a rule for the op.")
    return call_node(node, an, args, kwargs)


@dataclass(frozen=True)
class Item:
    """``getitem`` on a tuple of tensors (a chunk or split): the item's layout."""


@dataclass(frozen=True)
class Value:
    """A movement op whose output is not a tensor (a size)."""


@dataclass(frozen=True)
class Split:
    """The channel dim spread across dims, not emitted: the merge that follows selects from the source."""


@dataclass(frozen=True)
class Tiled:
    """Spatial dims merged into a channels-last channel dim in whole blocks of channels (space-to-depth)."""

    blocks: int


@dataclass(frozen=True)
class Natural:
    """A reshape/permute that keeps each channel's entries together: per output, entries per channel, their
    sub-positions and whether it merges other dims into the channel dim."""

    repeat: tuple
    sub: tuple
    merges: tuple


@dataclass(frozen=True)
class Select:
    """Channels selected, permuted or sliced from ``source``: each output's student layout."""

    source: fx.Node
    parts: tuple
    tuple: bool


@dataclass(frozen=True)
class CatChannels:
    """A concat along the channel dim: each part's layout, and the aligned space telling a repeated part apart."""

    parts: tuple
    fresh: tuple


@dataclass(frozen=True)
class CatOther:
    """A concat along another dim: the parts' channels are coupled."""


@dataclass(frozen=True)
class ReduceOther:
    """A reduction over dims that hold no channels."""


class MoveRule(Rule):
    accepts_split = True

    def analyze(self, node: fx.Node, an):
        src = node.args[0]
        L = an.layout_of(src)
        if isinstance(L, tuple):  # getitem on the result of chunk/split
            an.record(node, Item())
            return L[node.args[1]]
        if isinstance(L, Layout):
            tags, stride = encode_tags(L, src.meta["gpdc.shape"])
            source_node, source = src, L
        else:
            tags, stride, source_node, source = L.tags, L.stride, L.source_node, L.source
        out = _run_on(node, src, tags, an)
        parts = list(out) if isinstance(out, (list, tuple)) else [out]
        if any(not isinstance(t, torch.Tensor) for t in parts):
            an.record(node, Value())
            return None
        if source_node is src and is_reshape(node) and (lanes := lane_split(node, L)):
            return unflatten_lanes(node, L, *lanes, an)
        if source_node is src and is_reshape(node) and (split := split_factors(node, L)):
            one_head = split[1][-2] == 1  # looks like an unsqueeze unless attention follows
            if (not one_head or _reaches_attention(node, an)) and \
                    not _merged_back(node, parts[0], stride, source.width, len(src.meta["gpdc.shape"]), an):
                return split_heads(node, L, split, an)
        lays, kinds = [], []
        if source_node is src and L.width == 1:
            single = _single_channel_dims(node, src, L, an, len(parts))
        else:  # one channel sliced out of several stays in the channel dim when the rank does not change
            single = [L.dim if isinstance(L, Layout) and t.dim() == len(src.meta["gpdc.shape"]) else None for t in parts]
        for i, t in enumerate(parts):
            dec = decode_tags(t, stride, source.width, default_dim=single[i] if single else None)
            if dec is None:
                lays.append(SplitLayout(source_node, source, stride, t))
                kinds.append("split")
                continue
            d, pos, sub, lead = dec
            if lead is not None:  # leading (channels-last spatial) dims merged into the channel dim
                k = len(pos) // max(source.width, 1)
                if sub is not None or source_node is not src or not _tiled(pos, lead, source.width):
                    raise RuleError(f"node '{node.name}' merges spatial dims into a channels-last channel dim in an "
                                    "order gpdc cannot follow; merge whole channel blocks (space-to-depth) instead.")
                block = np.repeat(np.arange(k), source.width)
                lays.append(source.take(pos, dim=d, sub=source.sub[pos] * k + block))
                kinds.append(("tiled", k))
                continue
            new_sub = source.sub[pos] * stride + sub if sub is not None else source.sub[pos]
            lays.append(source.take(pos, dim=d, sub=new_sub))
            kinds.append(self._classify(source_node is src, source, pos, sub))
        if "split" in kinds:
            if len(parts) > 1:
                raise RuleError(f"node '{node.name}' splits the channel dim over several dims and several outputs.")
            an.record(node, Split())
            return lays[0]
        if any(k[0] == "tiled" for k in kinds):
            if len(kinds) > 1:
                raise RuleError(f"node '{node.name}' merges spatial dims into channels and has several outputs.")
            an.record(node, Tiled(kinds[0][1]))
        elif all(k[0] == "natural" for k in kinds):
            an.record(node, Natural(tuple(k[1] for k in kinds), tuple(k[2] for k in kinds),
                                    tuple(k[3] for k in kinds)))
        else:
            for lay in lays:  # a selection by channel key (sub-positions included) along the source's dim
                if lay.dim != source.dim:
                    raise RuleError(
                        f"node '{node.name}' rearranges channels together with other dims in a way gpdc cannot "
                        "express as one channel selection; reshape channels and spatial dims in separate steps."
                    )
            an.record(node, Select(source_node, tuple(lays), isinstance(out, (list, tuple))))
        return tuple(lays) if isinstance(out, (list, tuple)) else lays[0]

    @staticmethod
    def _classify(same_source, source, pos, sub):
        C = source.width
        if not same_source or len(pos) % max(C, 1):
            return ("select",)
        k = len(pos) // C
        if not np.array_equal(pos, np.repeat(np.arange(C), k)):
            return ("select",)
        if sub is None:
            return ("natural", k, np.zeros(k, np.int64), False)
        rows = sub.reshape(C, k)
        if not (rows == rows[0]).all():
            return ("select",)
        return ("natural", k, rows[0], True)

    def expand(self, node: fx.Node, ex) -> None:
        facts = ex.facts(node)
        _EXPAND_MOVE[type(facts)](node, ex, facts)


def _expand_item(node: fx.Node, ex, facts: Item) -> None:
    ex.emit_copy(node, ex.tl[node.args[0]][node.args[1]])


def _expand_value(node: fx.Node, ex, facts: Value) -> None:
    ex.emit_copy(node, None)


def _expand_split(node: fx.Node, ex, facts: Split) -> None:
    ex.env[node] = None  # not emitted: the merge that follows selects from the source
    ex.tl[node] = None


def _expand_tiled(node: fx.Node, ex, facts: Tiled) -> None:
    """Space-to-depth, channels last: k blocks of all the input's channels."""
    TI, k = ex.tl[node.args[0]], facts.blocks
    lay = ex.layout(node)
    TO = ex.rekey(cat_teacher([TI.take(np.arange(TI.width), dim=lay.dim, sub=TI.sub * k + b, keys=None)
                               for b in range(k)], lay.dim))
    ex.emit_copy(node, TO, args=patch_shape(node, TO, ex) if is_reshape(node) else None)


def _expand_natural(node: fx.Node, ex, facts: Natural) -> None:
    TI = ex.tl[node.args[0]]
    outs = []
    lays = ex.layout(node)
    lays = list(lays) if isinstance(lays, tuple) else [lays]
    for lay, k, s, merges in zip(lays, facts.repeat, facts.sub, facts.merges):
        sub = np.repeat(TI.sub, k) * lay_stride(ex, node) + np.tile(s, TI.width) if merges else np.repeat(TI.sub, k)
        outs.append(TI.take(np.repeat(np.arange(TI.width), k), dim=lay.dim, sub=sub, keys=None))
    outs = [ex.rekey(o) for o in outs]
    if node.op == "call_module":
        ex.set_module(node.target, ex.clone(ex.an.module(node)))
    args = patch_shape(node, outs[0], ex) if is_reshape(node) else _whole_channel_slice(node, ex)
    ex.emit_copy(node, tuple(outs) if len(outs) > 1 or isinstance(ex.layout(node), tuple) else outs[0], args=args)


def _expand_select(node: fx.Node, ex, facts: Select) -> None:
    TS = ex.tl[facts.source]
    x = ex.env[facts.source]
    idxs, outs = [], []
    for lay in facts.parts:
        keys = ex.keys(lay)
        first = TS.positions_of(keys)
        wanted = np.isin(TS.keys, keys) & (TS.copy > 0)
        extra = np.nonzero(wanted)[0]
        extra = extra[np.argsort(TS.copy[extra], kind="stable")]
        idx = np.concatenate([first, extra])
        idxs.append(idx)
        outs.append(TS.take(idx, dim=TS.dim))
    if facts.tuple:
        ex.emit_select_many(node, x, TS.dim, idxs, tuple(outs))
    else:
        ex.env[node] = ex.index_select(node, x, TS.dim, idxs[0])
        ex.tl[node] = outs[0]
        ex.log(node, f"channel rearrangement as index_select of {len(idxs[0])} channels from '{facts.source.name}'")


_EXPAND_MOVE = {Item: _expand_item, Value: _expand_value, Split: _expand_split, Tiled: _expand_tiled,
                Natural: _expand_natural, Select: _expand_select, HeadSplit: expand_split_heads,
                LaneSplit: expand_unflatten_lanes}


SENTINEL_STRIDE = 1_000_003  # marks a size-1 channel dim: no real dim of a small tag tensor has this stride


def _single_channel_dims(node: fx.Node, src: fx.Node, L: Layout, an, n: int) -> list | None:
    """Where a single channel's dim goes in each output (its tags cannot vary along it): through ops
    that keep it (permute, transpose, indexing, unbind), the dim that kept a stride no other dim has;
    else (reshape, flatten) the dim after as many elements as before the channel dim: a size-1 dim
    there, or the dim the channel merged into."""
    shape = src.meta["gpdc.shape"]
    strides = list(torch.empty(shape).stride())
    strides[L.dim] = SENTINEL_STRIDE
    marked = torch.zeros(shape, dtype=torch.int64).as_strided(shape, strides)
    try:
        out = _run_on(node, src, marked, an)
    except Exception:
        return None
    outs = [t if isinstance(t, torch.Tensor) else None for t in (out if isinstance(out, (list, tuple)) else [out])]
    lead = int(np.prod(shape[:L.dim]))

    def where(t):
        kept = [d for d in range(t.dim()) if t.shape[d] == 1 and t.stride(d) == SENTINEL_STRIDE]
        at = [d for d in range(t.dim()) if int(np.prod(t.shape[:d])) == lead]
        return (kept or [d for d in at if t.shape[d] == 1] or [d for d in at if t.shape[d] > 1] or [None])[0]

    return [None if t is None else where(t) for t in outs][:n]


_ATTENTION_OPS = {torch.matmul, operator.matmul, torch.bmm, torch.einsum, "matmul", "bmm",
                  torch.nn.functional.scaled_dot_product_attention}


def _reaches_attention(node: fx.Node, an) -> bool:
    """Whether the tensor reaches a matmul, einsum or scaled_dot_product_attention through movement ops."""
    for user in node.users:
        if user.target in _ATTENTION_OPS:
            return True
        if isinstance(find_rule(user, an), MoveRule) and _reaches_attention(user, an):
            return True
    return False


def _merged_back(node: fx.Node, tags: torch.Tensor, stride: int, width: int, rank: int, an) -> bool:
    """Whether every use of ``node`` (a channel dim split across dims, as ``tags``) only moves dims until
    all the channels are one dim of a tensor of the source's ``rank`` again (a channel shuffle), so nothing
    computes on the split tensor."""
    for user in node.users:
        if not isinstance(find_rule(user, an), MoveRule):
            return False
        try:
            out = _run_on(user, node, tags, an)
        except RuleError:
            return False
        if isinstance(out, (list, tuple)):
            items = [(u, out[u.args[1]]) for u in user.users if u.target is operator.getitem]
            if len(items) < len(user.users):
                return False
        else:
            items = [(user, out)]
        for n, t in items:
            if not isinstance(t, torch.Tensor):
                return False
            dec = decode_tags(t, stride, width)
            whole = dec is not None and np.array_equal(np.sort(dec[1]), np.arange(width)) and t.dim() == rank
            if not whole and not _merged_back(n, t, stride, width, rank, an):
                return False
    return True


def _whole_channel_slice(node: fx.Node, ex):
    """``x[..., :C, ...]`` that keeps every channel: the teacher's args slice the channel dim whole
    (its literal bound is the student's width); None for other ops."""
    if node.target is not operator.getitem or not isinstance(node.args[0], fx.Node):
        return None
    x, index = node.args
    items = list(index) if isinstance(index, tuple) else [index]
    nd, dim = len(x.meta["gpdc.shape"]), ex.layout(x).dim
    used = sum(it is not None and it is not Ellipsis for it in items)
    d = 0
    for i, it in enumerate(items):
        if it is Ellipsis:
            d += nd - used
        elif it is not None:
            if d == dim:  # a slice or an index list that keeps every channel in order
                items[i] = slice(None)
                return ex.arg((x, tuple(items) if isinstance(index, tuple) else items[0]))
            d += 1
    return None


def _tiled(pos: np.ndarray, lead: np.ndarray, width: int) -> bool:
    """Whole blocks of all ``width`` channels in order, each block from one spatial neighbour."""
    if width == 0 or len(pos) % width:
        return False
    k = len(pos) // width
    blocks = lead.reshape(k, width)
    return np.array_equal(pos, np.tile(np.arange(width), k)) and bool((blocks == blocks[:, :1]).all()) \
        and len(np.unique(blocks[:, 0])) == k


def lay_stride(ex, node):
    """The tag stride used when the node's input was encoded (trailing-dim size of its source)."""
    src = node.args[0]
    L = ex.layout(src)
    shape = src.meta["gpdc.shape"]
    return int(np.prod(shape[L.dim + 1 :], dtype=np.int64)) if L.dim + 1 < len(shape) else 1


class CatRule(Rule):
    def analyze(self, node: fx.Node, an):
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        nd = len(node.meta["gpdc.shape"])
        dim = dim % nd
        lays = [an.layout_of(t) for t in tensors]
        if any(isinstance(L, SplitLayout) for L in lays):
            raise RuleError(f"cat '{node.name}' receives a tensor whose channel dim is split across dims.")
        cdim = next(L.dim for L in lays if L is not None)
        if dim == cdim:
            parts = [L if L is not None else an.pinned_layout(node, dim, t.meta["gpdc.shape"][dim], "concatenated unwidened tensor")
                     for L, t in zip(lays, tensors)]
            fresh, seen = [], set()
            for P in parts:  # the same channels twice (e.g. a conv's output and its depthwise cheap op)?
                keys = set(an.channel_keys(P).tolist())
                fresh.append(an.aligned_space(P, node) if keys & seen else None)
                seen |= keys
            an.record(node, CatChannels(tuple(parts), tuple(fresh)))
            return cat_layouts([F or P for P, F in zip(parts, fresh)], dim)
        first, partner = None, next(t for L, t in zip(lays, tensors) if L is not None)
        for L, t in zip(lays, tensors):
            if L is None:
                L = follow(t, an.layout_of(partner).with_dim(cdim), partner, an) or an.pinned_layout(
                    node, cdim, t.meta["gpdc.shape"][cdim], "concatenated with widened channels")
            if first is None:
                first = L
            else:
                an.couple(first, L, node)
        an.record(node, CatOther())
        return first

    def expand(self, node: fx.Node, ex) -> None:
        facts = ex.facts(node)
        tensors = node.args[0]
        if isinstance(facts, CatChannels):
            TIs = [ex.tin(t, L) for t, L in zip(tensors, facts.parts)]
            TIs = [T if F is None else ex.aligned_teacher(P, T, F) for T, P, F in zip(TIs, facts.parts, facts.fresh)]
            ex.emit_copy(node, ex.rekey(cat_teacher(TIs, TIs[0].dim)))
        else:
            ex.emit_copy(node, next(ex.tl[t] for t in tensors if ex.tl.get(t) is not None))


class SpaceToChannelsRule(Rule):
    """Ops that gather ``k`` spatial neighbours of a channels-last tensor into ``k`` blocks of its
    channels (torchvision Swin's fx-wrapped patch-merging gather): block b holds the input's
    channels at spatial sub-position b, so its layout is the input's with ``sub`` extended by b."""

    def __init__(self, k: int):
        self.k = k

    def analyze(self, node: fx.Node, an):
        L = an.layout_of(node.args[0])
        if not isinstance(L, Layout) or L.dim != len(node.meta["gpdc.shape"]) - 1:
            raise RuleError(f"node '{node.name}' gathers spatial neighbours into channels-last blocks; it needs its "
                            "channels in the last dim.")
        return cat_layouts([L.take(np.arange(L.width), sub=L.sub * self.k + b) for b in range(self.k)], L.dim)

    def expand(self, node: fx.Node, ex) -> None:
        TI = ex.tl[node.args[0]]
        parts = [TI.take(np.arange(TI.width), sub=TI.sub * self.k + b) for b in range(self.k)]
        ex.emit_copy(node, ex.rekey(cat_teacher(parts, TI.dim)))


class ReduceRule(Rule):
    """mean/sum over dims. Over the channel dim, copies are weighted by the fan-in scale so the
    teacher sums each student channel once (and a mean divides by the student's width)."""

    def __init__(self, mean: bool):
        self.mean = mean

    def _dims(self, node):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        nd = len(node.args[0].meta["gpdc.shape"])
        if dims is None:
            dims = list(range(nd))
        dims = [dims] if isinstance(dims, int) else list(dims)
        return sorted(d % nd for d in dims), keep

    def analyze(self, node: fx.Node, an):
        L = an.layout_of(node.args[0])
        if not isinstance(L, Layout):
            raise RuleError(f"reduction '{node.name}' receives a channel dim split across dims.")
        dims, keep = self._dims(node)
        if L.dim in dims:
            an.record(node, ChannelsIn(L))
            return None
        an.record(node, ReduceOther())
        return L if keep else L.with_dim(L.dim - sum(d < L.dim for d in dims))

    def expand(self, node: fx.Node, ex) -> None:
        facts = ex.facts(node)
        TI = ex.tl[node.args[0]]
        if isinstance(facts, ReduceOther):
            ex.emit_copy(node, TI.take(slice(None), dim=ex.layout(node).dim))
            return
        L = facts.inp
        shape = [1] * len(node.args[0].meta["gpdc.shape"])
        shape[TI.dim] = TI.width
        w = torch.as_tensor(ex.fanin_scale(TI), dtype=torch.float32).view(shape)
        w_node = ex.buffer(node, "reduce_weight", w)
        x = ex.graph.call_function(operator.mul, (ex.arg(node.args[0]), w_node))
        red = ex.graph.node_copy(node, lambda n: x if n is node.args[0] else ex.arg(n))
        if self.mean:
            red = ex.graph.call_function(operator.mul, (red, TI.width / L.width))
        ex.env[node] = red
        ex.tl[node] = None
        ex.log(node, f"channel reduction weights {TI.width} teacher channels back to {L.width}")


class NormReduceRule(ReduceRule):
    """``x.norm(p, dim)`` over non-channel dims (e.g. ConvNeXt-V2's global response norm); a norm
    over the channel dim would need the copies weighted inside the power and is refused."""

    def __init__(self):
        super().__init__(mean=False)

    def _dims(self, node):
        dims = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
        keep = node.kwargs.get("keepdim", node.args[3] if len(node.args) > 3 else False)
        nd = len(node.args[0].meta["gpdc.shape"])
        dims = list(range(nd)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
        return sorted(d % nd for d in dims), keep

    def analyze(self, node: fx.Node, an):
        out = super().analyze(node, an)
        if isinstance(an.facts(node), ChannelsIn):
            raise RuleError(f"node '{node.name}' takes a norm over the channel dim; gpdc supports sums and means there.")
        return out


class BroadcastRule(Rule):
    """``x.expand(y.shape)``, ``x.expand_as(y)``, ``torch.broadcast_to(x, y.shape)`` where ``y`` holds ``x``'s channels in
    the same dim — a per-channel statistic broadcast back over the map it was taken from (FilterResponseNorm): the
    channels stay where they are, and the target shape, read from ``y``, is the teacher's in the teacher. Any other
    broadcast (constant sizes, one channel repeated over many, a ``y`` that a view or reshape made — it may hold
    channels folded into other dims, as EvoNorm's groups) is left to the probe."""

    def analyze(self, node: fx.Node, an):
        L = an.layout_of(node.args[0])
        if not (isinstance(L, Layout) and _to_shape_of_own_channels(node, L, an)):
            return PROBED.analyze(node, an)
        return L.with_dim(L.dim + _new_dims(node))

    def expand(self, node: fx.Node, ex) -> None:
        L = ex.an.layout_of(node.args[0])
        if not (isinstance(L, Layout) and _to_shape_of_own_channels(node, L, ex.an)):
            return PROBED.expand(node, ex)
        TI = ex.tl[node.args[0]]
        ex.emit_copy(node, TI.take(np.arange(TI.width), dim=ex.layout(node).dim))


def _new_dims(node: fx.Node) -> int:
    return len(node.meta["gpdc.shape"]) - len(node.args[0].meta["gpdc.shape"])


def _to_shape_of_own_channels(node: fx.Node, L: Layout, an) -> bool:
    """Whether the broadcast's target shape is read from a tensor holding ``L``'s channels at the output's dim."""
    target = node.args[1] if len(node.args) == 2 else None
    if node.target != "expand_as":  # the target shape: ``y.shape`` or ``y.size()``
        shape_read = isinstance(target, fx.Node) and (
            (target.op == "call_function" and target.target is getattr and target.args[1] == "shape")
            or (target.op == "call_method" and target.target == "size" and len(target.args) == 1))
        target = target.args[0] if shape_read else None
    T = an.layout_of(target) if isinstance(target, fx.Node) and not is_reshape(target) else None
    return (isinstance(T, Layout) and T.dim == L.dim + _new_dims(node) and T.width == L.width
            and bool(np.array_equal(an.channel_keys(T), an.channel_keys(L))))


_MOVE_METHODS = ("view", "reshape", "flatten", "transpose", "permute", "contiguous", "squeeze", "unsqueeze",
                 "chunk", "split", "narrow", "unflatten", "movedim", "swapaxes", "unbind")
_MOVE_FUNCTIONS = (torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze,
                   torch.chunk, torch.split, torch.narrow, torch.movedim, torch.swapaxes, torch.unbind, operator.getitem)
for _m in _MOVE_METHODS:
    register_method_rule(_m, MoveRule())
for _f in _MOVE_FUNCTIONS:
    register_function_rule(_f, MoveRule())
for _cls in (torch.nn.Flatten, torch.nn.Unflatten, torch.nn.ChannelShuffle):
    register_module_rule(_cls, MoveRule())
for _m in ("expand", "expand_as"):
    register_method_rule(_m, BroadcastRule())
register_function_rule(torch.broadcast_to, BroadcastRule())
register_function_rule(torch.cat, CatRule())
register_function_rule(torch.concat, CatRule())
for _name, _mean in (("mean", True), ("sum", False)):
    register_method_rule(_name, ReduceRule(_mean))
register_function_rule(torch.mean, ReduceRule(True))
register_method_rule("norm", NormReduceRule())
register_function_rule(torch.norm, NormReduceRule())
register_function_rule(torch.sum, ReduceRule(False))
