"""IR (inverse reparameterization): build the dynamic teacher from the student graph.

The teacher is a *new* GraphModule (the student is never mutated) that computes exactly the
student's function at any ratio, per channel map of the plan (METHOD.md §2). Each node's channel
rule emits its teacher node(s); nodes that carry no widened channels are copied unchanged. Along
the way the pass records the ParamMap: how each student parameter is read back from the teacher.

Every teacher activation is *replicated* (each copy of a student channel holds the student's
value), so elementwise ops, BatchNorm and gates run unchanged and only channel-mixing layers and
channel reductions see the multiplicities, through their fan-in scale (1/number of copies).
"""

from __future__ import annotations

import copy as _copy

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from gpdc.analyze import ChannelAnalysis, rule_errors
from gpdc.errors import SpecError
from gpdc.layout import Layout, TeacherLayout
from gpdc.outputs import OutputMap
from gpdc.param_map import ParamMap
from gpdc.pass_manager import Pass, PassResult
from gpdc.plan import ExpansionPlan
from gpdc.rules.student_width import StudentInputs


def select_channels(x: torch.Tensor, dim: int, *indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Several channel selections of one tensor (the teacher form of chunk/split)."""
    return tuple(x.index_select(dim, i) for i in indices)


torch.fx.wrap("select_channels")


class InverseReparameterization(Pass):
    name = "expand"
    requires = frozenset({"traced", "parameter-chains-sunk"})
    ensures = frozenset({"teacher"})

    def __init__(self, analysis: ChannelAnalysis, plan: ExpansionPlan, param_map: ParamMap):
        self.an = analysis
        self.plan = plan
        self.param_map = param_map

    def call(self, gm: fx.GraphModule) -> PassResult:
        ex = _Expander(gm, self.an, self.plan, self.param_map)
        teacher = ex.run()
        return PassResult(teacher, True, artifacts={"param_map": ex.param_map, "layouts": ex.tl,
                                                    "output_maps": ex.output_maps(), "teacher_tap": ex.teacher_tap},
                          log=ex.lines)


class _Expander:
    """Holds the teacher graph under construction; the API the channel rules call."""

    def __init__(self, gm: fx.GraphModule, an: ChannelAnalysis, plan: ExpansionPlan, param_map: ParamMap):
        self.gm, self.an, self.plan = gm, an, plan
        self.strategy = plan.strategy
        self.graph = fx.Graph()
        self.env: dict[fx.Node, object] = {}
        self.tl: dict[fx.Node, object] = {}
        self.modules: dict[str, nn.Module] = {}
        self.attrs: dict[str, torch.Tensor] = {}
        self.index_buffers = nn.Module()
        self.param_map = param_map
        self.lines: list[str] = []

    # -- the walk ---------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            rule = self.an.rules.get(node)
            if rule is not None:
                with rule_errors("expand", node, rule):
                    rule.expand(node, self)
            else:
                self._passthrough(node)
        root = nn.Module()
        for name, m in self.modules.items():
            _set_submodule(root, name, m)
        for name, t in self.attrs.items():
            if name.rpartition(".")[0] not in self.modules:  # a module's own weight read as an attribute (`.dtype`)
                _set_attr(root, name, t)
        root.add_module("gpdc_index", self.index_buffers)
        teacher = fx.GraphModule(root, self.graph, class_name="DynamicTeacher")
        teacher.graph.eliminate_dead_code()
        teacher.recompile()
        missing = [n for n, _ in self.gm.named_parameters() if n not in self.param_map.sources]
        if missing:
            raise AssertionError(f"internal error: no ParamMap entry for student parameters {missing[:5]}")
        return teacher

    def output_maps(self) -> dict:
        """For each freed output leaf: the teacher positions of the first copies of the student's channels."""
        return {path: self._student_channels(node) for path, node in self.an.free_outputs.items()}

    def _student_channels(self, node: fx.Node) -> OutputMap:
        """The map from the teacher's (widened) value of ``node`` to the first copies of the student's channels."""
        L, T = self.an.layouts[node], self.tl[node]
        return OutputMap(L.dim, torch.as_tensor(T.positions_of(self.keys(L))), T.width)

    def teacher_tap(self, name: str) -> tuple[str, OutputMap | None]:
        """The teacher node computing the student's node ``name``, and the teacher positions of the first copies of
        its channels (None: the teacher computes it at the student's width, channel for channel)."""
        node = next(n for n in self.gm.graph.nodes if n.name == name)
        new, T = self.env.get(node), self.tl.get(node)
        if not isinstance(new, fx.Node) or not (T is None or isinstance(T, TeacherLayout)):
            raise SpecError(f"features: the dynamic teacher computes the student's '{name}' as several tensors (a "
                            "channel split); tap the tensor before or after it.")
        return new.name, None if T is None else self._student_channels(node)

    def _passthrough(self, node: fx.Node) -> None:
        if node.op == "call_module":
            m = self.an.module(node)
            self.modules[node.target] = _copy.deepcopy(m)
            self.share_unchanged(node.target, m)
        elif node.op == "get_attr":
            t = _get_attr(self.gm, node.target)
            self.attrs[node.target] = _copy.deepcopy(t)
            if isinstance(t, nn.Parameter) and node.target not in self.param_map.sources:  # a rule may map it
                self.param_map.add(node.target, node.target)
        student = StudentInputs(node, self)  # an op on unwidened tensors reads the student's sizes
        if node.meta.get("gpdc.shape") is not None and any(student.reads_widened_size(a) for a in node.all_input_nodes):
            self.env[node] = self.graph.create_node(node.op, node.target, fx.node.map_arg(node.args, student),
                                                    fx.node.map_arg(node.kwargs, student), node.name)
        else:
            self.env[node] = self.graph.node_copy(node, self.arg_lookup)
        self.tl[node] = None

    # -- helpers the rules use --------------------------------------------------------------
    def arg_lookup(self, n: fx.Node):
        return self.env[n]

    def arg(self, a):
        return fx.node.map_arg(a, self.arg_lookup)

    def facts(self, node: fx.Node):
        """What the node's rule recorded during analysis."""
        return self.an.facts(node)

    def layout(self, node: fx.Node):
        """The student layout of the node's output."""
        return self.an.layout_of(node)

    def parameter(self, target: str) -> nn.Parameter:
        """The student's parameter ``target``."""
        return self.gm.get_parameter(target)

    def set_parameter(self, target: str, value: torch.Tensor, index: dict, scale: dict | None = None) -> None:
        """The teacher's copy ``value`` of the student's parameter ``target``, and how the student reads it back
        (``index``/``scale`` per dim, as ``ParamMap.add``)."""
        p = self.parameter(target)
        self.attrs[target] = nn.Parameter(value.detach().contiguous(), requires_grad=p.requires_grad)
        self.param_map.add(target, target, index=index, scale=scale)

    def set_module(self, target: str, module: nn.Module) -> None:
        """The teacher's module at ``target`` (a rule that emits the call itself)."""
        self.modules[target] = module

    def keys(self, L) -> np.ndarray:
        return self.an.channel_keys(L)

    def rekey(self, T: TeacherLayout) -> TeacherLayout:
        return TeacherLayout(T.dim, T.space, T.index, T.sub, T.copy, self.keys(T))

    def canonical(self, L: Layout) -> TeacherLayout:
        """Teacher layout of a space a producer emits (or of an unwidened input): the student's channels,
        then their second copies, third copies, ... (plan.multiplicity), each in channel order."""
        space = int(L.space[0])
        mult = self.plan.multiplicity[self.an.coupling.space_ids(space)]
        src = np.concatenate([np.flatnonzero(mult > k) for k in range(int(mult.max(initial=1)))])
        copy = np.concatenate([np.full(int((mult > k).sum()), k) for k in range(int(mult.max(initial=1)))])
        T = TeacherLayout(L.dim, np.full(len(src), space, np.int64), src.astype(np.int64),
                          np.zeros(len(src), np.int64), copy.astype(np.int64), np.zeros(0, np.int64))
        return self.rekey(T)

    def aligned_teacher(self, L: Layout, T: TeacherLayout, fresh: Layout) -> TeacherLayout:
        """The teacher tensor ``T`` (student layout ``L``) read as the aligned space ``fresh``
        (``ChannelAnalysis.aligned_space``): position j holds fresh channel ``student_pos[j]``, same copy."""
        pos = self.student_pos(L, T)
        return self.rekey(TeacherLayout(T.dim, fresh.space[pos], fresh.index[pos], fresh.sub[pos], T.copy,
                                        np.zeros(0, np.int64)))

    def tin(self, arg, L: Layout) -> TeacherLayout:
        T = self.tl.get(arg) if isinstance(arg, fx.Node) else None
        return T if T is not None else self.canonical(L)

    def student_pos(self, L: Layout, T: TeacherLayout) -> np.ndarray:
        """For each teacher position, the student position holding the same channel."""
        lookup = dict(zip(self.keys(L).tolist(), range(L.width)))
        return np.array([lookup[k] for k in T.keys.tolist()], dtype=np.int64)

    def pair(self, L_ref: Layout, T_ref: TeacherLayout, L: Layout, T: TeacherLayout) -> np.ndarray | None:
        """Positions of ``T`` that line up with ``T_ref`` in an op that pairs its inputs position by position
        (student layouts ``L_ref``, ``L``): the same student position, the same copy. None if already lined up."""
        want_pos, want_copy = self.student_pos(L_ref, T_ref), T_ref.copy
        lookup = {kc: i for i, kc in enumerate(zip(T.keys.tolist(), T.copy.tolist()))}
        keys = self.keys(L)[want_pos]
        try:
            idx = np.array([lookup[kc] for kc in zip(keys.tolist(), want_copy.tolist())], dtype=np.int64)
        except KeyError:
            raise AssertionError("internal error: two paired teacher tensors hold different copies of their "
                                 "channels") from None
        return None if np.array_equal(idx, np.arange(T.width)) and T.width == T_ref.width else idx

    def fanin_scale(self, T: TeacherLayout) -> np.ndarray:
        if self.strategy == "replicate":
            return 1.0 / T.counts()
        return (T.copy == 0).astype(np.float64)

    def clone(self, m: nn.Module, params=None, buffers=None, **attrs) -> nn.Module:
        """A copy of ``m`` (same class) with new parameters/buffers and attributes."""
        new = m.__class__.__new__(m.__class__)
        new.__dict__ = dict(m.__dict__)
        new._parameters = {k: (None if v is None else nn.Parameter(v.detach().clone(), requires_grad=v.requires_grad))
                           for k, v in m._parameters.items()}
        new._buffers = {k: (None if v is None else v.detach().clone()) for k, v in m._buffers.items()}
        new._modules = {k: _copy.deepcopy(v) for k, v in m._modules.items()}
        new._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
        for k, v in (params or {}).items():
            new._parameters[k] = nn.Parameter(v.detach().clone().contiguous(), requires_grad=m._parameters[k].requires_grad)
        for k, v in (buffers or {}).items():
            new._buffers[k] = None if v is None else v.contiguous()
        for k, v in attrs.items():
            setattr(new, k, v)
        return new

    def emit_module(self, node: fx.Node, module: nn.Module, *args, layout, kwargs=None) -> None:
        self.modules[node.target] = module
        self.env[node] = self.graph.call_module(node.target, tuple(args), kwargs or {})
        self.env[node].meta.update({k: v for k, v in node.meta.items() if k == "gpdc.scope"})
        self.tl[node] = layout

    def emit_copy(self, node: fx.Node, layout, args=None) -> None:
        new = self.graph.node_copy(node, self.arg_lookup) if args is None else self.graph.create_node(
            node.op, node.target, args, self.arg(node.kwargs), node.name)
        self.env[node] = new
        self.tl[node] = layout

    def buffer(self, node: fx.Node, hint: str, t: torch.Tensor) -> fx.Node:
        name = f"{node.name}_{hint}"
        while hasattr(self.index_buffers, name):  # several selections in one node
            name += "_"
        self.index_buffers.register_buffer(name, t, persistent=False)
        return self.graph.get_attr(f"gpdc_index.{name}")

    def index_select(self, node: fx.Node, x, dim: int, idx: np.ndarray) -> fx.Node:
        b = self.buffer(node, "index", torch.as_tensor(idx, dtype=torch.int64))
        return self.graph.call_function(torch.index_select, (x, dim, b))

    def emit_select_many(self, node: fx.Node, x, dim: int, idxs, layouts) -> None:
        bufs = [self.buffer(node, f"index{i}", torch.as_tensor(ix, dtype=torch.int64)) for i, ix in enumerate(idxs)]
        self.env[node] = self.graph.call_function(select_channels, (x, dim, *bufs))
        self.tl[node] = layouts
        self.log(node, f"channel split as {len(idxs)} index selections")

    def share(self, module: str, param: str, index=None, scale=None) -> None:
        self.param_map.add(f"{module}.{param}", f"{module}.{param}", index, scale)

    def share_unchanged(self, module: str, m: nn.Module) -> None:
        for k, _ in m.named_parameters():
            self.param_map.add(f"{module}.{k}", f"{module}.{k}")

    def log(self, node: fx.Node, msg: str) -> None:
        self.lines.append(f"{node.target if node.op == 'call_module' else node.name}: {msg}")


def _get_attr(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_submodule(root: nn.Module, name: str, m: nn.Module) -> None:
    *path, last = name.split(".")
    parent = root
    for p in path:
        if not hasattr(parent, p):
            parent.add_module(p, nn.Module())
        parent = getattr(parent, p)
    parent.add_module(last, m)


def _set_attr(root: nn.Module, name: str, t) -> None:
    *path, last = name.split(".")
    parent = root
    for p in path:
        if not hasattr(parent, p):
            parent.add_module(p, nn.Module())
        parent = getattr(parent, p)
    if isinstance(t, nn.Parameter):
        parent.register_parameter(last, t)
    elif isinstance(t, torch.Tensor):
        parent.register_buffer(last, t)
    else:
        setattr(parent, last, t)
