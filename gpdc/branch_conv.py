"""A k×k convolution trained as a multi-branch block that merges into one kernel at every forward.

CBR's branch dimension (METHOD.md §3, OREPA-style online re-parameterisation): all branches are
linear in the input, so the block is one convolution with a merged kernel, and a training step
costs one conv. Branch kinds (each with a per-output-channel scale):

* ``kxk``      the original kernel (scale 1 at init);
* ``1x1``      a 1×1 kernel zero-padded to k×k;
* ``avg``      1×1 followed by k×k average pooling: the 1×1 weight ⊗ 1/k²;
* ``1x1_kxk``  1×1 (in → in, same groups) followed by k×k: the product over the middle channels;
* ``identity`` (in = out channels, stride 1): a one-hot k×k kernel;
* ``dw_1x1``   depthwise k×k followed by 1×1 (groups = 1 only).

All scales but the original's start at 0, so the block equals the original conv exactly at init.
``merge_kernel`` is the single definition used by the module's forward, by the shared student's
ParamMap and by fold.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("kxk", "1x1", "avg", "1x1_kxk", "identity", "dw_1x1")
DEFAULT_KINDS = ("kxk", "1x1", "1x1_kxk", "avg", "identity")


def applicable_kinds(conv: nn.Conv2d, kinds) -> list[str]:
    """The requested kinds this conv can carry (identity needs in = out and stride 1; dw_1x1 groups = 1)."""
    out = ["kxk"]
    for k in kinds:
        if k == "kxk":
            continue
        if k == "identity" and (conv.in_channels != conv.out_channels or tuple(conv.stride) != (1, 1)):
            continue
        if k == "dw_1x1" and conv.groups != 1:
            continue
        out.append(k)
    return out


def _pad_center(k1: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    ph, pw = kh // 2, kw // 2
    return F.pad(k1, (pw, kw - 1 - pw, ph, kh - 1 - ph))


def branch_kernel(kind: str, p: dict[str, torch.Tensor], weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The k×k kernel [O, I/g, kh, kw] of one branch, from its parameters ``p``."""
    out_c, in_g, kh, kw = weight.shape
    if kind == "kxk":
        return weight
    if kind == "1x1":
        return _pad_center(p["w_1x1"], kh, kw)
    if kind == "avg":
        return p["w_avg"].expand(out_c, in_g, kh, kw) / (kh * kw)
    if kind == "1x1_kxk":
        first = p["w_1x1_kxk_a"].view(groups, in_g, in_g)  # [g, mid/g, in/g]
        second = p["w_1x1_kxk_b"].view(groups, out_c // groups, in_g, kh, kw)  # [g, out/g, mid/g, kh, kw]
        return torch.einsum("gomhw,gmi->goihw", second, first).reshape(out_c, in_g, kh, kw)
    if kind == "identity":
        eye = torch.zeros(out_c, in_g, kh, kw, dtype=weight.dtype, device=weight.device)
        o = torch.arange(out_c, device=weight.device)
        eye[o, o % in_g, kh // 2, kw // 2] = 1
        return eye
    if kind == "dw_1x1":
        return p["w_dw_1x1_pw"].view(out_c, in_g, 1, 1) * p["w_dw_1x1_dw"].view(1, in_g, kh, kw)
    raise ValueError(f"unknown branch kind {kind!r}")


_MERGED: ContextVar[dict | None] = ContextVar("gpdc_merged_kernels", default=None)


@contextmanager
def one_merge_per_forward():
    """Inside it, each block's kernel is merged once from the parameter tensors it is given and then reused: the
    dynamic teacher's forward and the shared student's read of its slice (``MergedKernel``) share one merged
    tensor, so a GPD step merges every block once and autograd sees one graph (``gpdc.GPD`` uses it)."""
    token = _MERGED.set({})
    try:
        yield
    finally:
        _MERGED.reset(token)


def merge_kernel(kinds: tuple[str, ...], p: dict[str, torch.Tensor], groups: int) -> torch.Tensor:
    """Σ_b scale_b ⊙ kernel_b: the one kernel the block computes with."""
    cache = _MERGED.get()
    key = (kinds, groups, *map(id, p.values()))
    if cache is not None and key in cache:
        return cache[key]
    weight, scale = p["weight"], p["branch_scale"]
    merged = weight * scale[0].view(-1, 1, 1, 1)
    for b, kind in enumerate(kinds[1:], start=1):
        merged = merged + branch_kernel(kind, p, weight, groups) * scale[b].view(-1, 1, 1, 1)
    if cache is not None:
        cache[key] = merged
    return merged


class BranchConv2d(nn.Conv2d):
    """A Conv2d whose kernel is the merge of several branches (see the module docstring)."""

    def __init__(self, conv: nn.Conv2d, kinds: tuple[str, ...]):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.kinds = tuple(kinds)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        out_c, in_g, kh, kw = self.weight.shape
        scale = torch.zeros(len(self.kinds), out_c, dtype=self.weight.dtype)
        scale[0] = 1.0
        self.branch_scale = nn.Parameter(scale)
        shapes = {
            "1x1": {"w_1x1": (out_c, in_g, 1, 1)},
            "avg": {"w_avg": (out_c, in_g, 1, 1)},
            "1x1_kxk": {"w_1x1_kxk_a": (self.in_channels, in_g, 1, 1), "w_1x1_kxk_b": (out_c, in_g, kh, kw)},
            "dw_1x1": {"w_dw_1x1_dw": (self.in_channels, 1, kh, kw), "w_dw_1x1_pw": (out_c, self.in_channels, 1, 1)},
        }
        for kind in self.kinds:
            for name, shape in shapes.get(kind, {}).items():
                w = torch.empty(shape, dtype=self.weight.dtype)
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                self.register_parameter(name, nn.Parameter(w))

    def merged_weight(self) -> torch.Tensor:
        return merge_kernel(self.kinds, dict(self.named_parameters(recurse=False)), self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.merged_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", branches={list(self.kinds)}"


class MergedKernel:
    """A ParamMap-derived tensor: the merged kernel of teacher block ``module``, from teacher params."""

    def __init__(self, module: str, block: BranchConv2d):
        self.module, self.kinds, self.groups = module, block.kinds, block.groups
        self.names = [n for n, _ in block.named_parameters(recurse=False)]

    def __call__(self, teacher_params: dict[str, torch.Tensor]) -> torch.Tensor:
        p = {n: teacher_params[f"{self.module}.{n}"] for n in self.names}
        return merge_kernel(self.kinds, p, self.groups)
