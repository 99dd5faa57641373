"""Feature taps: intermediate tensors of a traced model, named by module or node, read out without editing it.

A tap names the output of a module (its qualified name, or a glob whose ``*`` stays within one dotted segment:
``layer*`` is layer1…layer4, ``blocks.*`` every block) — the last node that module computes, as
``torchvision.models.feature_extraction`` takes it — or a node of the traced graph by name (``layer1_1_add``, the
pre-activation sum). ``tap_code`` compiles the graph once more with the tapped nodes as extra outputs: a function of
(module, input) that runs on the *original* module's attributes, so parameters, buffers, devices and
DistributedDataParallel see nothing new. The dynamic teacher's taps are the teacher nodes that compute the student's,
with the map from the teacher's (wider) channels back to the student's (``Expansion.teacher_tap``).

Features are handed out channels first, (N, C, ...): each tap's channel dim is where gpdc's channel analysis finds it
(the flow through convs, linears, norms and permutes), so a tap inside a block that works in (N, H, W, C) — ConvNeXt's
MLP — is a (N, C, H, W) map, not a map with H channels.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from .errors import GpdcError, SpecError
from .outputs import OutputMap
from .trace import holds_tensor


@dataclass
class FeatureTaps:
    """Tapped features of one network: their names as resolved, graph nodes, channel dims as the network computes
    them, shapes channels first (one example input, batch dimension dropped) and the code that computes ``(output,
    [features])``; ``maps`` (dynamic teacher only) read each channels-first feature back to the student's channels."""

    names: list[str]
    nodes: list[str]
    dims: list[int]
    shapes: list[tuple[int, ...]]
    code: Callable[..., tuple[Any, list[torch.Tensor]]]
    extras: dict[str, Any] = field(default_factory=dict)
    maps: list[OutputMap | None] | None = None

    def __call__(self, module: nn.Module, *args):
        """``(output, [features, channels at dim 1])`` of ``module`` (the network these taps were resolved on)."""
        return self.code(_Overlay(module, self.extras) if self.extras else module, *args)

    def student_view(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The dynamic teacher's features read back to the student's channels (equal to the student's at init)."""
        return [f if m is None else m.read(f) for f, m in zip(features, self.maps or [None] * len(features))]


def find_taps(gm: fx.GraphModule, patterns: list[str], what: str) -> list[tuple[str, fx.Node]]:
    """(name, node) for what ``patterns`` name in ``gm`` (each pattern at least one), in graph order, no repeats."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and holds_tensor(n)]
    owners = _module_outputs(nodes)
    found: dict[fx.Node, str] = {}
    for pattern in patterns:
        hits = [(name, node) for name, node in owners.items() if _segment_match(name, pattern)]
        hits = hits or [(n.name, n) for n in nodes if fnmatch.fnmatchcase(n.name, pattern)]
        if not hits:
            tops = sorted({name.split(".")[0] for name in owners})
            raise SpecError(f"features: '{pattern}' names no module or node of {what} that computes a tensor. Its "
                            f"top-level modules are {', '.join(tops[:20]) or 'none'}; name a module by its qualified "
                            "name ('layer1', 'features.3'), a glob within one dotted segment ('layer*'), or a node of "
                            "the traced graph by its torch.fx name ('layer1_1_add').")
        for name, node in hits:
            found.setdefault(node, name)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(((name, node) for node, name in found.items()), key=lambda t: order[t[1]])


def tap_code(gm: fx.GraphModule, nodes: list[fx.Node], dims: list[int]) -> Callable:
    """``forward`` of ``gm`` returning ``(its output, [the tapped nodes' values, channel dim (``dims``) moved to
    1])``, as a function of the module. Each value is copied where the node computes it: a later in-place op
    (``ReLU(inplace=True)`` after a residual sum, ``x += ...``) would otherwise change what was tapped."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    taps = []
    for n, dim in zip(nodes, dims):
        with graph.inserting_after(env[n]):
            value = graph.call_function(torch.clone, (env[n],))
        if dim != 1:
            with graph.inserting_after(value):
                value = graph.call_function(torch.movedim, (value, dim, 1))
        taps.append(value)
    graph.output((out, taps))
    return type(fx.GraphModule(gm, graph)).forward


def taps_of(gm: fx.GraphModule, patterns: list[str], what: str, module: nn.Module | None = None,
            channel_dims: dict[str, int] | None = None) -> FeatureTaps:
    """Taps of ``gm`` (a trace of ``module``, or ``module`` itself) to run on ``module``: attributes the trace made
    (constants) that ``module`` lacks are carried along. ``channel_dims``: node name → channel dim, from the channel
    analysis of ``gm`` (run here when not given; ``gm`` must then be a trace of this call's own)."""
    names, nodes = zip(*find_taps(gm, patterns, what))
    module = gm if module is None else module
    targets = {n.target.split(".")[0] for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    extras = {t: getattr(gm, t) for t in targets if not hasattr(module, t)}
    found = analysed_channel_dims(gm) if channel_dims is None else channel_dims
    dims = [_feature_dim(found.get(n.name, 1), _shape(n)) for n in nodes]
    return FeatureTaps(list(names), [n.name for n in nodes], dims, [_channels_first(_shape(n), d)
                                                                   for n, d in zip(nodes, dims)],
                       tap_code(gm, list(nodes), dims), extras)


def analysed_channel_dims(gm: fx.GraphModule) -> dict[str, int]:
    """Node name → channel dim by gpdc's channel analysis of ``gm`` (which annotates its nodes); none where the
    network cannot be analysed (coupled channels, say: a static teacher need not be expandable), whose taps then
    read channels at dim 1, the (N, C, ...) convention."""
    from .analyze import ChannelAnalysis  # noqa: PLC0415 (the analysis builds on the rules, which import this module)

    try:
        return ChannelAnalysis(gm).channel_dims()
    except GpdcError:
        return {}


def teacher_taps(student_taps: FeatureTaps, teacher: fx.GraphModule, teacher_tap: Callable) -> FeatureTaps:
    """The dynamic teacher's taps at the student's: the teacher node computing each, at the student's channel dim,
    and its channel map (along dim 1, where the features are handed out)."""
    by_name = {n.name: n for n in teacher.graph.nodes}
    names, maps = zip(*(teacher_tap(name) for name in student_taps.nodes))
    dead = [label for label, n in zip(student_taps.names, names) if n not in by_name]
    if dead:
        raise SpecError(f"features: {', '.join(repr(d) for d in dead)} computes nothing the model's output uses, so "
                        "the dynamic teacher does not compute it; tap a tensor on the way to the output.")
    nodes = [by_name[n] for n in names]
    maps = [None if m is None else OutputMap(1, m.index, m.teacher_width) for m in maps]
    shapes = [s if m is None else (m.teacher_width, *s[1:]) for s, m in zip(student_taps.shapes, maps)]
    return FeatureTaps(student_taps.names, list(names), student_taps.dims, shapes,
                       tap_code(teacher, nodes, student_taps.dims), maps=maps)


def _module_outputs(nodes: list[fx.Node]) -> dict[str, fx.Node]:
    """Each module qualified name → the last tensor node computed inside it (graph order)."""
    last: dict[str, fx.Node] = {}
    for n in nodes:
        scope = n.meta.get("gpdc.scope") or (n.target if n.op == "call_module" else "")
        parts = scope.split(".") if scope else []
        for i in range(1, len(parts) + 1):
            last[".".join(parts[:i])] = n
    return last


def _segment_match(name: str, pattern: str) -> bool:
    a, b = name.split("."), pattern.split(".")
    return len(a) == len(b) and all(fnmatch.fnmatchcase(x, p) for x, p in zip(a, b))


def _shape(n: fx.Node) -> tuple[int, ...]:
    return tuple(n.meta["gpdc.shape"][1:])


def _feature_dim(dim: int, shape: tuple[int, ...]) -> int:
    """The dim a feature's channels are moved from: 1 (none moved) for channels in the batch dim (a tensor of
    parameters, say) or a feature with no dim besides the batch."""
    return dim if 1 <= dim <= len(shape) else 1


def _channels_first(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    """A feature's shape (batch dropped) with its channel dim (counted with the batch) moved to the front."""
    if dim == 1:
        return shape
    return (shape[dim - 1], *shape[:dim - 1], *shape[dim:])


class _Overlay:
    """``module`` with a few extra attributes (a trace's constants) that the tapped code reads by name."""

    def __init__(self, module: nn.Module, extras: dict[str, Any]):
        self._module, self._extras = module, extras

    def __getattr__(self, name: str):
        extras = self.__dict__["_extras"]
        return extras[name] if name in extras else getattr(self.__dict__["_module"], name)
