"""The fallback channel rule: an op without a registered rule is probed instead of refused.

Plain math needs no hand-written rule. An op with no rule (``x.pow(2)``, a softmax over a spatial dim,
``torch.erf``, a user's activation function, a module without parameters or buffers) is run on small random
tensors and checked for the one property the teacher relies on: it *commutes with channel maps*. With the
channel dim of every input that carries channels permuted, widened by duplicates (``replicate``) and widened
by fresh channels (``grow``), each output must be the original output indexed the same way along one dim, or
not change at all if it carries no channels. Such an op acts on each channel alike, so the teacher runs it
unchanged on its wider tensors and stays exact, as ``elementwise.ChannelwiseRule`` and ``BinaryRule`` do; several
inputs that carry channels are coupled like ``BinaryRule`` couples them.

An output may also hold ``k`` entries per channel along its channel dim (``F.unfold``: channel-major blocks;
``x.repeat``: block-major): its layout then gives each entry a sub-position.

An op that fails the probe (it mixes, sorts, reduces or reads across channels, or cannot run on probe tensors)
runs at the student's width with what the probe found as the reason (``gpdc.rules.student_width``); a random op
is refused, since no teacher can match it. Verdicts are cached per op, non-tensor arguments and input
signature, so repeated nodes are probed once.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..analyze import flatten_layouts, node_label, source_line
from ..errors import RuleError, UnmatchableError
from ..layout import Layout, TeacherLayout
from .params import follow
from .registry import Rule
from .student_width import StudentWidth, expand_at_student_width, run_at_student_width

SHRINK = 3  # probe tensors keep the channel dim and at most this many entries along every other dim
KEEP_VALUES = 1 << 16  # example values of integer and bool tensors up to this size are kept (indices, masks)
_TOL = {torch.float64: 1e-9, torch.complex128: 1e-9, torch.float32: 1e-5, torch.complex64: 1e-5}


# -- what the student computes: dtypes, container types and small integer values ------------------

@dataclass(frozen=True)
class _TensorInfo:
    dtype: torch.dtype
    value: torch.Tensor | None  # kept for small integer and bool tensors (indices, masks)


@dataclass(frozen=True)
class _Struct:
    kind: type  # tuple, list, a namedtuple or a torch.return_types structseq
    items: tuple


def _skeleton(v):
    if isinstance(v, torch.Tensor):
        keep = not (v.is_floating_point() or v.is_complex()) and v.numel() <= KEEP_VALUES
        return _TensorInfo(v.dtype, v.detach().clone() if keep else None)
    if isinstance(v, (tuple, list)):
        return _Struct(type(v), tuple(_skeleton(x) for x in v))
    return None


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.seen: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.seen[n] = _skeleton(out)
        return out


_EXAMPLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _examples(gm: fx.GraphModule) -> dict:
    """Per node, what shape propagation does not keep: dtypes, container types (``torch.return_types.max``) and
    small integer values, from one run of the student on a random input. Nodes after a failing op are missing;
    the probe then takes their tensors to be floating point."""
    if gm not in _EXAMPLES:
        rec = _Recorder(gm)
        dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.float32)
        g = torch.Generator().manual_seed(0)
        try:
            inputs = [torch.randn(n.meta["gpdc.shape"], generator=g, dtype=dtype)
                      for n in gm.graph.nodes if n.op == "placeholder"]
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                rec.run(*inputs)
        except Exception:  # noqa: BLE001 -- the user's model; whatever ran before the failure is recorded
            pass
        _EXAMPLES[gm] = rec.seen
    return _EXAMPLES[gm]


def known_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The value of an integer or bool tensor of the student (an index or a mask), if small enough to keep."""
    info = _examples(gm).get(node)
    return info.value if isinstance(info, _TensorInfo) else None


# -- the op's inputs ---------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class _Leaf:
    """One tensor among an op's inputs: its node, its index path inside the node's value (``()`` for a plain
    tensor), shape, student layout, example info, and the dim the probe maps (None: held fixed)."""

    node: fx.Node
    path: tuple
    shape: tuple
    layout: object
    info: _TensorInfo | None
    dim: int | None = None


