"""Functional convolutions and linears: ``F.conv1d/2d/3d(x, w, b, ...)`` (``torch.conv2d``, ...) and
``F.linear(x, w, b)`` follow the rules of their modules (``producers.DenseRule``: dense, depthwise and
grouped), whatever holds the weight.

* A parameter, directly or through reshapes and dtype casts (``self.w.view(o, i, 1, 1)``, ``.to(x.dtype)``): the
  teacher widens the parameter itself, as for the module, and the ParamMap reads the student's slice back.
* A buffer, or any tensor computed without the input and without parameters (a fixed blur or Sobel kernel): the
  teacher computes it at the student's size and gathers it to its own channels in the graph (rows per output
  channel, columns per input channel times their fan-in scale), exact by construction.
* A weight (or bias) computed from parameters by other ops (weight standardisation, NF-Nets' scaled weights,
  BEiT's ``cat((q_bias, k_bias, v_bias))``), or a parameter other ops use as well: the teacher computes it from the
  student-sized parameters, as the student does, and gathers it like a constant. Exact (widening the parameter
  would change what those ops compute over its fan-in), but the teacher has no extra weights in that layer, which
  ``--explain`` says. A weight that depends on the input is refused once widened channels reach the layer.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..analyze import node_label, source_line
from ..errors import RuleError
from ..layout import Layout
from .params import _CHAIN_FUNCTIONS, _CHAIN_METHODS, _chain_to_param, _is_param, _run
from .producers import ChannelwiseLinear, dense_bias, dense_weight
from .registry import Rule, register_function_rule

_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_LINEAR = ("input", "weight", "bias")
_SHAPE_OPS = _CHAIN_METHODS | _CHAIN_FUNCTIONS
_CASTS = ("to", "type_as", "float")  # chain ops re-emitted on the teacher's weight (reshapes are recomputed)


@dataclass(frozen=True)
class _Held:
    """A functional layer's weight or bias: a parameter (its name, the get_attr and shape-only ops from it to the
    layer, and its dims that are the layer's output and input dims) or, with ``param`` None, a constant."""

    param: str | None
    chain: tuple = ()
    dims: tuple = ()
    why: str = ""  # why a weight computed from parameters is gathered rather than widened


def _value(v):
    return v.meta.get("gpdc.value") if isinstance(v, fx.Node) else v


def _op_name(n: fx.Node) -> str:
    if n.op == "call_method":
        return f"'.{n.target}()'"
    return f"'{getattr(n.target, '__name__', n.target)}'"


def _from_params(t: fx.Node, an) -> tuple[list[str], list[fx.Node]]:
    """(parameters, ops between them and ``t``) among ``t``'s ancestors, in graph order."""
    ancestors, stack = set(), [t]
    while stack:
        n = stack.pop()
        if n not in ancestors:
            ancestors.add(n)
            stack.extend(n.all_input_nodes)
    reach: dict[fx.Node, bool] = {}
    for n in an.gm.graph.nodes:
        if n in ancestors:
            reach[n] = (n.op == "get_attr" and _is_param(an.gm, n.target)) or any(reach[a] for a in n.all_input_nodes)
    params = [n.target for n in reach if reach[n] and n.op == "get_attr"]
    return params, [n for n in reach if reach[n] and n.op.startswith("call")]


def _runs_along(final: torch.Tensor, shape: torch.Size, d: int, k: int) -> bool:
    """Whether dim ``d`` of a parameter of ``shape`` runs 0..n-1 along dim ``k`` of ``final`` (the parameter's
    element indices after the chain) and along no other dim."""
    if shape[d] != final.shape[k]:
        return False
    coord = torch.as_tensor(np.unravel_index(final.numpy(), tuple(shape))[d])
    return bool((coord == torch.arange(shape[d]).view([-1] + [1] * (final.dim() - k - 1))).all())


