"""A k×k convolution trained as a multi-branch block that is one convolution with a merged kernel.

CBR's branch dimension (METHOD.md §3, OREPA-style online re-parameterisation): all branches are
linear in the input, so the block is one convolution with a merged kernel. Branch kinds (each with a
per-output-channel scale):

* ``kxk``      the original kernel (scale 1 at init);
* ``1x1``      a 1×1 kernel zero-padded to k×k;
* ``avg``      1×1 followed by k×k average pooling: the 1×1 weight ⊗ 1/k²;
* ``1x1_kxk``  1×1 (in → in, same groups) followed by k×k: the product over the middle channels;
* ``identity`` (in = out channels, stride 1): a one-hot k×k kernel;
* ``dw_1x1``   depthwise k×k followed by 1×1 (groups = 1 only).

All scales but the original's start at 0, so the block equals the original conv exactly at init.
``merge_kernel`` is the single definition used by the module's forward, by the shared student's
ParamMap and by fold.

Each call picks between merging, running ``1x1_kxk`` as its two convs, and running every branch separately with its
scale on its output (``gpdc.branch_plan``); the student's conv that reads a block's slice (``SharedBranchConv``) does
the same.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from .branch_plan import MERGED, SEPARATE, SEQUENTIAL, cheaper, student_cost, teacher_cost
from .param_map import take

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


def branch_kernel(kind: str, p: dict[str, torch.Tensor], weight: torch.Tensor, groups: int,
                  index: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The k×k kernel [O, I/g, kh, kw] of one branch, from its parameters ``p``.

    ``index``: the (output, input) channels ``p`` was selected to (``select_params``), for a slice of a
    dense kernel."""
    out_c, in_g, kh, kw = weight.shape
    if kind == "kxk":
        return weight
    if kind == "1x1":
        return _pad_center(p["w_1x1"], kh, kw)
    if kind == "avg":
        return p["w_avg"].expand(out_c, in_g, kh, kw) / (kh * kw)
    if kind == "1x1_kxk":
        first, second = p["w_1x1_kxk_a"], p["w_1x1_kxk_b"]  # [mid, in/g, 1, 1], [out, mid/g, kh, kw]
        if groups == 1:  # Σ_m second[o, m] · first[m, i] as a 1×1 conv over the taps (DBB's transIII): fast
            return F.conv2d(second, first.transpose(0, 1))
        first = first.reshape(groups, -1, in_g)  # [g, mid/g, in/g]
        second = second.reshape(groups, out_c // groups, -1, kh, kw)  # [g, out/g, mid/g, kh, kw]
        return torch.einsum("gomhw,gmi->goihw", second, first).reshape(out_c, in_g, kh, kw)
    if kind == "identity":
        return _pad_center(_one_hot(weight, groups, index), kh, kw)
    if kind == "dw_1x1":
        return p["w_dw_1x1_pw"].reshape(out_c, in_g, 1, 1) * p["w_dw_1x1_dw"].reshape(1, in_g, kh, kw)
    raise ValueError(f"unknown branch kind {kind!r}")


def _one_hot(weight: torch.Tensor, groups: int, index=None) -> torch.Tensor:
    """The identity's 1×1 kernel [O, I/g, 1, 1]: output o reads its own channel (o mod I/g within its group)."""
    out_c, in_g = weight.shape[:2]
    device = weight.device
    rows, cols = index or (torch.arange(out_c, device=device) % in_g, torch.arange(in_g, device=device))
    return (rows[:, None] == cols[None, :]).to(weight.dtype)[:, :, None, None]


_MERGED: ContextVar[dict | None] = ContextVar("gpdc_merged_kernels", default=None)


@contextmanager
def merged_once():
    """Inside it, each block's kernel is merged once from the parameter tensors it is given and then reused (the
    tensors must not change inside): the dynamic teacher's forward and the shared student's read of its slice
    share one merged tensor, so a GPD step (``gpdc.GPD``) merges every block once and autograd sees one graph,
    and compile's checks and fold merge once for all. Blocks also count the student's slice in the cost of not
    merging (``BranchConv2d.plan``)."""
    token = _MERGED.set({})
    try:
        yield
    finally:
        _MERGED.reset(token)


def merge_kernel(kinds: tuple[str, ...], p: dict[str, torch.Tensor], groups: int,
                 skip: tuple[str, ...] = ()) -> torch.Tensor:
    """Σ_b scale_b ⊙ kernel_b over the kinds not in ``skip``: the one kernel the block computes with."""
    cache = _MERGED.get()
    key = _key(kinds, groups, skip, p)
    if cache is not None and key in cache:
        return cache[key]
    merged = _merge(kinds, p, groups, skip)
    if cache is not None:
        cache[key] = merged
    return merged


def _key(kinds, groups, skip, p) -> tuple:
    return (kinds, groups, skip, *map(id, p.values()))


def _merge(kinds, p, groups, skip=(), index=None) -> torch.Tensor:
    """Σ_b scale_b ⊙ branch_kernel_b, accumulated in place into one new tensor: the terms that are 1×1 (``1x1``,
    ``identity``) summed at 1×1 and added to the centre tap, ``avg`` broadcast over the taps. Every pass over a
    large kernel costs a memory pass, and a new tensor per term would cost page faults too."""
    weight, scale = p["weight"], p["branch_scale"]
    kh, kw = weight.shape[2:]
    merged = weight * scale[0].view(-1, 1, 1, 1)  # a new tensor, so in-place sums into it are safe for autograd
    for b, kind in enumerate(kinds[1:], start=1):
        if kind in skip or kind in _CENTRED:
            continue
        s = scale[b].view(-1, 1, 1, 1)
        if kind == "avg":
            merged.add_(p["w_avg"] * (s / (kh * kw)))
        else:
            merged.addcmul_(branch_kernel(kind, p, weight, groups, index), s)
    centre = _centre(kinds, p, groups, skip, index)
    if centre is not None:
        merged[:, :, kh // 2, kw // 2] += centre[:, :, 0, 0]
    return merged


_CENTRED = ("1x1", "identity")  # the kinds that are a 1×1 kernel at the k×k kernel's centre tap


def _centre(kinds, p, groups, skip=(), index=None) -> torch.Tensor | None:
    """Σ scale_b ⊙ 1×1 kernel_b [O, I/g, 1, 1] over the ``_CENTRED`` kinds not in ``skip`` (None without one)."""
    centre = None
    for b, kind in enumerate(kinds):
        if kind in _CENTRED and kind not in skip:
            term = (p["w_1x1"] if kind == "1x1" else _one_hot(p["weight"], groups, index))
            term = term * p["branch_scale"][b].view(-1, 1, 1, 1)
            centre = term if centre is None else centre + term
    return centre


# Which dims of each parameter run over the kernel's output ("o") or input ("i") channels.
_CHANNEL_DIMS = {"weight": "oi", "w_1x1": "oi", "w_avg": "oi", "w_1x1_kxk_a": "-i", "w_1x1_kxk_b": "o",
                 "w_dw_1x1_dw": "i", "w_dw_1x1_pw": "oi", "branch_scale": "-o"}


def select_params(p: dict[str, torch.Tensor], rows: torch.Tensor, cols: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every parameter of a dense block cut to output channels ``rows`` and input channels ``cols``: the
    kernel merged from them is the merged kernel's [rows][:, cols] (the product over the middle channels
    keeps all of them), at |rows|·|cols|/(O·I) of the cost."""
    out = {}
    for name, t in p.items():
        for d, which in enumerate(_CHANNEL_DIMS.get(name, "")):  # (the bias is not merged)
            if which != "-":
                t = take(t, d, rows if which == "o" else cols)
        out[name] = t
    return out


class BranchConv2d(nn.Conv2d):
    """A Conv2d whose kernel is the merge of several branches (see the module docstring)."""

    def __init__(self, conv: nn.Conv2d, kinds: tuple[str, ...]):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                         device="meta", dtype=conv.weight.dtype)  # no initialisation: the conv's tensors replace them
        self.kinds = tuple(kinds)
        self.student_channels = tuple(conv.weight.shape[:2])  # of the kernel the student reads (the branch pass)
        self.weight = nn.Parameter(conv.weight.detach().clone(), conv.weight.requires_grad)
        if conv.bias is not None:
            self.bias = nn.Parameter(conv.bias.detach().clone(), conv.bias.requires_grad)
        out_c, in_g, kh, kw = self.weight.shape
        scale = torch.zeros(len(self.kinds), out_c, dtype=self.weight.dtype, device=self.weight.device)
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
                w = torch.empty(shape, dtype=self.weight.dtype, device=self.weight.device)
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                self.register_parameter(name, nn.Parameter(w))

    def _params(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters(recurse=False))

    def merged_weight(self) -> torch.Tensor:
        return merge_kernel(self.kinds, self._params(), self.groups)

    def plan(self, input_shape) -> str:
        """How a call at this input shape runs (``branch_plan``); inside ``merged_once`` the student's
        cost counts too."""
        return cheaper(teacher_cost(self, input_shape, with_student=_MERGED.get() is not None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan(x.shape)
        if plan == MERGED:
            return self._conv_forward(x, self.merged_weight(), self.bias)
        p = self._params()
        if plan == SEPARATE:
            return _add_bias(separate(self, x, p), self.bias)
        rest = merge_kernel(self.kinds, p, self.groups, skip=(SEQUENTIAL,))
        second = p["w_1x1_kxk_b"] * p["branch_scale"][self.kinds.index(SEQUENTIAL)].view(-1, 1, 1, 1)
        return branchwise(self, x, rest, p["w_1x1_kxk_a"], second)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", branches={list(self.kinds)}"


def branchwise(conv: nn.Conv2d, x: torch.Tensor, rest: torch.Tensor, first: torch.Tensor,
               second: torch.Tensor) -> torch.Tensor:
    """``conv`` run branch-wise: the conv of the other kinds' merged kernel ``rest`` plus ``1x1_kxk`` as its 1×1
    (``first``) and k×k (``second``, scaled) convs."""
    mid = F.conv2d(x, first, None, 1, 0, 1, conv.groups)
    return conv._conv_forward(x, rest, conv.bias) + conv._conv_forward(mid, second, None)


def separate(conv, x: torch.Tensor, p: dict[str, torch.Tensor], index=None) -> torch.Tensor:
    """Branch block ``conv`` (its kinds, geometry) on ``x`` with every branch its own conv and each branch's scale
    applied to its output, without the bias (``branch_plan.separable`` blocks only): k×k; ``1x1`` and ``identity``
    as one 1×1 conv on the taps the kernel's centre reads; ``avg`` as k×k average pooling (zeros counted, as the
    merged kernel's zero padding) then its 1×1 conv; ``1x1_kxk`` and ``dw_1x1`` as their two convs. ``p``: the
    block's parameters (or a dense slice of them, ``select_params``, with ``index`` its (rows, cols))."""
    kinds, groups, scale = conv.kinds, conv.groups, p["branch_scale"]
    geometry = (conv.stride, conv.padding, conv.dilation)
    out = _scaled(F.conv2d(x, p["weight"], None, *geometry, groups), scale[0])
    for b, kind in enumerate(kinds[1:], start=1):
        s = scale[b]
        if kind == "avg":
            pooled = F.avg_pool2d(x, conv.kernel_size, conv.stride, conv.padding)
            out = out + _scaled(F.conv2d(pooled, p["w_avg"], None, 1, 0, 1, groups), s)
        elif kind == SEQUENTIAL:
            mid = F.conv2d(x, p["w_1x1_kxk_a"], None, 1, 0, 1, groups)
            out = out + _scaled(F.conv2d(mid, p["w_1x1_kxk_b"], None, *geometry, groups), s)
        elif kind == "dw_1x1":
            depthwise = F.conv2d(x, p["w_dw_1x1_dw"], None, *geometry, x.shape[1])
            out = out + _scaled(F.conv2d(depthwise, p["w_dw_1x1_pw"]), s)
    centre = _centre(kinds, p, groups, index=index)
    if centre is not None:
        padding = tuple(pd - d * (k // 2) for pd, d, k in zip(conv.padding, conv.dilation, conv.kernel_size))
        out = out + F.conv2d(x, centre, None, conv.stride, padding, 1, groups)
    return out


def _scaled(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``y`` [N, C, ...] times a per-channel scale, in ``y``'s dtype (bf16 under autocast)."""
    return y * s.to(y.dtype).view(1, -1, *([1] * (y.dim() - 2)))


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype).view(1, -1, 1, 1)


class MergedKernel:
    """A ParamMap-derived tensor: the merged kernel of teacher block ``module``, from teacher params."""

    def __init__(self, module: str, block: BranchConv2d):
        self.module, self.kinds, self.groups = module, block.kinds, block.groups
        self.names = [n for n, _ in block.named_parameters(recurse=False)]

    def _params(self, teacher_params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: teacher_params[f"{self.module}.{n}"] for n in self.names}

    def __call__(self, teacher_params: dict[str, torch.Tensor]) -> torch.Tensor:
        return merge_kernel(self.kinds, self._params(teacher_params), self.groups)

    def select(self, teacher_params: dict[str, torch.Tensor], index: dict[int, torch.Tensor]) -> torch.Tensor:
        return merged_slice(self.kinds, self.groups, self._params(teacher_params), index)


def whole_merged(kinds, groups, p, skip=()) -> bool:
    """Whether this forward already merged the whole kernel (of the kinds not in ``skip``) of the block with
    parameters ``p``."""
    cache = _MERGED.get()
    return cache is not None and _key(kinds, groups, skip, p) in cache


def merged_slice(kinds, groups, p: dict[str, torch.Tensor], index: dict[int, torch.Tensor], skip=()) -> torch.Tensor:
    """The merged kernel's channels ``index`` (dim → indices): a slice of the whole merged kernel when this
    forward already made it, else merged from the selected parameters without making the whole kernel."""
    weight = p["weight"]
    index = {d: idx.to(weight.device) for d, idx in index.items()}
    if groups != 1 or whole_merged(kinds, groups, p, skip) or set(index) - {0, 1}:
        t = merge_kernel(kinds, p, groups, skip)
        for d, idx in index.items():
            t = take(t, d, idx)
        return t
    rows, cols = _rows_cols(weight, index)
    return _merge(kinds, select_params(p, rows, cols), 1, skip, index=(rows, cols))


def _rows_cols(weight: torch.Tensor, index: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(index[d] if d in index else torch.arange(weight.shape[d], device=weight.device) for d in (0, 1))


class SharedBranchConv(nn.Conv2d):
    """The student's conv that reads the slice of a teacher branch block (it owns no parameters, like the rest of
    the shared student). Per call it convolves with the merged slice — almost free when the teacher merged this
    step — or, for a dense kernel, runs the slice branch-wise or separate when that is cheaper
    (``branch_plan.student_cost``). All are the same function of the teacher's parameters; 'balanced' gradients
    (METHOD.md §4) rescale the merged slice, so that mode always merges."""

    def __init__(self, conv: nn.Conv2d, block: BranchConv2d, source):
        has_bias = "bias" not in conv._parameters  # the shared student deleted it: it reads it from the teacher
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, has_bias, conv.padding_mode, device="meta")
        for name in [k for k, v in self._parameters.items() if v is not None]:
            del self._parameters[name]
        self._block = (block,)  # a tuple, so the teacher's block is not registered here
        self.kinds = block.kinds
        self.source = source  # the ParamSource of the student's kernel: channels read, scales
        self.balanced = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self._block[0]
        p = block._params()
        whole = whole_merged(block.kinds, block.groups, p)
        plan = MERGED if self.balanced else cheaper(student_cost(block, x.shape, whole))
        if plan == MERGED:
            weight = self.source.rescale(merged_slice(block.kinds, block.groups, p, self.source.index), self.balanced)
            return self._conv_forward(x, weight, self.bias)
        index = self.source.index_on(x.device)
        if plan == SEPARATE:  # the slice's channel scales on the input and the output, not on the kernel
            rows, cols = _rows_cols(p["weight"], index)
            out = separate(self, self.source.rescale_channels(x, 1), select_params(p, rows, cols), (rows, cols))
            return _add_bias(self.source.rescale_channels(out, 0), self.bias)
        rest = self.source.rescale(merged_slice(block.kinds, 1, p, index, skip=(SEQUENTIAL,)))
        first, second = p["w_1x1_kxk_a"], p["w_1x1_kxk_b"]
        scale = p["branch_scale"][block.kinds.index(SEQUENTIAL)]
        if 1 in index:
            first = take(first, 1, index[1])
        if 0 in index:
            second, scale = take(second, 0, index[0]), take(scale, 0, index[0])
        second = second * scale.view(-1, 1, 1, 1)
        return branchwise(self, x, rest, self.source.rescale(first, dims=(1,)), self.source.rescale(second, dims=(0,)))