def _is_shape(s) -> bool:
    return isinstance(s, tuple) and all(isinstance(d, int) for d in s)


def _shape_leaves(s, path: tuple = ()):
    """(path, shape) of every tensor in a ``gpdc.shape`` structure, in order."""
    if _is_shape(s):
        yield path, s
    elif isinstance(s, tuple):
        for i, x in enumerate(s):
            yield from _shape_leaves(x, path + (i,))


def _at(v, path: tuple):
    """The entry at ``path`` of a nested tuple of layouts or of an example skeleton (None if absent)."""
    for i in path:
        items = v.items if isinstance(v, _Struct) else v
        if not isinstance(items, (tuple, list)) or i >= len(items):
            return None
        v = items[i]
    return v


def _leaves(node: fx.Node, an) -> list[_Leaf]:
    examples = _examples(an.gm)
    return [_Leaf(a, path, shape, _at(an.layout_of(a), path), _at(examples.get(a), path))
            for a in node.all_input_nodes if a.meta.get("gpdc.shape") is not None
            for path, shape in _shape_leaves(a.meta["gpdc.shape"])]


def _roles(node: fx.Node, an, leaves: list[_Leaf]) -> tuple[_Leaf, list[_Leaf]]:
    """The reference input (whose channels the output follows) and every input with the dim the probe maps:
    its channel dim, or for an unwidened tensor the dim where it broadcasts onto the channels, as in
    ``BinaryRule``. A tensor whose channel dim is 1 broadcasts and is held fixed."""
    carried = [lf for lf in leaves if lf.layout is not None]
    if any(not isinstance(lf.layout, Layout) for lf in carried):
        raise RuleError(f"node {node_label(node)} receives a tensor whose channel dim is split across dims (a reshape "
                        "such as a channel shuffle); gpdc only follows such reshapes through other reshapes/transposes.")
    ref = next((lf for lf in carried if lf.shape[lf.layout.dim] > 1), carried[0])
    C, rdim, rnd = ref.layout.width, ref.layout.dim, len(ref.shape)
    roles = []
    for lf in leaves:
        if isinstance(lf.layout, Layout):
            d = None if lf.shape[lf.layout.dim] == 1 and C > 1 else lf.layout.dim
            if d is not None and lf.layout.width != C:
                raise RuleError(_refusal(node, an, f"it combines tensors with different channel counts ({C} and "
                                                   f"{lf.layout.width}) channel by channel"))
        else:
            d = rdim - (rnd - len(lf.shape))
            d = d if 0 <= d < len(lf.shape) and lf.shape[d] == C and C > 1 else None
        roles.append(replace(lf, dim=d))
    return roles[leaves.index(ref)], roles


# -- the probe -----------------------------------------------------------------------------------------

class _Unfit(Exception):
    """The op did not run on these probe tensors (or returned another structure); ``widened``: only once its
    channel dim was widened."""

    def __init__(self, message: str, widened: bool = False):
        super().__init__(message)
        self.widened = widened


def call_node(node: fx.Node, an, args, kwargs):
    """Run the op of ``node`` on ``args`` (its module, method or function)."""
    if node.op == "call_module":
        return an.module(node)(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _tensor_leaves(v) -> list[torch.Tensor]:
    """Tensors of an output in the order of ``_shape_leaves`` (dicts, like shape propagation, hold none)."""
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in _tensor_leaves(x)]
    return []


def _rebuild(kind: type, items: tuple):
    if kind in (tuple, list):
        return kind(items)
    if hasattr(kind, "_fields"):  # namedtuple
        return kind(*items)
    return kind(items)  # torch.return_types structseq


def _assemble(shape, skeleton, values: dict, path: tuple = ()):
    """The value of a tuple-valued input (e.g. ``torch.unbind``'s output fed to ``torch.stack``) from its leaves."""
    if _is_shape(shape):
        return values[path]
    items = tuple(None if s is None else _assemble(s, _at(skeleton, (i,)), values, path + (i,))
                  for i, s in enumerate(shape))
    return _rebuild(skeleton.kind if isinstance(skeleton, _Struct) else tuple, items)


