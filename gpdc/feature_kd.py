"""Feature distillation: losses that compare one network's tapped features with the static teacher's.

A feature loss is an ``nn.Module`` built from both networks' feature shapes (one example input, batch dropped), the
``train`` section and, when it serves the dynamic teacher, the student's shapes (``student_shapes``); it owns its connectors (trained with the network, checkpointed with the objective, dropped at
fold) and returns a scalar from ``(student features, teacher features)``. Under GPD the dynamic teacher gets its own
instance (its features are wider) and so does the student. Register your own with ``register_feature_loss``;
``FitNet`` is the short example, ``ReviewKD`` the paper's second KD method (Chen et al., CVPR 2021).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SpecError

FEATURE_LOSSES: dict[str, type["FeatureLoss"]] = {}


def register_feature_loss(name: str):
    """Class decorator: ``train.kd: <name>`` then distils features through this ``FeatureLoss`` subclass."""
    def register(cls: type[FeatureLoss]) -> type[FeatureLoss]:
        FEATURE_LOSSES[name] = cls
        return cls
    return register


class FeatureLoss(nn.Module):
    """Base: ``warmup_epochs`` ramps the weight linearly from 0 at the first epoch (``set_epoch``)."""

    def __init__(self, student: list[tuple[int, ...]], teacher: list[tuple[int, ...]], weight: float,
                 warmup_epochs: int = 0):
        super().__init__()
        if len(student) != len(teacher):
            raise SpecError(f"features: the student has {len(student)} tapped features and the static teacher "
                            f"{len(teacher)}; feature distillation pairs them in order, so name as many of each.")
        self.weight, self.warmup_epochs = weight, warmup_epochs
        self.register_buffer("ramp", torch.ones(()), persistent=False)  # a tensor: no recompile when it changes

    def set_epoch(self, epoch: int) -> None:
        self.ramp.fill_(min(1.0, epoch / self.warmup_epochs) if self.warmup_epochs else 1.0)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * (self.weight * self.ramp)


def as_maps(shapes: list[tuple[int, ...]], what: str) -> list[tuple[int, ...]]:
    """(C, H, W) of each feature: pooled (C,) features are 1×1 maps; other shapes have no channel-map meaning here."""
    out = []
    for i, s in enumerate(shapes):
        if len(s) not in (1, 3):
            raise SpecError(f"features: {what}'s feature {i + 1} has shape (N, {', '.join(map(str, s))}) with its "
                            "channels first; feature distillation compares (N, C, H, W) maps or pooled (N, C) vectors "
                            "(a token sequence is neither). Tap a convolutional stage or a pooled output instead.")
        out.append(s if len(s) == 3 else (s[0], 1, 1))
    return out


def _map(f: torch.Tensor) -> torch.Tensor:
    return f if f.dim() == 4 else f.reshape(*f.shape, 1, 1)


@register_feature_loss("fitnet")
class FitNet(FeatureLoss):
    """FitNets hints (Romero et al., ICLR 2015): each feature through its own 1×1 conv + BatchNorm regressor to the
    teacher's channels (resized to the teacher's map when the sizes differ), mean squared error, summed over pairs."""

    def __init__(self, student, teacher, cfg, student_shapes=None):
        super().__init__(student, teacher, cfg.fitnet.weight, cfg.fitnet.warmup_epochs)
        pairs = zip(as_maps(student, "the student"), as_maps(teacher, "the static teacher"))
        self.regressors = nn.ModuleList(nn.Sequential(nn.Conv2d(s[0], t[0], 1, bias=False), nn.BatchNorm2d(t[0]))
                                        for s, t in pairs)

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        loss = 0
        for regress, fs, ft in zip(self.regressors, student, teacher):
            fs, ft = _map(fs), _map(ft)
            if fs.shape[-2:] != ft.shape[-2:]:
                fs = F.adaptive_avg_pool2d(fs, ft.shape[-2:])
            loss = loss + F.mse_loss(regress(fs), ft.to(fs.dtype))
        return self.scaled(loss)


class ABF(nn.Module):
    """Attention-based fusion: a 1×1 conv to ``mid`` channels, fused with the deeper level's result by two
    per-pixel attention maps, then a 3×3 conv to the teacher's channels. Returns (output, fused) — the fused map
    is the next (shallower) level's residual."""

    def __init__(self, in_channels: int, mid: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(nn.Conv2d(mid, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels))
        self.att = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, out_size) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.att is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            z = self.att(torch.cat([x, residual], 1))
            x = x * z[:, :1] + residual * z[:, 1:2]
        if x.shape[-2:] != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


def hcl(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Hierarchical context loss: per level, the MSE of the maps and of their 4×4, 2×2, 1×1 average pools (those
    smaller than the map), weighted 1, 1/2, 1/4, 1/8 and normalised by the weights used; summed over levels."""
    total = 0
    for fs, ft in zip(student, teacher):
        loss, weight, weights = F.mse_loss(fs, ft), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= fs.shape[2]:
                continue
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
            weights += weight
        total = total + loss / weights
    return total


@register_feature_loss("reviewkd")
class ReviewKD(FeatureLoss):
    """Knowledge review: the features from the deepest up, each fused (``ABF``) with what the deeper levels made
    of theirs, each result compared with the teacher's feature at its level by ``hcl``."""

    def __init__(self, student, teacher, cfg, student_shapes=None):
        super().__init__(student, teacher, cfg.reviewkd.weight, cfg.reviewkd.warmup_epochs)
        s, t = as_maps(student, "the student"), as_maps(teacher, "the static teacher")
        mid = cfg.reviewkd.mid_channels or min(512, (student_shapes or student)[-1][0])  # the dynamic teacher's too
        deepest = len(s) - 1
        self.abfs = nn.ModuleList(ABF(s[i][0], mid, t[i][0], fuse=i < deepest) for i in reversed(range(len(s))))

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        student, teacher = [_map(f) for f in student], [_map(f) for f in teacher]
        results, residual = [], None
        for abf, fs, ft in zip(self.abfs, reversed(student), reversed(teacher)):
            out, residual = abf(fs, residual, ft.shape[-2:])
            results.insert(0, out)
        return self.scaled(hcl(results, [f.to(results[0].dtype) for f in teacher]))


def feature_loss(name: str, student, teacher, cfg, student_shapes=None) -> FeatureLoss:
    return FEATURE_LOSSES[name](student, teacher, cfg, student_shapes=student_shapes)
