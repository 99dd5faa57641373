"""One training step: one forward of the objective module, one backward, one optimiser step (METHOD.md §4).

The objective is ``gpdc.GPD`` (dynamic teacher + shared student) or, for the baselines, ``Baseline`` (the student
alone, with KD from the static teacher when there is one); either may be wrapped in DistributedDataParallel, which
then all-reduces every gradient and broadcasts the buffers like for any module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..gpd import GPDOutput, kd_loss
from ..outputs import LeafPath, logits_path, pick
from ..spec import TrainSpec


class Logits(nn.Module):
    """A model that returns a structure (``(logits, feats)``, a dict), seen through its logits leaf."""

    def __init__(self, model: nn.Module, path: LeafPath):
        super().__init__()
        self.model, self.path = model, path

    def forward(self, x):
        return pick(self.model(x), self.path)


def logits_of(model: nn.Module, x, key: str | None, what: str) -> nn.Module:
    """``model`` itself if it returns a tensor, else ``Logits`` of the leaf ``key`` (or the default leaf)."""
    was = model.training
    with torch.no_grad():
        out = model.eval()(x)
    model.train(was)
    if isinstance(out, torch.Tensor) and key is None:
        return model
    return Logits(model, logits_path(out, key, what))


class Baseline(nn.Module):
    """The student trained alone (cross-entropy, plus KD from the frozen static teacher if given): the baselines
    GPD is compared with, behind the same ``forward(x, y)`` as ``gpdc.GPD``."""

    def __init__(self, student: nn.Module, static_teacher: nn.Module | None, cfg: TrainSpec):
        super().__init__()
        self.student, self.cfg = student, cfg
        self._static = (static_teacher,)  # not a parameter, not in the state_dict

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self._static[0] is not None:
            self._static[0]._apply(fn)
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> GPDOutput:
        z = self.student(x)
        parts = {"student_ce": F.cross_entropy(z, y)}
        if self._static[0] is not None and self.cfg.kd != "none":
            with torch.no_grad():
                static = self._static[0](x)
            parts["student_kd"] = kd_loss(self.cfg, z, static, y)
        return GPDOutput(sum(parts.values()), parts, z, None)


def train_step(model: nn.Module, params: list[nn.Parameter], cfg: TrainSpec, x, y, optimizer, ema=None
               ) -> dict[str, float]:
    """One step of ``model`` (a GPD or Baseline, possibly in DDP); the mean losses of the teacher and the student."""
    optimizer.zero_grad(set_to_none=True)
    out = model(x, y)
    out.loss.backward()
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
    optimizer.step()
    if ema is not None:
        ema.update(params)
    losses = {}
    for who in ("teacher", "student"):
        terms = [v for k, v in out.parts.items() if k.startswith(who)]
        if terms:
            losses[f"{who}_loss"] = float(sum(t.detach() for t in terms))
    return losses