def _random(lf: _Leaf, shape: tuple, f64: bool, g: torch.Generator) -> torch.Tensor:
    dtype = lf.info.dtype if lf.info is not None else torch.float32
    if dtype.is_floating_point or dtype.is_complex:
        if f64:
            dtype = torch.complex128 if dtype.is_complex else torch.float64
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if lf.info.value is not None:
        return lf.info.value[tuple(slice(0, s) for s in shape)].clone()
    return torch.randint(0, 2, shape, generator=g, dtype=dtype)


def _fresh(v: torch.Tensor, dim: int, g: torch.Generator) -> torch.Tensor:
    """Other values for a tensor's channels: random, or for integers its channels shuffled (valid indices)."""
    if v.is_floating_point() or v.is_complex():
        return torch.randn(v.shape, generator=g, dtype=v.dtype)
    if v.dtype == torch.bool:
        return torch.rand(v.shape, generator=g) < 0.5
    return v.index_select(dim, torch.randint(0, v.shape[dim], (v.shape[dim],), generator=g))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values: exactly for integers and bools, within the dtype's rounding for floats
    (relative to ``max(1, max|b|)``, NaN where both are NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not (a.is_floating_point() or a.is_complex()):
        return torch.equal(a, b)
    finite = b[b.isfinite()].abs()
    scale = max(1.0, float(finite.max())) if finite.numel() else 1.0
    tol = _TOL.get(a.dtype, 1e-2) * scale
    return bool(((a - b).abs() <= tol).logical_or(a == b).logical_or(a.isnan() & b.isnan()).all())


def _positions(spec, index: torch.Tensor, width: int) -> torch.Tensor:
    """Positions along an output's channel dim holding the channels ``index`` (of a tensor of ``width``)."""
    if spec[0] == "dim":
        return index
    _, _, k, order = spec
    lane = torch.arange(k)
    if order == "channel":
        return (index[:, None] * k + lane).reshape(-1)
    return (lane[:, None] * width + index[None, :]).reshape(-1)


def _expected(y: torch.Tensor, spec, index: torch.Tensor, width: int) -> torch.Tensor:
    """The output for inputs whose channels are mapped by ``index``, if the op acts on each channel alike."""
    return y if spec is None else y.index_select(spec[1], _positions(spec, index, width))


def _spec(y: torch.Tensor, yw: torch.Tensor, index: torch.Tensor, C: int):
    """Where an output carries the channels, from its shape for C and for ``len(index)`` channels: None (it
    carries none), ("dim", d), ("blocks", d, k, order), or "moved" (its shape changes otherwise)."""
    if y.dim() != yw.dim():
        return "moved"
    diff = [d for d in range(y.dim()) if y.shape[d] != yw.shape[d]]
    if len(diff) > 1:
        return "moved"
    if not diff:
        return None
    d, a, b = diff[0], y.shape[diff[0]], yw.shape[diff[0]]
    if (a, b) == (C, len(index)):
        return ("dim", d)
    k = a // C
    if a % C or k < 2 or b != k * len(index):
        return "moved"
    blocks = [("blocks", d, k, order) for order in ("channel", "block")]
    return next((s for s in blocks if _same(yw, _expected(y, s, index, C))), blocks[0])


_MOVED = ("its output changes shape in other ways than along one channel dim when channels are added: it moves "
          "channels into other dims or splits them into several tensors")
_FAILS = "it fails on probe tensors"
_WIDENED = ("with more channels", "with fresh channels")  # the probe runs that widen the channel dim
_RANDOM = "it returns different results for the same input: it is random, so the teacher cannot match the student"


@dataclass(frozen=True)
class _Mixing:
    """The finding for an op that runs but does not act on each channel alike, with where its outputs carry the
    channel dim (``_spec``)."""

    finding: str
    specs: tuple
_REDUCES = ("one of its outputs has no channel dim but depends on the channels: it reduces over the channel dim "
            "(like a sum, maximum or norm over channels)")
_FINDINGS = (
    "its output does not follow a permutation of the channel dim: it mixes channels (like a softmax, cumulative "
    "sum, sort or flip over channels)",
    "its output changes when channels are duplicated: it depends on how many channels there are (like a norm or "
    "mean over channels)",
    "its output on one channel changes when other channels change: it reads across channels (like a maximum over "
    "channels)",
)


class _Probe:
    """Runs one op on probe tensors and tells where its outputs carry the channels, or what is wrong."""

    def __init__(self, node: fx.Node, an, leaves: list[_Leaf], C: int):
        self.node, self.an, self.leaves, self.C = node, an, leaves, C
        self.examples = _examples(an.gm)
        self.g = torch.Generator().manual_seed(0)
        self.runs = 0

    def verdict(self):
        """Per output tensor the channel spec, or a finding (str). Small float64 tensors first; the real shapes
        and dtypes when the op cannot run on those."""
        failures = []
        for shrink, f64 in self._attempts():
            try:
                return self._judge(self._inputs(shrink, f64))
            except _Unfit as e:
                failures.append(e)
        widened = next((e for e in failures if e.widened), None)
        if widened is not None:
            return (f"it fails once its channel dim widens ({widened}): it depends on the number of channels (like a "
                    "reshape to a fixed channel count)")
        return f"{_FAILS} ({failures[0]})"

    def _attempts(self) -> list[tuple[bool, bool]]:
        shrinks = any(s > SHRINK for lf in self.leaves for k, s in enumerate(lf.shape) if k != lf.dim)
        casts = any(lf.info is None or lf.info.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.complex64)
                    for lf in self.leaves)
        return [(s, f) for f in ((True, False) if casts else (True,)) for s in ((True, False) if shrinks else (False,))]

    def _inputs(self, shrink: bool, f64: bool) -> dict[_Leaf, torch.Tensor]:
        return {lf: _random(lf, tuple(s if k == lf.dim or not shrink else min(s, SHRINK) for k, s in enumerate(lf.shape)),
                            f64, self.g) for lf in self.leaves}

    def _run(self, X: dict[_Leaf, torch.Tensor], when: str) -> list[torch.Tensor]:
        """The op's output tensors on clones of ``X`` (in-place ops stay harmless), each run with its own seed."""
        by_node: dict[fx.Node, dict] = {}
        for lf, v in X.items():
            by_node.setdefault(lf.node, {})[lf.path] = v.clone()

        def value(a: fx.Node):
            if a in by_node:
                return _assemble(a.meta["gpdc.shape"], self.examples.get(a), by_node[a])
            return a.meta.get("gpdc.value")

        self.runs += 1
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(self.runs)
                out = call_node(self.node, self.an, fx.node.map_arg(self.node.args, value),
                            fx.node.map_arg(self.node.kwargs, value))
        except Exception as e:  # noqa: BLE001 -- the op is the user's; its failure is the finding
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise _Unfit(f"{when}: {type(e).__name__}: {first}", widened=when in _WIDENED) from None
        return _tensor_leaves(out)

    def _mapped(self, X: dict, index: torch.Tensor, fresh: torch.Tensor | None = None) -> dict:
        """``X`` with the channels of every mapped input indexed by ``index``; positions in ``fresh`` get new values."""
        out = {}
        for lf, v in X.items():
            if lf.dim is not None:
                v = v.index_select(lf.dim, index)
                if fresh is not None:
                    v = torch.where(fresh.view([-1] + [1] * (v.dim() - lf.dim - 1)), _fresh(v, lf.dim, self.g), v)
            out[lf] = v
        return out

    def _judge(self, X: dict):
        Y = self._run(X, "on probe tensors")
        want = [len(s) for _, s in _shape_leaves(self.node.meta["gpdc.shape"])]
        if [y.dim() for y in Y] != want:
            raise _Unfit("on probe tensors: its outputs have another structure than in the model")
        if not all(_same(a, b) for a, b in zip(Y, self._run(X, "on probe tensors"))):
            return _RANDOM
        specs = self._judge_with(X, Y)
        if isinstance(specs, str) or all(bool(y.isfinite().all()) for y in Y if y.is_floating_point()):
            return specs
        Xp = {lf: v.abs() + 0.5 if v.is_floating_point() else v for lf, v in X.items()}  # for log, sqrt, pow...
        Yp = self._run(Xp, "on positive probe tensors")
        if not any(bool(y.isfinite().any()) for y in Y + Yp if y.is_floating_point()):
            return "it returns no finite values on probe tensors"
        return self._judge_with(Xp, Yp)

    def _judge_with(self, X: dict, Y: list[torch.Tensor]):
        """Permute, duplicate and add fresh channels; the outputs must follow (see the module docs)."""
        C, extra = self.C, max(2, self.C // 2)
        order = torch.randperm(C + extra, generator=self.g)
        src = torch.cat([torch.arange(C), torch.randint(0, C, (extra,), generator=self.g)])[order]
        fresh = order >= C
        Yd = self._run(self._mapped(X, src), "with more channels")
        if len(Yd) != len(Y):
            return _MOVED
        specs = tuple(_spec(y, yd, src, C) for y, yd in zip(Y, Yd))
        if "moved" in specs:
            return _MOVED
        perm = torch.randperm(C, generator=self.g)
        Yp = self._run(self._mapped(X, perm), "with permuted channels")
        Yg = self._run(self._mapped(X, src, fresh), "with fresh channels")
        keep = torch.nonzero(~fresh).flatten()
        for finding, got, index, kept in zip(_FINDINGS, (Yp, Yd, Yg), (perm, src, src), (None, None, keep)):
            for y, g, spec in zip(Y, got, specs):
                want = _expected(y, spec, index, C)
                if kept is not None and spec is not None:
                    pos = _positions(spec, kept, len(index))
                    g, want = g.index_select(spec[1], pos), want.index_select(spec[1], pos)
                if not _same(g, want):
                    return _Mixing(_REDUCES if spec is None else finding, specs)
        return specs


# -- the rule ----------------------------------------------------------------------------------------

def _qualname(fn) -> str:
    """How a user names a function: ``torch.cumsum``, ``torch.nn.functional.logsigmoid``, ``module.fn``."""
    for prefix, namespace in (("torch", torch), ("torch.nn.functional", F), ("operator", operator)):
        alias = next((k for k, v in vars(namespace).items() if v is fn and not k.startswith("_")), None)
        if alias is not None:
            return f"{prefix}.{alias}"
    return f"{getattr(fn, '__module__', None) or ''}.{getattr(fn, '__qualname__', repr(fn))}".lstrip(".")


def _describe(node: fx.Node, an) -> tuple[str, str, str]:
    """(what the op is, the registration call that gives it a rule, how ``register_elementwise`` names it)."""
    if node.op == "call_module":
        cls = type(an.module(node)).__name__
        return f"module '{node.target}' of type {cls}", f"gpdc.register_module_rule({cls}, rule)", cls
    if node.op == "call_method":
        return (f"method '.{node.target}()'", f"gpdc.register_method_rule('{node.target}', rule)",
                f"'{node.target}'")
    name = _qualname(node.target)
    return f"function '{name}'", f"gpdc.register_function_rule({name}, rule)", name


def _refusal(node: fx.Node, an, finding: str) -> str:
    """One paragraph: the op, the node, what the probe found, the source line and the fix."""
    what, how, _ = _describe(node, an)
    line = f" Source: {source_line(node)}." if source_line(node) else ""
    return (f"no channel rule for node {node_label(node)}: {what} receives widened channels, and probing it on random "
            f"tensors shows that {finding}; a wider teacher running it would not compute what the student computes."
            f"{line} Register a channel rule for it with {how} (a gpdc.rules.Rule; the rules in gpdc/rules/ are "
            f"examples).")


def _student_width_reason(node: fx.Node, an, finding: str) -> str:
    """Why an op runs at the student's width, and how to widen it instead. When the probe could not run the op,
    it may still act on each channel alike: then one registration call is enough."""
    what, how, name = _describe(node, an)
    fix = (f"gpdc.register_elementwise({name}) if it acts on each channel alike, else {how}"
           if finding.startswith(_FAILS) else how)
    return f"probing {what} shows that {finding} (to widen it, register a channel rule: {fix})"


def _op_key(node: fx.Node, an):
    if node.op == "call_module":
        m = an.module(node)
        attrs = sorted((k, repr(v)) for k, v in vars(m).items() if not k.startswith("_") and k != "training")
        return type(m), repr(attrs)
    return node.op, node.target


def _cache_key(node: fx.Node, an, leaves: list[_Leaf]):
    """Op, non-tensor arguments, and per input its dtype, rank, mapped dim and broadcast dims; None if unhashable."""
    tensors = {lf.node for lf in leaves}
    args = repr(fx.node.map_arg((node.args, node.kwargs),
                                lambda a: "<tensor>" if a in tensors else a.meta.get("gpdc.value")))
    inputs = tuple((lf.info.dtype if lf.info else None, len(lf.shape), lf.dim, tuple(s == 1 for s in lf.shape))
                   for lf in leaves)
    outputs = tuple(len(s) for _, s in _shape_leaves(node.meta["gpdc.shape"]))
    key = (_op_key(node, an), args, inputs, outputs)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _field(node: fx.Node, an) -> int | None:
    """The index of the field a ``getattr`` picks from a tuple output that carries channels
    (``x.max(dim=-1).values``), or None."""
    if node.op != "call_function" or node.target is not getattr or len(node.args) != 2:
        return None
    src, name = node.args
    if not isinstance(an.layout_of(src), tuple):
        return None
    fields = getattr(getattr(_examples(an.gm).get(src), "kind", None), "__match_args__", ())
    return fields.index(name) if name in fields else None


def _restructure(shape, layouts):
    """Layouts (an iterator, one per output tensor) nested like the node's output."""
    if _is_shape(shape):
        return next(layouts)
    return tuple(None if s is None else _restructure(s, layouts) for s in shape)


def _blocks(lay, d: int, k: int, order: str):
    """``lay`` with ``k`` entries per channel along dim ``d``: channel-major (position c·k + i) or block-major
    (i·C + c); entry i is sub-position ``sub·k + i``. Works on student and teacher layouts (rekey the latter)."""
    W, lane = lay.width, np.arange(k)
    if order == "channel":
        return lay.take(np.repeat(np.arange(W), k), dim=d, sub=np.repeat(lay.sub, k) * k + np.tile(lane, W))
    return lay.take(np.tile(np.arange(W), k), dim=d, sub=np.tile(lay.sub, k) * k + np.repeat(lane, W))


def _student_out(L: Layout, spec):
    if spec is None:
        return None
    return L.with_dim(spec[1]) if spec[0] == "dim" else _blocks(L, *spec[1:])


def _teacher_out(ex, T: TeacherLayout, spec):
    if spec is None:
        return None
    return T.take(slice(None), dim=spec[1]) if spec[0] == "dim" else ex.rekey(_blocks(T, *spec[1:]))


def _lined_up(T: TeacherLayout, TO: TeacherLayout) -> bool:
    return np.array_equal(T.keys, TO.keys) and np.array_equal(T.copy, TO.copy)


@dataclass(frozen=True)
class Field:
    """``getattr`` of a field of a tuple output that carries channels (``x.max(dim=-1).values``)."""

    index: int


@dataclass(frozen=True)
class Probed:
    """An op the probe found acts on each channel alike: the reference input, every input with its mapped dim,
    the input-independent tensors gathered to the channels, and where each output carries them."""

    ref: _Leaf
    leaves: tuple
    gathers: dict
    specs: tuple
    op: str


class ProbedRule(Rule):
    """The rule ``find_rule`` falls back to for ops without one (see the module docs)."""

    def __init__(self):
        self.verdicts: dict = {}  # cache key -> per-output specs, or what the probe found instead

    def analyze(self, node: fx.Node, an):
        field = _field(node, an)
        if field is not None:
            an.record(node, Field(field))
            return an.layout_of(node.args[0])[field]
        widths = {lay.width for lay in flatten_layouts(an.layout_of((node.args, node.kwargs)))
                  if isinstance(lay, Layout) and lay.width > 1}
        if len(widths) > 1:
            return run_at_student_width(node, an, f"{_describe(node, an)[0]} combines tensors with different channel "
                                                  f"counts ({', '.join(map(str, sorted(widths)))})")
        ref, leaves = _roles(node, an, _leaves(node, an))
        specs = self._verdict(node, an, leaves, ref.layout.width)
        if specs == _RANDOM:
            raise UnmatchableError(_refusal(node, an, specs))
        if not isinstance(specs, tuple):
            finding = specs if isinstance(specs, str) else specs.finding
            reason = _student_width_reason(node, an, finding)
            spec = specs.specs[0] if isinstance(specs, _Mixing) and len(specs.specs) == 1 else None
            keeps = spec is not None and spec[0] == "dim" and ref.path == () and _is_shape(node.meta["gpdc.shape"])
            return run_at_student_width(node, an, reason, *((ref.node, spec[1]) if keeps else ()))
        gathers = _couple(node, an, leaves, ref)
        op = _describe(node, an)[0]
        an.record(node, Probed(ref, tuple(leaves), gathers, specs, op))
        return _restructure(node.meta["gpdc.shape"], (_student_out(ref.layout, s) for s in specs))

    def _verdict(self, node: fx.Node, an, leaves: list[_Leaf], C: int):
        key = _cache_key(node, an, leaves)
        if key is None:
            return _Probe(node, an, leaves, C).verdict()
        if key not in self.verdicts:
            self.verdicts[key] = _Probe(node, an, leaves, C).verdict()
        return self.verdicts[key]

    def expand(self, node: fx.Node, ex) -> None:
        facts = ex.facts(node)
        if isinstance(facts, StudentWidth):
            expand_at_student_width(node, ex)
            return
        if isinstance(facts, Field):
            ex.emit_copy(node, ex.tl[node.args[0]][facts.index])
            return
        ref = facts.ref
        TO = _at(ex.tl[ref.node], ref.path)
        mapped = {lf.node for lf in facts.leaves if lf.dim is not None}

        def teacher_input(a: fx.Node):
            new, T = ex.env[a], ex.tl.get(a)
            if a in facts.gathers:
                Lc = facts.gathers[a]
                ex.log(node, f"input-independent '{a.name}' gathered to the teacher's {TO.width} channels")
                return ex.index_select(node, new, Lc.dim, ex.student_pos(Lc, TO))
            if a not in mapped or T is None:
                return new
            if isinstance(T, TeacherLayout):
                idx = ex.pair(ref.layout, TO, ex.an.layout_of(a), T)
                return new if idx is None else ex.index_select(node, new, T.dim, idx)
            if all(t is None or _lined_up(t, TO) for t in T):
                return new
            raise RuleError(f"node {node_label(node)} receives a tuple of tensors whose teacher channels are ordered "
                            "differently; gpdc cannot line them up inside the tuple. Pass the tensors one by one.")

        args = fx.node.map_arg(node.args, teacher_input)
        kwargs = fx.node.map_arg(node.kwargs, teacher_input)
        if node.op == "call_module":
            ex.set_module(node.target, ex.clone(ex.an.module(node)))
        ex.env[node] = ex.graph.create_node(node.op, node.target, args, kwargs, node.name)
        ex.tl[node] = _restructure(node.meta["gpdc.shape"], (_teacher_out(ex, TO, s) for s in facts.specs))
        ex.log(node, f"followed by probing: {facts.op} acts on each channel alike")


def _couple(node: fx.Node, an, leaves: list[_Leaf], ref: _Leaf) -> dict:
    """Couple every mapped input's channels to the reference's, like ``BinaryRule``: an unwidened parameter
    follows them, an input-independent tensor is gathered per teacher channel (returned), anything else pins
    them. A one-channel input that broadcasts onto the channels (a spatial gate) must keep its one channel.
    Returns {node: student layout} of the gathered tensors."""
    gathers = {}
    for lf in leaves:
        if lf.dim is None and isinstance(lf.layout, Layout):
            an.pin(lf.layout, f"broadcasts onto the channels of '{ref.node.name}' at node '{node.name}'")
        if lf.dim is None or lf is ref:
            continue
        L = lf.layout
        if L is None:
            Lr = ref.layout.with_dim(lf.dim)
            whole = lf.path == () and ref.path == ()
            L = follow(lf.node, Lr, ref.node, an) if whole else None
            if L is None and whole and not an.depends_on_input(lf.node):
                gathers[lf.node] = Lr
                continue
            L = L or an.pinned_layout(node, lf.dim, ref.layout.width,
                                      f"meets the unwidened tensor '{lf.node.name}' channel for channel")
        an.couple(ref.layout, L, node)
    return gathers


PROBED = ProbedRule()
