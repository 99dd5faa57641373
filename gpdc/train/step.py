"""One training step, exactly as METHOD.md §4.

GPD: static teacher forward (no grad); dynamic teacher loss, backward; student loss on the same,
not yet updated parameters, backward (gradients accumulate in the shared tensors); average across
ranks; clip; one optimiser step; EMA. Without GPD the model trains alone (the baselines).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..outputs import LeafPath, logits_path, pick
from ..spec import TrainSpec
from . import distributed
from .losses import dkd, hinton_kd, soft_cross_entropy


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


@dataclass
class Models:
    params: list[nn.Parameter]  # what the optimiser updates
    student: nn.Module  # the deployable model (shared student under GPD)
    teacher: nn.Module | None = None  # the dynamic teacher (GPD only)
    static: nn.Module | None = None  # the frozen static teacher (distill mode only)


def kd_loss(cfg: TrainSpec, logits, static_logits, target):
    if static_logits is None or cfg.kd == "none":
        return logits.new_zeros(())
    if cfg.kd == "hinton":
        return hinton_kd(logits, static_logits, cfg.kd_temperature)
    return dkd(logits, static_logits, target, cfg.dkd_alpha, cfg.dkd_beta, cfg.dkd_temperature)


def train_step(m: Models, cfg: TrainSpec, x, y, optimizer, ema=None) -> dict[str, float]:
    optimizer.zero_grad(set_to_none=True)
    static_logits = None
    if m.static is not None:
        with torch.no_grad():
            static_logits = m.static(x)
    losses = {}
    if m.teacher is not None:
        zd = m.teacher(x)
        loss_d = F.cross_entropy(zd, y) + kd_loss(cfg, zd, static_logits, y)
        loss_d.backward()
        losses["teacher_loss"] = float(loss_d.detach())
    z = m.student(x)
    loss_s = F.cross_entropy(z, y) + kd_loss(cfg, z, static_logits, y)
    if m.teacher is not None and cfg.sce_weight > 0:
        target = F.softmax(zd.detach() / cfg.sce_temperature, 1)
        loss_s = loss_s + cfg.sce_weight * soft_cross_entropy(z, target, cfg.sce_label_smoothing, cfg.sce_temperature)
    loss_s.backward()
    losses["student_loss"] = float(loss_s.detach())
    distributed.average_gradients(m.params)
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(m.params, cfg.clip_grad)
    optimizer.step()
    if ema is not None:
        ema.update(m.params)
    return losses