def _param_held(layer: fx.Node, chain: list[fx.Node], n_dims: int, an) -> _Held | str:
    """The parameter at the head of ``chain``, if the layer is its only user and the chain only reshapes it so
    that the layer's first ``n_dims`` dims are whole dims of the parameter, in order; else why not."""
    target = chain[0].target
    p = an.gm.get_parameter(target)
    nxt = chain[1] if len(chain) > 1 else layer
    others = [n.name for n in an.gm.graph.nodes if n is not chain[0] and (
        n.op == "get_attr" and n.target == target or n.op == "call_module" and target.startswith(n.target + "."))]
    others += [u.name for u in chain[0].users if u is not nxt] + [u.name for u in chain[-1].users if u is not layer]
    if others:
        return (f"is parameter '{target}', which other nodes use as well ({', '.join(dict.fromkeys(others[:3]))}); "
                "gpdc widens a parameter for one layer only")
    mixed = (f"is parameter '{target}' reshaped so that the layer's channel dims are not whole dims of it; reshape "
             "it so its output and input channels stay dims of their own")
    final = torch.arange(p.numel()).view(p.shape)
    for n in chain[1:]:
        final = _run(n, final)
    if not torch.equal(final.flatten(), torch.arange(p.numel())):  # a broadcast, not a reshape
        return mixed
    dims = []
    for k in range(n_dims):
        d = next((d for d in range(dims[-1] + 1 if dims else 0, p.dim()) if _runs_along(final, p.shape, d, k)), None)
        if d is None:
            return mixed
        dims.append(d)
    return _Held(target, tuple(chain), tuple(dims))


def _held(layer: fx.Node, t: fx.Node, n_dims: int, an) -> _Held | str:
    """Where a weight or bias comes from (see the module docs), or why gpdc cannot widen it."""
    chain = _chain_to_param(t)
    if chain is not None and _is_param(an.gm, chain[0].target):
        held = _param_held(layer, chain, n_dims, an)
        return held if isinstance(held, _Held) else _Held(None, why=held)
    if an.depends_on_input(t):
        return "depends on the model's input (a dynamic weight), so gpdc cannot widen it ahead of time"
    params, ops = _from_params(t, an)
    if not params:
        return _Held(None)
    names = ", ".join(dict.fromkeys(_op_name(n) for n in ops if n.target not in _SHAPE_OPS)) or "reshapes"
    return _Held(None, why=f"is computed from parameter '{params[0]}' by {names}")


def _moved(t: torch.Tensor, dims: tuple, fn) -> torch.Tensor:
    """``fn`` applied to ``t`` with ``dims`` moved to the front, moved back."""
    front = tuple(range(len(dims)))
    return fn(t.movedim(dims, front)).movedim(front, dims)


@dataclass(frozen=True)
class Kept:
    """A layer on unwidened input whose weight cannot widen: its output opens no space."""


@dataclass(frozen=True)
class FunctionalLayer:
    """A functional conv or linear: its input and output layouts and where its weight and bias come from."""

    inp: Layout
    out: Layout
    weight: _Held
    bias: _Held | None
    kind = "layer"


@dataclass(frozen=True)
class FunctionalDense(FunctionalLayer):
    kind = "dense"


@dataclass(frozen=True)
class FunctionalDepthwise(FunctionalLayer):
    kind = "depthwise"


@dataclass(frozen=True)
class FunctionalGrouped(FunctionalLayer):
    kind = "grouped"


