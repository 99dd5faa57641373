"""``gpdc.GPD``: the whole GPD objective as one module with one backward (METHOD.md §4).

The dynamic teacher and the shared student read the same parameters, so training them as two modules with two
backward passes hides half the gradient from anything that wraps one of them: ``DistributedDataParallel`` over the
teacher never sees the student's contribution (the ranks drift apart), an EMA or optimizer over the student finds
no parameters. ``GPD`` holds the dynamic teacher (its parameters are what to optimise), the shared student (its
BatchNorm buffers registered under ``student.``) and an optional frozen static teacher (moved with the module,
never in ``parameters()`` nor ``state_dict()``), and ``forward(x, y)`` returns the summed loss: one backward gives
the gradients of the two backward passes it replaces. It works as any module does under DDP, autocast,
channels_last, ``torch.compile``, timm's EMA and ``torch.optim.swa_utils.AveragedModel``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from .branch_conv import merged_once
from .errors import SpecError
from .expansion import Expansion
from .feature_kd import FeatureLoss, feature_loss
from .features import FeatureTaps, taps_of
from .outputs import logits_path, pick
from .spec import FeatureSpec, TrainSpec, _format_validation_error
from .trace import trace
from .train.losses import dkd, hinton_kd, soft_cross_entropy


@dataclass
class GPDOutput:
    """What one GPD forward computed: ``loss`` (backward this), the terms it sums (``teacher_ce``, ``student_ce``,
    ``teacher_kd``/``student_kd`` with a static teacher, ``student_sce`` from the dynamic teacher), both logits."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor


def kd_loss(cfg: TrainSpec, logits: torch.Tensor, static_logits: torch.Tensor | None, target: torch.Tensor):
    """Distillation of logits from the static teacher (none without one, or with a feature loss)."""
    if static_logits is None or cfg.kd == "none" or cfg.feature_kd:
        return logits.new_zeros(())
    if cfg.kd == "hinton":
        return hinton_kd(logits, static_logits, cfg.kd_temperature)
    return dkd(logits, static_logits, target, cfg.dkd_alpha, cfg.dkd_beta, cfg.dkd_temperature)


def _validated(cls, value, what: str):
    """``value`` (a dict) as the spec section ``cls``, or a SpecError naming what is wrong."""
    if isinstance(value, cls):
        return value
    try:
        return cls.model_validate(value or {})
    except ValidationError as e:
        raise SpecError(_format_validation_error(e, f"gpdc.GPD({what}=...)")) from None


class WithStaticTeacher(nn.Module):
    """An objective that may read a frozen static teacher: kept in a tuple, so it is neither a parameter nor in the
    state_dict, moved along by ``.to()``, dtype and memory-format changes, and left in the mode the spec gives it.
    With a feature loss (``train.kd: reviewkd``) it also reads the static teacher's tapped features."""

    def __init__(self, static_teacher: nn.Module | None, cfg: TrainSpec):
        super().__init__()
        self.cfg = cfg
        self._static = (static_teacher,)
        self._paths: dict[str, object] = {}
        self.static_taps: FeatureTaps | None = None
        if static_teacher is not None:
            static_teacher.requires_grad_(False)
            static_teacher.train(cfg.static_teacher_train_mode)

    @property
    def static_teacher(self) -> nn.Module | None:
        return self._static[0]

    def _tap_static_teacher(self, features: FeatureSpec, input_shape: list[int]) -> None:
        if not features.student:
            raise SpecError(f"train.kd: {self.cfg.kd} distils features, and the spec names none: add a features: "
                            "section, e.g. `features: {student: [layer1, layer2, layer3, layer4, avgpool]}` (the static "
                            "teacher's default to the same names; set features.teacher when they differ).")
        traced = trace(self.static_teacher, input_shape)
        self.static_taps = taps_of(traced, features.teacher or features.student, "the static teacher",
                                   self.static_teacher)

    def _static_out(self, x: torch.Tensor):
        """(static teacher's logits, its tapped features or None), without gradients; (None, None) without one."""
        if self.static_teacher is None:
            return None, None
        with torch.no_grad():
            out, feats = (self.static_taps(self.static_teacher, x) if self.static_taps is not None
                          else (self.static_teacher(x), None))
            return self._logits("static teacher", out, self.cfg.teacher_logits), feats

    def set_epoch(self, epoch: int) -> None:
        """Tell the feature losses the epoch (0-based) that starts: their weight's warm-up (``warmup_epochs``)."""
        for module in self.modules():
            if isinstance(module, FeatureLoss):
                module.set_epoch(epoch)

    def describe_features(self) -> list[dict[str, str]]:
        """Each distilled pair of features (for the report and the run's first lines): name and shape per network."""
        if self.static_taps is None:
            return []
        nets = {**self._tapped(), "static teacher": self.static_taps}
        return [{who: f"{t.names[i]} {'×'.join(map(str, t.shapes[i]))}" for who, t in nets.items()}
                for i in range(len(self.static_taps.names))]

    def _tapped(self) -> dict[str, FeatureTaps]:
        return {}

    def _logits(self, which: str, out, key: str | None):
        if isinstance(out, torch.Tensor) and key is None:
            return out
        if which not in self._paths:
            self._paths[which] = logits_path(out, key, f"the {which}")
        return pick(out, self._paths[which])

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.static_teacher is not None:
            self.static_teacher._apply(fn)
        return self


