"""Literal shapes in the teacher graph: a view/reshape that names the channel count gets the teacher's."""

from __future__ import annotations

import torch
import torch.fx as fx


def is_reshape(node: fx.Node) -> bool:
    """view/reshape, whose literal sizes may name the channel count."""
    return node.target in ("view", "reshape") or node.target is torch.reshape


def patch_shape(node: fx.Node, TO, ex):
    """view/reshape args with the channel-dim size replaced by the teacher's (unless it is -1)."""
    args = list(node.args)
    shape_args = args[1:]
    packed = len(shape_args) == 1 and isinstance(shape_args[0], (list, tuple))
    sizes = list(shape_args[0]) if packed else shape_args
    d = TO.dim
    if d < len(sizes) and not (isinstance(sizes[d], int) and sizes[d] == -1):
        sizes[d] = TO.width
    new = [ex.arg(args[0])] + ([type(shape_args[0])(ex.arg(sizes))] if packed else list(ex.arg(sizes)))
    return tuple(new)
