"""The exactness criterion of DESIGN.md §4, shared by tests and benchmarks.

Against a float64 reference of the original model, a rewritten model's float32 error must be no
worse than ``max(1e-5 · max(1, max|ref|), 10 · the float32 original's own error)``.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .errors import GpdcError, InternalError
from .outputs import tensor_leaves

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
    """Random BatchNorm affine parameters and running statistics (buffer-only norms such as
    FrozenBatchNorm2d included), and random values for every parameter that is constant at init
    (zero-initialised heads and biases, LayerNorm weights, 1e-6 layer scales, zero class tokens), in
    place: an exactness test on a model whose residual branches are scaled to ~0, whose norms are
    identities or whose head outputs zeros could not fail."""
    g = generator or torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(getattr(m, "running_var", None), torch.Tensor):
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
    error: float  # max |candidate - ref| of the worst leaf
    bound: float  # the allowed error of that leaf
    own_error: float  # max |original fp32 - ref| of that leaf
    scale: float  # max |ref| of that leaf
    leaf: str = "out"  # which output leaf (``out[1]['feats'][0]``); the worst by error / bound

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    @property
    def ratio(self) -> float:
        """error / bound: <= 1 passes."""
        return self.error / self.bound


def reference(original: nn.Module, x: torch.Tensor, norm_train: bool):
    """(float64 reference output, float32 output) of the original model, in its own output structure; the
    original's modes and buffers are left as they were."""
    ref_model = set_mode(copy.deepcopy(original).double(), norm_train)
    modes = [(m, m.training) for m in original.modules()]
    try:
        with torch.no_grad(), kept_buffers(original):
            return ref_model(x.double()), set_mode(original, norm_train)(x)
    finally:
        for m, training in modes:
            m.training = training


def compare(out, ref, own) -> Exactness:
    """The DESIGN.md §4 criterion for every tensor leaf of ``out`` against ``ref``; the worst leaf."""
    got, want, mine = tensor_leaves(out), tensor_leaves(ref), tensor_leaves(own)
    if [p for p, _ in got] != [p for p, _ in want] or any(a.shape != b.shape for (_, a), (_, b) in zip(got, want)):
        raise InternalError(f"internal error: the rewritten model's outputs {_describe(got)} differ in structure "
                            f"from the original's {_describe(want)}. This is a gpdc bug; please report it with the "
                            "model and spec.")
    worst = None
    for (path, o), (_, r), (_, f) in zip(got, want, mine):
        r = r.double()
        scale = float(r.abs().max()) if r.numel() else 0.0
        own_err = float((f.double() - r).abs().max()) if r.numel() else 0.0
        err = float((o.double() - r).abs().max()) if r.numel() else 0.0
        e = Exactness(err, max(1e-5 * max(1.0, scale), 10 * own_err), own_err, scale, str(path))
        if worst is None or e.ratio > worst.ratio:
            worst = e
    if worst is None:
        raise GpdcError("the model returns no tensor, so there is nothing to widen or check; gpdc needs a model whose "
                        "output (or one of its leaves) is a tensor.")
    return worst


def _describe(leaves) -> str:
    return "[" + ", ".join(f"{p} {tuple(v.shape)}" for p, v in leaves) + "]"


def check(candidate, ref, own, x: torch.Tensor, view=None) -> Exactness:
    """``candidate(x)`` (read back through ``view``, e.g. ``Expansion.student_view``) against ``ref``."""
    with torch.no_grad():
        out = candidate(x)
    return compare(view(out) if view else out, ref, own)


def check_expansion(exp, x: torch.Tensor) -> dict[str, dict]:
    """Teacher and shared student against the original, BN in eval and train mode; both are left in
    eval mode. Keys like 'teacher/eval', values {error, bound, ok, leaf}; widened output leaves of the
    teacher are read back to the student's channels first. Their buffers are restored afterwards: a
    train-mode forward moves BatchNorm running statistics, which fold would otherwise ship."""
    checks = {}
    with kept_buffers(exp.teacher), kept_buffers(exp.student):
        for norm_train in (False, True):
            ref, own = reference(exp.original, x, norm_train)
            for name, cand, view in (("teacher", exp.teacher, exp.student_view), ("student", exp.student, None)):
                e = check(set_mode(cand, norm_train), ref, own, x, view)
                checks[f"{name}/{'train' if norm_train else 'eval'}"] = {"error": e.error, "bound": e.bound,
                                                                         "ok": e.ok, "leaf": e.leaf}
    set_mode(exp.teacher, False), set_mode(exp.student, False)
    return checks


@contextmanager
def kept_buffers(module: nn.Module) -> Iterator[None]:
    """Restore ``module``'s buffers (running statistics, counters) on exit."""
    saved = [(b, b.detach().clone()) for _, b in module.named_buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def max_rel_difference(a, b) -> tuple[float, str]:
    """(worst max|a - b| / max(1, max|a|) over the tensor leaves of two outputs of one structure, its leaf)."""
    pairs = list(zip(tensor_leaves(a), tensor_leaves(b)))
    if not pairs or any(pa != pb or va.shape != vb.shape for (pa, va), (pb, vb) in pairs):
        raise InternalError("internal error: two outputs to compare differ in structure. This is a gpdc bug; please "
                            "report it with the model and spec.")
    errs = [(float((va - vb).detach().abs().max()) / max(1.0, float(va.detach().abs().max())) if va.numel() else 0.0,
             str(p)) for (p, va), (_, vb) in pairs]
    return max(errs, key=lambda e: e[0])


def check_shape(exp) -> tuple[list[int], str | None]:
    """The input shape the checks use: the spec's, with the batch raised to 2 where train-mode BatchNorm
    would see a single value per channel (e.g. after global pooling at batch 1, where it cannot run)."""
    shape = list(exp.spec.input_shape)
    modules = dict(exp.original.named_modules())
    for node in exp.original.graph.nodes:
        m = modules.get(node.target) if node.op == "call_module" else None
        arg = node.args[0] if node.args else None
        in_shape = arg.meta.get("gpdc.shape") if hasattr(arg, "meta") else None
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and in_shape and len(in_shape) > 1 \
                and math.prod(in_shape) // in_shape[1] == 1:
            shape[0] = 2
            return shape, (f"the checks run at batch 2: at the spec's batch {exp.spec.input_shape[0]}, BatchNorm "
                           f"'{node.target}' sees one value per channel, which it cannot normalise in train mode")
    return shape, None