class GPD(WithStaticTeacher):
    """Dynamic teacher + shared student (+ static teacher) of ``expansion`` trained by one loss.

    ``train``: the spec's ``train`` section (a ``TrainSpec``, a dict, or None for its defaults) — losses,
    temperatures, ``student_grad``, and which output leaf holds the logits. ``features``: the taps a feature loss
    (``train.kd: reviewkd | fitnet``) compares (default: the expansion's spec's ``features:``); each of the dynamic
    teacher and the student then has its own connectors to the static teacher's features."""

    def __init__(self, expansion: Expansion, static_teacher: nn.Module | None = None,
                 train: TrainSpec | dict | None = None, features: FeatureSpec | dict | None = None):
        super().__init__(static_teacher, _validated(TrainSpec, train, "train"))
        self.teacher = expansion.teacher
        self.student = expansion.student  # reads the teacher's parameters; owns only its BatchNorm buffers
        self.student.balanced_grad = self.cfg.student_grad == "balanced"
        self.taps: tuple[FeatureTaps, FeatureTaps] | None = None  # (student, dynamic teacher)
        if self.cfg.feature_kd and static_teacher is not None:
            features = expansion.spec.features if features is None else _validated(FeatureSpec, features, "features")
            self._tap_static_teacher(features, expansion.spec.input_shape)
            self.taps = expansion.feature_taps(features.student)
            s, t, static = self.taps[0].shapes, self.taps[1].shapes, self.static_taps.shapes
            self.feature_kd = nn.ModuleDict({"teacher": feature_loss(self.cfg.kd, t, static, self.cfg, student_shapes=s),
                                             "student": feature_loss(self.cfg.kd, s, static, self.cfg)})

    def _tapped(self) -> dict[str, FeatureTaps]:
        return {"student": self.taps[0], "dynamic teacher": self.taps[1]} if self.taps else {}

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> GPDOutput:
        cfg = self.cfg
        static, static_feats = self._static_out(x)
        with merged_once():
            if self.taps is None:
                out_d, feats_d = self.teacher(x), None
                with self.student.inside_gpd():
                    out, feats = self.student(x), None
            else:
                out_d, feats_d = self.taps[1](self.teacher, x)
                with self.student.inside_gpd():
                    out, feats = self.student.features(self.taps[0], x)
        zd, z = self._logits("dynamic teacher", out_d, cfg.logits), self._logits("student", out, cfg.logits)
        parts = {"teacher_ce": F.cross_entropy(zd, y), "student_ce": F.cross_entropy(z, y)}
        if static_feats is not None:
            parts |= {"teacher_kd": self.feature_kd["teacher"](feats_d, static_feats),
                      "student_kd": self.feature_kd["student"](feats, static_feats)}
        elif static is not None and cfg.kd != "none":
            parts |= {"teacher_kd": kd_loss(cfg, zd, static, y), "student_kd": kd_loss(cfg, z, static, y)}
        if cfg.sce_weight > 0:  # the dynamic teacher teaches the student; its logits are a fixed target here
            target = F.softmax(zd.detach() / cfg.sce_temperature, 1)
            parts["student_sce"] = cfg.sce_weight * soft_cross_entropy(z, target, cfg.sce_label_smoothing,
                                                                       cfg.sce_temperature)
        return GPDOutput(sum(parts.values()), parts, z, zd)
