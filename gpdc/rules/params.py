"""Parameters that follow a channel map: class tokens, position embeddings, layer scales, and the
affine weights of functional norms (``F.layer_norm(x, s, self.weight, self.bias)``).

Such a tensor is a ``get_attr`` node, possibly reshaped or broadcast on the way (``gamma.view(1, -1,
1, 1)``, ``cls_token.expand(B, -1, -1)``), that meets widened channels channel for channel. Instead of
pinning the channels (as an unwidened data tensor would), the parameter takes the layout of the
tensor it meets: its teacher copy is indexed along the matching dim like that tensor, and the
student reads the first copies back. Which dim of the parameter carries the channels is found by
running the chain of ops on a tensor of element indices (no assumption about names or shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..errors import RuleError
from ..layout import Layout
from .registry import Rule
from .shapes import is_reshape, patch_shape

_CHAIN_METHODS = {"expand", "expand_as", "reshape", "view", "to", "type_as", "contiguous", "unsqueeze", "float",
                  "clone", "squeeze", "flatten"}
_CHAIN_FUNCTIONS = {torch.reshape, torch.unsqueeze, torch.flatten, torch.squeeze}


def is_shape_only(node: fx.Node) -> bool:
    """A reshape, broadcast or dtype cast (what may lie between a parameter and where it meets the channels)."""
    return (node.op == "call_method" and node.target in _CHAIN_METHODS) or (
        node.op == "call_function" and node.target in _CHAIN_FUNCTIONS)


def _chain_to_param(node: fx.Node):
    """[get_attr, op, op, ..., node] if ``node`` is computed from one parameter by shape-only ops."""
    chain = [node]
    while node.op != "get_attr":
        tensor_args = [a for a in node.args if isinstance(a, fx.Node) and a.meta.get("gpdc.shape") is not None]
        if not is_shape_only(node) or len(tensor_args) != 1 or len(node.users) != 1 and node is not chain[0]:
            return None
        node = tensor_args[0]
        chain.append(node)
    return chain[::-1]


def _run(node: fx.Node, x: torch.Tensor) -> torch.Tensor:
    """Apply the shape-only op ``node`` to ``x`` (a tensor of parameter element indices)."""
    def value(a):
        if isinstance(a, fx.Node):
            return x if a is node.args[0] else a.meta.get("gpdc.value")
        if isinstance(a, (list, tuple)):
            return type(a)(value(v) for v in a)
        return a

    args, kwargs = value(node.args), {k: value(v) for k, v in node.kwargs.items()}
    if node.op == "call_method":
        if node.target in ("to", "type_as", "float"):
            return x
        if node.target == "expand_as":
            return x.expand(node.args[1].meta["gpdc.shape"])
        return getattr(x, node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def follow(node: fx.Node, L: Layout, partner: fx.Node, an) -> Layout | None:
    """Give the parameter-only tensor ``node`` the channels ``L`` (its layout where it meets
    ``partner``'s channels); None if ``node`` is not such a tensor."""
    chain = _chain_to_param(node) if isinstance(node, fx.Node) else None
    if chain is None:
        return None
    param = an.gm.get_parameter(chain[0].target) if _is_param(an.gm, chain[0].target) else None
    if param is None:
        return None
    outs = [torch.arange(param.numel()).view(param.shape)]
    for n in chain[1:]:
        outs.append(_run(n, outs[-1]))
    out = outs[-1]
    if out.dim() <= L.dim or out.shape[L.dim] != L.width:
        return None
    d = next((d for d in range(param.dim()) if _channel_dim(out, param.shape, d, L.width) == L.dim), None)
    if d is None:
        return None
    dims = [_channel_dim(o, param.shape, d, L.width) for o in outs]
    if any(k is None for k in dims):
        raise RuleError(f"parameter '{chain[0].target}' meets widened channels, but a reshape on its way mixes its "
                        "channel dim with other dims; reshape it so the channel dim stays one dim.")
    first = an.facts(chain[0])
    if first is not None:  # a parameter used twice: both uses must see the same channels
        if first.dim != d:
            raise RuleError(f"parameter '{chain[0].target}' meets widened channels along two different dims.")
        an.couple(an.layout_of(chain[0]), L.with_dim(d), partner)
    for n, k in zip(chain, dims):
        if an.facts(n) is None:
            an.assign(n, L.with_dim(k), FOLLOW)
            an.record(n, Follows(partner, d) if n is chain[0] else ShapeOfFollower())
    return L


def _channel_dim(out: torch.Tensor, shape, d: int, width: int) -> int | None:
    """The dim of ``out`` (a tensor of element indices of a parameter of ``shape``) along which the
    parameter's dim ``d`` runs 0..width-1, with every other dim of ``out`` not touching dim d."""
    if shape[d] != width:
        return None
    coord = torch.as_tensor(np.unravel_index(out.numpy(), tuple(shape))[d])
    for k in range(out.dim()):
        if out.shape[k] == width:
            want = torch.arange(width).view([-1] + [1] * (out.dim() - k - 1))
            if bool((coord == want).all()):
                return k
    return None


def _is_param(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


@dataclass(frozen=True)
class Follows:
    """A parameter that takes the channels of ``partner`` along its dim ``dim``."""

    partner: fx.Node
    dim: int


@dataclass(frozen=True)
class ShapeOfFollower:
    """A shape-only op on the way from a following parameter to where it meets the channels."""


class FollowRule(Rule):
    """Expand a following parameter (get_attr) and the shape-only ops applied to it. ``follow`` assigns their
    layouts when the parameter meets the channels; ``SinkParameterChains`` (``passes/sink.py``) has put each such
    chain just before its consumer, so the partner's teacher layout is known when the chain expands."""

    def analyze(self, node: fx.Node, an):  # layouts are assigned by follow()
        return an.layout_of(node)

    def expand(self, node: fx.Node, ex) -> None:
        if node.op != "get_attr":
            TI = ex.tl[node.args[0]]
            TO = TI.take(slice(None), dim=ex.layout(node).dim)
            ex.emit_copy(node, TO, args=patch_shape(node, TO, ex) if is_reshape(node) else None)
            return
        facts: Follows = ex.facts(node)
        L = ex.layout(node)
        partner = ex.tl.get(facts.partner)
        if partner is None and len(L.spaces()) > 1:
            raise RuleError(f"parameter '{node.target}' follows channels of several spaces but is used before them; "
                            "use it only after the activation it is combined with.")
        T = partner.take(slice(None), dim=facts.dim) if partner is not None else ex.canonical(L.with_dim(facts.dim))
        pos = torch.as_tensor(ex.student_pos(L, T))
        ex.set_parameter(node.target, ex.parameter(node.target).detach().index_select(facts.dim, pos),
                         index={facts.dim: T.positions_of(ex.keys(L))})
        ex.env[node] = ex.graph.get_attr(node.target)
        ex.tl[node] = T
        ex.log(node, f"parameter follows the channels of '{facts.partner.name}': {L.width}->{T.width} along dim {facts.dim}")


FOLLOW = FollowRule()
