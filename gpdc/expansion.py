"""``gpdc.expand``: trace → analyze → plan → expand (IR) → branch (CBR) → share, and ``fold``."""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from .analyze import ChannelAnalysis, Group
from .features import FeatureTaps, taps_of, teacher_taps
from .fold import fuse_conv_bn
from .models import load_state_dict_strict
from .outputs import LeafPath, OutputMap, map_leaves
from .param_map import ParamMap
from .pass_manager import run_passes
from .plan import ExpansionPlan, plan_expansion
from .rules.student_width import StudentWidth
from .errors import InternalError, SpecError
from .spec import Spec, load_spec
from .student import SharedStudent
from .trace import trace


@dataclass
class Expansion:
    """The result of ``gpdc.expand``."""

    spec: Spec
    source: nn.Module  # a copy of what the user passed (their class), the target of fold
    original: fx.GraphModule  # the traced student
    teacher: fx.GraphModule  # the dynamic teacher (with CBR branches)
    student: SharedStudent  # the student, reading its parameters from the teacher
    groups: list[Group]
    param_map: ParamMap
    plan: ExpansionPlan
    output_maps: dict[LeafPath, OutputMap] = field(default_factory=dict)  # the widened (freed) output leaves
    output_leaves: list[LeafPath] = field(default_factory=list)  # output leaves that carry channels
    log: list[str] = field(default_factory=list)
    student_width: dict[str, str] = field(default_factory=dict)  # node -> why the teacher runs it unwidened
    teacher_tap: Callable[[str], tuple[str, OutputMap | None]] | None = None  # student node -> teacher node, map
    channel_dims: dict[str, int] = field(default_factory=dict)  # student node -> its channel dim (the analysis')

    def student_view(self, teacher_output):
        """The teacher's output with every widened leaf read back to the student's channels (equal to the
        student's output at init): what feature distillation compares."""
        return map_leaves(teacher_output, lambda p, v: self.output_maps[p].read(v) if p in self.output_maps else v)

    def feature_taps(self, patterns: list[str]) -> tuple[FeatureTaps, FeatureTaps]:
        """The student's features that ``patterns`` name (``features.find_taps``; run them with
        ``student.features``) and the dynamic teacher's at the same nodes, wider, with their maps back."""
        student = taps_of(self.original, patterns, "the student", channel_dims=self.channel_dims)
        return student, teacher_taps(student, self.teacher, self.teacher_tap)

    def report(self) -> dict:
        return {
            "strategy": self.plan.strategy,
            "outputs": {str(p): ("widened" if p in self.output_maps else "pinned") for p in self.output_leaves},
            "groups": [g.summary() for g in self.groups],
            "specialised_to_input": [  # Python values taken from the example input's shape or forward's defaults
                s | {"value": s["value"] if isinstance(s["value"], (bool, int, float, str, type(None))) else repr(s["value"])}
                for s in self.original.meta.get("gpdc.specialised", [])],
            "student_width_ops": self.student_width,
            "student_params": sum(p.numel() for p in self.original.parameters()),
            "teacher_params": sum(p.numel() for p in self.teacher.parameters()),
        }

    def fold_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's parameters (ParamMap evaluated once) and its own buffers, as a state_dict that
        loads with strict=True into the user's model class."""
        with torch.no_grad():
            params = {k: v.detach().clone().contiguous() for k, v in self.student.shared_parameters().items()}
        full = self.source.state_dict()
        own = {k: v.detach().clone() for k, v in self.student.net.state_dict().items()}
        unknown = (set(params) | set(own)) - set(full)
        if unknown:
            raise InternalError(f"internal error in fold: the traced student has parameters or buffers that "
                                f"{type(self.source).__name__} does not: {sorted(unknown)[:5]}. This is a gpdc bug; "
                                "please report it with the model and spec.")
        out = OrderedDict((k, v.detach().clone()) for k, v in full.items())
        out.update(own)
        out.update(params)
        out._metadata = getattr(full, "_metadata", None)  # module versions (e.g. MNASNet checks them on load)
        return out

    def fold(self, fuse_bn: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A plain module of the student's original architecture with the folded weights
        (``state_dict``: a ``fold_state_dict()`` already computed).

        With ``fuse_bn`` the result is a GraphModule (traced structure) whose conv+BatchNorm pairs
        are fused for deployment (eval-mode BatchNorm)."""
        sd = self.fold_state_dict() if state_dict is None else state_dict
        if not fuse_bn:
            model = copy.deepcopy(self.source)
            load_state_dict_strict(model, sd)
            return model.eval()
        gm = copy.deepcopy(self.original)
        load_state_dict_strict(gm, {k: v for k, v in sd.items() if k in gm.state_dict()})
        return fuse_conv_bn(gm.eval())


def expand(
    model: nn.Module | fx.GraphModule,
    spec: Spec | dict | str | Path | None = None,
    leaf_modules: tuple[type, ...] = (),
    leaf_functions: tuple[Callable, ...] = (),
) -> Expansion:
    """Widen ``model`` into an exact dynamic teacher and a student that shares its parameters."""
    from .passes import ChannelBranchReparameterization, InverseReparameterization, SinkParameterChains  # noqa: PLC0415

    spec = load_spec(spec)
    student = trace(model, spec.input_shape, leaf_modules, leaf_functions)
    sink = SinkParameterChains()
    student, _ = run_passes(student, (sink,))
    analysis = ChannelAnalysis(student, spec.expand.free_outputs, spec.expand.unwidenable)
    _check_free_outputs(spec.expand.free_outputs, analysis)
    plan = plan_expansion(analysis, spec)
    param_map = ParamMap()
    pipeline = (
        InverseReparameterization(analysis, plan, param_map),
        ChannelBranchReparameterization(spec.branches, param_map),
    )
    teacher, results = run_passes(student, pipeline, have=frozenset({"traced"}) | sink.ensures)
    shared = SharedStudent(student, teacher, param_map)
    log = [f"[{p.name}] {line}" for p, r in zip(pipeline, results) for line in r.log]
    return Expansion(spec, copy.deepcopy(model), student, teacher, shared, plan.groups, param_map, plan,
                     results[0].artifacts["output_maps"], [*analysis.pinned_outputs, *analysis.free_outputs], log,
                     {n.name: f.reason for n in student.graph.nodes if isinstance(f := analysis.facts(n), StudentWidth)},
                     results[0].artifacts["teacher_tap"], analysis.channel_dims())


def _check_free_outputs(patterns: list[str], an: ChannelAnalysis) -> None:
    leaves = [*an.pinned_outputs, *an.free_outputs]
    for pattern in patterns:
        if not any(p.matches([pattern]) for p in leaves):
            names = ", ".join(f"'{p.key}'" for p in leaves if p.key) or "none (the output is a single tensor)"
            raise SpecError(f"expand.free_outputs: '{pattern}' matches no output of the model that carries channels. "
                            f"Its output leaves are {names}; use their dotted paths or globs such as 'feats.*'.")
