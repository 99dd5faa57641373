"""GPD losses (METHOD.md §4): cross-entropy, Hinton KD, DKD, and the dynamic teacher → student
soft cross-entropy with label smoothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinton_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) · T², batch mean."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True) * t * t


def dkd(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, beta: float = 0.5,
        temperature: float = 1.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): α·TCKD (target vs non-target mass) + β·NCKD (among non-targets)."""
    t = temperature
    gt = F.one_hot(target, student.shape[1]).bool()
    ps, pt = F.softmax(student / t, 1), F.softmax(teacher / t, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1).clamp_min(1e-12)
    bt = torch.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1).clamp_min(1e-12)
    tckd = (bt * (bt.log() - bs.log())).sum(1).mean() * t * t
    mask = gt.float() * 1000.0
    ls = F.log_softmax(student / t - mask, 1)
    lt = F.log_softmax(teacher / t - mask, 1)
    nckd = (lt.exp() * (lt - ls)).masked_fill(gt, 0).sum(1).mean() * t * t
    return alpha * tckd + beta * nckd


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor, label_smoothing: float = 0.1,
                       temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy against soft targets smoothed towards uniform: q = (1-ε)·p + ε/K."""
    k = logits.shape[1]
    q = (1 - label_smoothing) * target_probs + label_smoothing / k
    return -(q * F.log_softmax(logits / temperature, 1)).sum(1).mean()
