"""The exactness criterion of DESIGN.md §4, shared by tests and benchmarks.

Against a float64 reference of the original model, a rewritten model's float32 error must be no
worse than ``max(1e-5 · max(1, max|ref|), 10 · the float32 original's own error)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def set_mode(model: nn.Module, norm_train: bool) -> nn.Module:
    """Eval mode everywhere, except normalisation layers in train mode when ``norm_train``
    (train-mode batch statistics are deterministic; dropout and stochastic depth are not)."""
    model.eval()
    if norm_train:
        for m in model.modules():
            if isinstance(m, _NORMS):
                m.train()
    return model


def randomize(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Random BatchNorm affine parameters and running statistics, and random values for every
    parameter that is constant at init (zero-initialised heads and biases, LayerNorm weights,
    1e-6 layer scales, zero class tokens), in place: an exactness test on a model whose
    residual branches are scaled to ~0 or whose head outputs zeros could not fail."""
    g = generator or torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                if float(p.flatten()[0]) == 1.0:
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@dataclass
class Exactness:
    error: float  # max |candidate - ref|
    bound: float  # the allowed error
    own_error: float  # max |original fp32 - ref|
    scale: float  # max |ref|

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    @property
    def ratio(self) -> float:
        """error / bound: <= 1 passes."""
        return self.error / self.bound


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first(out[0])
    if hasattr(out, "logits"):
        return out.logits
    raise TypeError(f"cannot compare model output of type {type(out).__name__}")


def reference(original: nn.Module, x: torch.Tensor, norm_train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 reference output, float32 output) of the original model."""
    ref_model = set_mode(copy.deepcopy(original).double(), norm_train)
    f32_model = set_mode(copy.deepcopy(original), norm_train)
    with torch.no_grad():
        return _first(ref_model(x.double())), _first(f32_model(x))


def check(candidate, ref: torch.Tensor, own: torch.Tensor, x: torch.Tensor) -> Exactness:
    with torch.no_grad():
        out = _first(candidate(x)).double()
    scale = float(ref.abs().max())
    own_err = float((own.double() - ref).abs().max())
    err = float((out - ref).abs().max())
    return Exactness(err, max(1e-5 * max(1.0, scale), 10 * own_err), own_err, scale)


def check_expansion(exp, x: torch.Tensor) -> dict[str, dict]:
    """Teacher and shared student against the original, BN in eval and train mode; both are left in
    eval mode. Keys like 'teacher/eval', values {error, bound, ok}."""
    checks = {}
    for norm_train in (False, True):
        ref, own = reference(exp.original, x, norm_train)
        for name, cand in (("teacher", exp.teacher), ("student", exp.student)):
            e = check(set_mode(cand, norm_train), ref, own, x)
            checks[f"{name}/{'train' if norm_train else 'eval'}"] = {"error": e.error, "bound": e.bound, "ok": e.ok}
    set_mode(exp.teacher, False), set_mode(exp.student, False)
    return checks
