"""Attention written inline: a reshape that splits the channel dim into heads × head size.

``qkv.reshape(B, N, 3, H, d)`` (or ``x.view(B, H, d, N)``) turns C channels into factors; the
second-to-last factor is the heads. The teacher copies whole heads (METHOD.md §2: the head size d and
so the q·k scale stay unchanged), so the split opens a *head space* of H channels whose head h
widens together with every channel it holds, and from there on the tensor carries that head space
along the head dim: matmuls, softmax, scaling, per-head biases and ``scaled_dot_product_attention``
are batched over heads, so they act head by head like any channel-by-channel op, and merging heads ×
head size back into one dim is an ordinary flatten (head channels at sub-positions).

In the teacher, the split gathers the widened tensor into head-major order (teacher head h' holds
student head ``src[h']``'s channels, copy ``copy[h']``) before the reshape, whose head count becomes H'.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.fx as fx

from ..layout import Layout


@dataclass(frozen=True)
class HeadSplit:
    """A reshape splitting the channels ``inp`` into ``factors`` (heads second to last) from output dim ``start``."""

    inp: Layout
    start: int
    factors: tuple


@dataclass(frozen=True)
class LaneSplit:
    """A reshape splitting heads merged into channels back into (heads, ``d``) from output dim ``start``."""

    start: int
    d: int


def split_factors(node: fx.Node, L: Layout) -> tuple[int, list[int]] | None:
    """(first output dim, factors) if the reshape splits the channel dim ``L.dim`` into at least two
    consecutive output dims and only regroups the dims before and after it (Twins merges window dims,
    Visformer the spatial dims, in the same reshape)."""
    shape_in, shape_out = list(node.args[0].meta["gpdc.shape"]), list(node.meta["gpdc.shape"])
    c = L.dim
    lead, trail = int(np.prod(shape_in[:c])), int(np.prod(shape_in[c + 1:]))
    if np.any(L.sub):
        return None
    for start in range(len(shape_out)):
        if int(np.prod(shape_out[:start])) != lead:
            continue
        for end in range(len(shape_out), start + 1, -1):
            factors = shape_out[start:end]
            if int(np.prod(shape_out[end:])) == trail and int(np.prod(factors)) == L.width and factors[-1] > 1:
                return start, factors
    return None


def split_heads(node: fx.Node, L: Layout, split: tuple[int, list[int]], an) -> Layout:
    """Open the head space of the split: head h widens with every channel of ``L`` it holds."""
    start, factors = split
    heads = factors[-2]
    head_of = np.unravel_index(np.arange(L.width), factors)[-2]
    out = Layout.of_space(start + len(factors) - 2, an.new_space(heads, node), heads)
    members = Layout(L.dim, np.full(L.width, out.space[0]), head_of.astype(np.int64), np.zeros(L.width, np.int64))
    an.align(L, members, node)
    an.record(node, HeadSplit(L, start, tuple(factors)))
    return out


def _teacher_shape(node: fx.Node, dim: int, factors: list[int]) -> tuple:
    """The reshape's size args with the channel factors as literals (a head size computed from the
    channel count, ``C // num_heads``, would otherwise grow with the teacher's C)."""
    packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    sizes = list(node.args[1] if packed else node.args[1:])
    for i, f in enumerate(factors):
        if not (isinstance(sizes[dim + i], int) and sizes[dim + i] == -1):
            sizes[dim + i] = f
    return (type(node.args[1])(sizes),) if packed else tuple(sizes)


def expand_split_heads(node: fx.Node, ex, facts: HeadSplit) -> None:
    L, factors = facts.inp, list(facts.factors)
    TS = ex.tl[node.args[0]]
    TH = ex.canonical(ex.layout(node))
    teacher_factors = factors[:-2] + [TH.width, factors[-1]]
    grid = np.indices(teacher_factors).reshape(len(factors), -1)
    copy = TH.copy[grid[-2]]
    grid[-2] = TH.index[grid[-2]]
    keys = ex.keys(L)[np.ravel_multi_index(tuple(grid), factors)]
    lookup = {kc: i for i, kc in enumerate(zip(TS.keys.tolist(), TS.copy.tolist()))}
    idx = np.array([lookup[kc] for kc in zip(keys.tolist(), copy.tolist())], dtype=np.int64)
    x = ex.index_select(node, ex.arg(node.args[0]), TS.dim, idx)
    args = (x,) + ex.arg(_teacher_shape(node, facts.start, teacher_factors))
    ex.env[node] = ex.graph.create_node(node.op, node.target, args, ex.arg(node.kwargs), node.name)
    ex.tl[node] = TH
    ex.log(node, f"splits {L.width} channels into heads {factors[-2]}->{TH.width} of {factors[-1]}")



def lane_split(node: fx.Node, L: Layout) -> tuple[int, int] | None:
    """(head dim, head size d) if the reshape splits heads × head size merged earlier (channels whose runs of
    d positions are one head channel at sub-positions ``base·d + 0..d-1``) back into two dims (CoaT's
    convolutional position encoding merges heads into channels, convolves them and splits them again)."""
    if not np.any(L.sub):
        return None
    shape_in, shape_out = list(node.args[0].meta["gpdc.shape"]), list(node.meta["gpdc.shape"])
    lead, trail = int(np.prod(shape_in[:L.dim])), int(np.prod(shape_in[L.dim + 1:]))
    for start in range(len(shape_out) - 1):
        heads, d = shape_out[start], shape_out[start + 1]
        if (int(np.prod(shape_out[:start])) == lead and heads * d == L.width and d > 1
                and int(np.prod(shape_out[start + 2:])) == trail and _runs_of_lanes(L, d)):
            return start, d
    return None


def _runs_of_lanes(L: Layout, d: int) -> bool:
    ids = np.stack([L.space, L.index]).reshape(2, -1, d)
    sub = L.sub.reshape(-1, d)
    return bool((ids == ids[:, :, :1]).all() and (sub == sub[:, :1] + np.arange(d)).all() and (sub[:, 0] % d == 0).all())


def unflatten_lanes(node: fx.Node, L: Layout, start: int, d: int, an) -> Layout:
    an.record(node, LaneSplit(start, d))
    first = np.arange(0, L.width, d)
    return Layout(start, L.space[first], L.index[first], L.sub[first] // d)


def expand_unflatten_lanes(node: fx.Node, ex, facts: LaneSplit) -> None:
    """Gather each teacher head's d lanes together, in order, then reshape with the teacher's head count."""
    d, TI = facts.d, ex.tl[node.args[0]]
    group = TI.keys - TI.sub + TI.sub // d  # the head channel's key at its base sub-position
    order = {}
    for i, (g, c) in enumerate(zip(group.tolist(), TI.copy.tolist())):
        order.setdefault((g, c), []).append(i)
    idx = np.concatenate([sorted(pos, key=lambda i: TI.sub[i] % d) for pos in order.values()]).astype(np.int64)
    x = ex.arg(node.args[0])
    if not np.array_equal(idx, np.arange(TI.width)):
        x = ex.index_select(node, x, TI.dim, idx)
    T = TI.take(idx[::d], dim=facts.start, sub=TI.sub[idx[::d]] // d, keys=None)
    args = (x,) + ex.arg(_teacher_shape(node, facts.start, [T.width, d]))
    ex.env[node] = ex.graph.create_node(node.op, node.target, args, ex.arg(node.kwargs), node.name)
    ex.tl[node] = ex.rekey(T)
    ex.log(node, f"splits merged heads back: {T.width} heads of {d}")
