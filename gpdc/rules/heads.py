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

import numpy as np
import torch.fx as fx

from ..layout import Layout


def split_factors(node: fx.Node, L: Layout) -> list[int] | None:
    """The factors a reshape splits the channel dim ``L.dim`` into (consecutive output dims), if that is
    all it does and there are at least two of them."""
    shape_in, shape_out = list(node.args[0].meta["gpdc.shape"]), list(node.meta["gpdc.shape"])
    c = L.dim
    k = len(shape_out) - len(shape_in) + 1
    if k < 2 or np.any(L.sub) or shape_out[:c] != shape_in[:c] or shape_out[c + k:] != shape_in[c + 1:]:
        return None
    factors = shape_out[c : c + k]
    return factors if int(np.prod(factors)) == L.width and factors[-2] > 1 else None


def split_heads(node: fx.Node, L: Layout, factors: list[int], an) -> Layout:
    """Open the head space of the split: head h widens with every channel of ``L`` it holds."""
    heads = factors[-2]
    head_of = np.unravel_index(np.arange(L.width), factors)[-2]
    out = Layout.of_space(L.dim + len(factors) - 2, an.new_space(heads, node), heads)
    members = Layout(L.dim, np.full(L.width, out.space[0]), head_of.astype(np.int64), np.zeros(L.width, np.int64))
    an.coupling.align(L, members, node.name)
    an.info[node] = {"kind": "heads", "in": L, "factors": factors}
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


def expand_split_heads(node: fx.Node, ex) -> None:
    info = ex.an.info[node]
    L, factors = info["in"], info["factors"]
    TS = ex.tl[node.args[0]]
    TH = ex.canonical(ex.an.layouts[node])
    teacher_factors = factors[:-2] + [TH.width, factors[-1]]
    grid = np.indices(teacher_factors).reshape(len(factors), -1)
    copy = TH.copy[grid[-2]]
    grid[-2] = TH.index[grid[-2]]
    keys = ex.keys(L)[np.ravel_multi_index(tuple(grid), factors)]
    lookup = {kc: i for i, kc in enumerate(zip(TS.keys.tolist(), TS.copy.tolist()))}
    idx = np.array([lookup[kc] for kc in zip(keys.tolist(), copy.tolist())], dtype=np.int64)
    x = ex.index_select(node, ex.arg(node.args[0]), TS.dim, idx)
    args = (x,) + ex.arg(_teacher_shape(node, L.dim, teacher_factors))
    ex.env[node] = ex.graph.create_node(node.op, node.target, args, ex.arg(node.kwargs), node.name)
    ex.tl[node] = TH
    ex.log(node, f"splits {L.width} channels into heads {factors[-2]}->{TH.width} of {factors[-1]}")