class FunctionalDenseRule(Rule):
    """``F.conv*d`` and ``F.linear``: open a new channel space, like ``DenseRule`` for the modules."""

    opens_space = True

    def __init__(self, names: tuple[str, ...]):
        self.names = names  # the function's parameters, in order

    def _arg(self, node: fx.Node, name: str, default=None):
        i = self.names.index(name)
        return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)

    def analyze(self, node: fx.Node, an):
        x, w, b = (self._arg(node, k) for k in ("input", "weight", "bias"))
        linear = "groups" not in self.names
        groups = 1 if linear else _value(self._arg(node, "groups", 1))
        cout, cin = w.meta["gpdc.shape"][0], w.meta["gpdc.shape"][1] * groups
        cdim = len(x.meta["gpdc.shape"]) - 1 if linear else 1
        L = an.layout_of(x)
        if L is not None and not isinstance(L, Layout):
            raise RuleError(f"layer {node_label(node)} receives a tensor whose channel dim is split across dims; "
                            "reshape it back first.")
        if L is not None and L.dim != cdim:
            if not linear:
                raise RuleError(f"convolution {node_label(node)} expects channels in dim 1, but its input carries them "
                                f"in dim {L.dim}.")
            an.record(node, ChannelwiseLinear(L))  # a linear over a non-channel dim acts on each channel alike
            return L
        n_dims = 2 if groups == 1 else 1
        held = {"weight": _held(node, w, n_dims, an), "bias": _held(node, b, 1, an) if isinstance(b, fx.Node) else None}
        refused = next(((k, h) for k, h in held.items() if isinstance(h, str)), None)
        if refused and L is None:
            an.record(node, Kept())  # its output opens no space: the layer keeps its width
            return None
        if refused:
            raise RuleError(self._refusal(node, *refused))
        if L is None:
            L = an.pinned_layout(node, cdim, cin, "input that is not widened (e.g. the data input)")
        kind, out = self._kind(node, an, L, cin, cout, groups, cdim)
        an.record(node, kind(L, out, held["weight"], held["bias"]))
        return out

    @staticmethod
    def _kind(node: fx.Node, an, L: Layout, cin: int, cout: int, groups: int, cdim: int):
        if groups == 1:
            return FunctionalDense, Layout.of_space(cdim, an.new_space(cout, node), cout)
        if groups == cin == cout:
            return FunctionalDepthwise, an.aligned_space(L, node)  # new channels that widen like their inputs
        if np.any(L.sub):
            raise RuleError(f"grouped convolution {node_label(node)} receives flattened features; not supported.")
        out = Layout.of_space(cdim, an.new_space(cout, node), cout)
        an.set_quantum(out, cout // groups, node)
        an.set_quantum(L, cin // groups, node)
        return FunctionalGrouped, out

    @staticmethod
    def _refusal(node: fx.Node, what: str, why: str) -> str:
        name = "torch.nn.functional.linear" if node.target is F.linear else f"torch.{node.target.__name__}"
        line = f" Source: {source_line(node)}." if source_line(node) else ""
        return (f"{name} at node {node_label(node)} receives widened channels, but its {what} {why}.{line} Pass the "
                "parameter itself to the layer (reshapes and dtype casts are fine), use a module gpdc has a rule for "
                f"(nn.Conv2d, nn.Linear; timm's StdConv2d for weight standardisation), or register a rule with "
                f"gpdc.register_function_rule({name}, rule).")

    # -- expand ---------------------------------------------------------------------------------
    def expand(self, node: fx.Node, ex) -> None:
        facts = ex.facts(node)
        if isinstance(facts, (ChannelwiseLinear, Kept)):
            ex.emit_copy(node, ex.tl.get(self._arg(node, "input")) if isinstance(facts, ChannelwiseLinear) else None)
            return
        L = facts.inp
        TI = ex.tin(self._arg(node, "input"), L)
        x, w, b = (ex.arg(self._arg(node, k)) for k in ("input", "weight", "bias"))
        if isinstance(facts, FunctionalDense):
            TO = ex.canonical(facts.out)
            w, b = self._dense(node, ex, facts, TI, TO, w, b)
            new = {}
        elif isinstance(facts, FunctionalDepthwise):
            TO = ex.aligned_teacher(L, TI, facts.out)
            pos = ex.student_pos(L, TI)
            w, b = (self._rows(node, ex, h, t, pos, TI.positions_of(ex.keys(L))) for h, t in ((facts.weight, w), (facts.bias, b)))
            new = {"groups": TI.width}
        else:
            TO = ex.canonical(facts.out)
            x, groups = self._grouped_input(node, ex, facts, TI, TO, x)
            rows = TO.positions_of(ex.keys(facts.out))
            w, b = (self._rows(node, ex, h, t, TO.index, rows) for h, t in ((facts.weight, w), (facts.bias, b)))
            new = {"groups": groups}
        args, kwargs = self._teacher_args(node, ex, input=x, weight=w, bias=b, **new)
        ex.env[node] = ex.graph.create_node("call_function", node.target, args, kwargs, node.name)
        ex.tl[node] = TO
        held = facts.weight
        source = (f"parameter '{held.param}'" if held.param else
                  f"gathered at the student's size: it {held.why} (exact; no extra weights in this layer)" if held.why
                  else "a constant, gathered")
        ex.log(node, f"functional {facts.kind}: {L.width}->{TI.width} in, {facts.out.width}->{TO.width} out; "
                     f"weight {source}")

    def _dense(self, node: fx.Node, ex, facts: FunctionalDense, TI, TO, w, b):
        L, Lout = facts.inp, facts.out
        cols, scale = ex.student_pos(L, TI), ex.fanin_scale(TI)
        rows, in_pos = TO.positions_of(ex.keys(Lout)), TI.positions_of(ex.keys(L))
        held = facts.weight
        if held.param:
            w = _emit_param(ex, held, lambda t: dense_weight(ex, t, TO.index, TO, cols, scale),
                            index={0: rows, 1: in_pos}, scale={1: 1.0 / scale[in_pos]})
        else:
            w = ex.index_select(node, ex.index_select(node, w, 0, TO.index), 1, cols)
            shape = [1, -1] + [1] * (len(self._arg(node, "weight").meta["gpdc.shape"]) - 2)
            w = ex.graph.call_function(operator.mul, (w, ex.buffer(node, "fanin_scale", torch.as_tensor(
                scale, dtype=torch.float32).view(shape))))
        held = facts.bias
        if held is not None and held.param:
            b = _emit_param(ex, held, lambda t: dense_bias(ex, t, TO.index, TO.copy), index={0: rows})
        elif held is not None:
            b = ex.index_select(node, b, 0, TO.index)
        return w, b

    @staticmethod
    def _rows(node: fx.Node, ex, held: _Held | None, t, rows_student: np.ndarray, rows: np.ndarray):
        """A depthwise or grouped layer's weight or bias: its student rows per teacher output channel, unscaled."""
        if held is None:
            return t
        if held.param:
            idx = torch.as_tensor(rows_student)
            return _emit_param(ex, held, lambda p: p.index_select(0, idx), index={0: rows})
        return ex.index_select(node, t, 0, rows_student)

    def _grouped_input(self, node: fx.Node, ex, facts: FunctionalGrouped, TI, TO, x):
        """Teacher group g computes student group sigma(g) from one copy of its inputs (as ``DenseRule``)."""
        L, Lout = facts.inp, facts.out
        groups = _value(self._arg(node, "groups"))
        a, b = L.width // groups, Lout.width // groups
        in_keys = ex.keys(L)
        gather = []
        for g in range(TO.width // b):
            sigma, c = TO.index[g * b] // b, TO.copy[g * b]
            want = in_keys[sigma * a: (sigma + 1) * a]
            gather.append(TI.positions_of(want, copy=c if np.isin(want, TI.keys[TI.copy == c]).all() else 0))
        gather = np.concatenate(gather)
        if not np.array_equal(gather, np.arange(TI.width)):
            x = ex.index_select(node, x, 1, gather)
            ex.log(node, f"grouped convolution reads {len(gather)} of {TI.width} input channels through a gather")
        return x, TO.width // b

    def _teacher_args(self, node: fx.Node, ex, **new):
        args, kwargs = list(ex.arg(node.args)), dict(ex.arg(node.kwargs))
        for name, v in new.items():
            i = self.names.index(name)
            if i < len(args):
                args[i] = v
            elif v is not None:
                kwargs[name] = v
        return tuple(args), kwargs


def _emit_param(ex, held: _Held, fn, index: dict, scale: dict | None = None) -> fx.Node:
    """Widen the parameter (``fn`` sees its layer dims first), record how the student reads it back, and emit the
    teacher's weight: the parameter, reshaped like the student's chain, with the chain's dtype casts."""
    t = _moved(ex.parameter(held.param).detach(), held.dims, fn)
    ex.set_parameter(held.param, t, index={held.dims[k]: v for k, v in index.items()},
                     scale={held.dims[k]: v for k, v in (scale or {}).items()})
    out = ex.graph.get_attr(held.param)
    final = list(held.chain[-1].meta["gpdc.shape"])
    for k, d in enumerate(held.dims):
        final[k] = t.shape[d]
    if tuple(final) != tuple(t.shape):
        out = ex.graph.call_method("reshape", (out, tuple(final)))
    for n in held.chain[1:]:
        if n.op == "call_method" and n.target in _CASTS:
            out = ex.graph.create_node(n.op, n.target, (out, *ex.arg(tuple(n.args[1:]))), ex.arg(n.kwargs))
    return out


for _fn in (F.conv1d, F.conv2d, F.conv3d):
    register_function_rule(_fn, FunctionalDenseRule(_CONV))
register_function_rule(F.linear, FunctionalDenseRule(_LINEAR))
