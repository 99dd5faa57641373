"""One training step: one forward of the objective module, one backward, one optimiser step (METHOD.md §4).

The objective is ``gpdc.GPD`` (dynamic teacher + shared student) or, for the baselines, ``Baseline`` (the student
alone, with KD from the static teacher when there is one); either may be wrapped in DistributedDataParallel, which
then all-reduces every gradient and broadcasts the buffers like for any module.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..errors import GpdcError
from ..feature_kd import feature_loss
from ..features import FeatureTaps, taps_of
from ..gpd import GPDOutput, WithStaticTeacher, kd_loss
from ..outputs import LeafPath, logits_path, pick
from ..spec import FeatureSpec, TrainSpec
from ..trace import trace


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
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:  # e.g. a 3-channel stem on 1-channel images
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GpdcError(f"{what} cannot run on the data's images (one is {list(x.shape[1:])}): {detail}. Build the "
                        "model for images of that shape (channels, size), or choose data that matches it.") from None
    finally:
        model.train(was)
    if isinstance(out, torch.Tensor) and key is None:
        return model
    return Logits(model, logits_path(out, key, what))


class Baseline(WithStaticTeacher):
    """The student trained alone (cross-entropy, plus KD from the frozen static teacher if given): the baselines
    GPD is compared with, behind the same ``forward(x, y)`` as ``gpdc.GPD``. A feature loss (``train.kd:
    reviewkd``) reads the spec's ``features:`` taps of both, traced at ``input_shape``."""

    def __init__(self, student: nn.Module, static_teacher: nn.Module | None, cfg: TrainSpec,
                 features: FeatureSpec | None = None, input_shape: list[int] | None = None):
        super().__init__(static_teacher, cfg)
        self.student = student
        self.taps: FeatureTaps | None = None
        features = features or FeatureSpec()
        if cfg.feature_kd and static_teacher is not None:
            self._tap_static_teacher(features, input_shape)
            self.taps = taps_of(trace(student, input_shape), features.student, "the student", student)
            self.feature_kd = feature_loss(cfg.kd, self.taps.shapes, self.static_taps.shapes, cfg)

    def _tapped(self) -> dict[str, FeatureTaps]:
        return {"student": self.taps} if self.taps else {}

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> GPDOutput:
        static, static_feats = self._static_out(x)
        out, feats = self.taps(self.student, x) if self.taps is not None else (self.student(x), None)
        z = self._logits("student", out, self.cfg.logits)
        parts = {"student_ce": F.cross_entropy(z, y)}
        if static_feats is not None:
            parts["student_kd"] = self.feature_kd(feats, static_feats)
        elif static is not None and self.cfg.kd != "none":
            parts["student_kd"] = kd_loss(self.cfg, z, static, y)
        return GPDOutput(sum(parts.values()), parts, z, None)


def autocast(cfg: TrainSpec, device: torch.device):
    """The forward's autocast context for ``train.precision`` (none for fp32)."""
    if cfg.precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)


def train_step(model: nn.Module, params: list[nn.Parameter], cfg: TrainSpec, x, y, optimizer, ema=None,
               scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One optimiser step of ``model`` (a GPD or Baseline, possibly in DDP) over ``train.grad_accum`` micro-batches
    of (x, y), each loss weighted by its share of the batch; the mean losses of the teacher and the student."""
    optimizer.zero_grad(set_to_none=True)
    if cfg.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    chunks = list(zip(x.chunk(cfg.grad_accum), y.chunk(cfg.grad_accum)))
    sums: dict[str, torch.Tensor] = {}
    for i, (xc, yc) in enumerate(chunks):
        last = i == len(chunks) - 1
        with (model.no_sync() if isinstance(model, DDP) and not last else nullcontext()), autocast(cfg, x.device):
            out = model(xc, yc)
        share = len(xc) / len(x)
        loss = out.loss * share
        (scaler.scale(loss) if scaler is not None else loss).backward()
        for k, v in out.parts.items():
            sums[k] = sums.get(k, 0) + v.detach().float() * share
    if scaler is not None:
        scaler.unscale_(optimizer)
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if ema is not None:
        ema.update(params)
    losses = {}
    for who in ("teacher", "student"):
        terms = [v for k, v in sums.items() if k.startswith(who)]
        if terms:
            losses[f"{who}_loss"] = float(sum(terms))
    return losses
