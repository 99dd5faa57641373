"""``gpdc.expand``: trace → analyze → plan → IR, returning teacher, shared student and groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch.fx as fx
from torch import nn

from .analyze import ChannelAnalysis, Group
from .pass_manager import run_passes
from .param_map import ParamMap
from .plan import ExpansionPlan, plan_expansion
from .spec import Spec, load_spec
from .student import SharedStudent
from .trace import trace


@dataclass
class Expansion:
    """The result of ``gpdc.expand``."""

    spec: Spec
    original: fx.GraphModule  # the traced student (a copy; the user's model is untouched)
    teacher: fx.GraphModule  # the dynamic teacher
    student: SharedStudent  # the student, reading its parameters from the teacher
    groups: list[Group]
    param_map: ParamMap
    plan: ExpansionPlan
    log: list[str] = field(default_factory=list)

    def report(self) -> dict:
        return {
            "strategy": self.plan.strategy,
            "groups": [g.summary() for g in self.groups],
            "student_params": sum(p.numel() for p in self.original.parameters()),
            "teacher_params": sum(p.numel() for p in self.teacher.parameters()),
        }


def expand(
    model: nn.Module | fx.GraphModule,
    spec: Spec | dict | str | Path | None = None,
    leaf_modules: tuple[type, ...] = (),
    leaf_functions: tuple[Callable, ...] = (),
) -> Expansion:
    """Widen ``model`` into an exact dynamic teacher and a student that shares its parameters."""
    from .passes import InverseReparameterization  # noqa: PLC0415 (passes/ is installed as gpdc.passes)

    spec = load_spec(spec)
    student = trace(model, spec.input_shape, leaf_modules, leaf_functions)
    analysis = ChannelAnalysis(student)
    plan = plan_expansion(analysis, spec)
    teacher, results = run_passes(student, (InverseReparameterization(analysis, plan),))
    param_map = results[0].artifacts["param_map"]
    shared = SharedStudent(student, teacher, param_map)
    log = [line for r in results for line in r.log]
    return Expansion(spec, student, teacher, shared, plan.groups, param_map, plan, log)
