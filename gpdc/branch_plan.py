"""How a branch block runs each call (METHOD.md §3, 'Cost of merging'): three exact ways to compute it.

* ``merged``       one conv with the merged kernel. Merging ``1x1_kxk`` costs ≈ 2·C′³k² FLOPs whatever the batch,
  and every branch's scale, sum and gradient is a pass over a kernel-sized tensor.
* ``branch-wise``  ``1x1_kxk`` as its 1×1 and k×k convs (≈ 2·B·HW·C′²(1 + k²) FLOPs) beside the conv of the other
  kinds' merged kernel.
* ``separate``     every branch its own conv (1×1 and identity as one 1×1 conv, ``avg`` as average pooling then a
  1×1 conv), each branch's scale applied to its output: no kernel-sized tensor is made, at the price of the 1×1
  convs. Needs zero padding that centres the 1×1 taps (``separable``).

Each call picks the cheapest from the actual shapes: FLOPs plus ``ELEMENT_FLOPS`` per element an elementwise pass
reads or writes, forward and backward (a merge at batch 4 moves more memory than its FLOPs say: a 1024×1024×3×3
kernel is 9.4M elements per pass). The teacher's block and the student's conv that reads its slice each pick; in a
GPD step the student's slice is almost free when the teacher merged (a slice of the same tensor), otherwise it
merges its own slice or runs branch-wise or separate itself. ``flops_only`` drops the memory term (the fewest-FLOP
plan, the bound ``bench/train_step.py`` reports).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

SEQUENTIAL = "1x1_kxk"  # the one kind whose merge can cost more FLOPs than running it
MERGED, BRANCHWISE, SEPARATE = "merged", "branch-wise", "separate"
PLANS = (MERGED, BRANCHWISE, SEPARATE)
#: forward-FLOP equivalent of one element read or written by an elementwise op, counted over forward and backward:
#: fp32 conv throughput / (3 · element passes per second), ≈ 40 measured on this project's 2-core CPU (rounded down:
#: the pass counts are rough). A GPU with TF32 tensor cores has a higher ratio (more FLOPs per byte), which moves
#: where the ways switch, not what they compute.
ELEMENT_FLOPS = 32.0

_FORCED: ContextVar[str | None] = ContextVar("gpdc_forced_plan", default=None)
_ELEMENT_FLOPS: ContextVar[float] = ContextVar("gpdc_element_flops", default=ELEMENT_FLOPS)


@contextmanager
def forced_plan(plan: str):
    """Inside it every block that can run ``plan`` does, whatever it costs: to compare the ways (tests,
    benchmarks); a block that cannot runs the cheapest way it can."""
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, not {plan!r}")
    token = _FORCED.set(plan)
    try:
        yield
    finally:
        _FORCED.reset(token)


@contextmanager
def flops_only():
    """Inside it plans are chosen by FLOPs alone (no memory term)."""
    token = _ELEMENT_FLOPS.set(0.0)
    try:
        yield
    finally:
        _ELEMENT_FLOPS.reset(token)


def total(cost: tuple[float, float]) -> float:
    """A (FLOPs, element passes) pair as one number."""
    flops, elements = cost
    return flops + _ELEMENT_FLOPS.get() * elements


def cheaper(costs: dict[str, tuple[float, float]]) -> str:
    """The plan to run: the forced one where it can run, else the cheapest."""
    forced = _FORCED.get()
    if forced is not None and forced in costs:
        return forced
    return min(costs, key=lambda plan: total(costs[plan]))


def separable(block) -> bool:
    """Whether the block's branches can run as separate convs: zero padding, given as numbers, so that a 1×1 conv
    (``1x1``, ``identity``) reads the taps at the kernel's centre — an odd kernel, padding ≥ the centre's offset —
    and ``avg`` undilated (average pooling)."""
    if block.padding_mode != "zeros" or isinstance(block.padding, str):
        return False
    centred = all(k % 2 and p >= d * (k // 2) for p, d, k in zip(block.padding, block.dilation, block.kernel_size))
    pooled = all(d == 1 and 2 * p <= k for p, d, k in zip(block.padding, block.dilation, block.kernel_size))
    return (centred or not {"1x1", "identity"} & set(block.kinds)) and (pooled or "avg" not in block.kinds)


def _sizes(block, input_shape) -> tuple[float, float, float]:
    """(batch · output pixels, batch · input pixels, kernel taps) of a call."""
    b, _, h, w = input_shape
    kh, kw = block.kernel_size
    return b * h * w / (block.stride[0] * block.stride[1]), b * h * w, kh * kw


def _costs(block, input_shape, out_c: int, in_c: int) -> dict[str, tuple[float, float]]:
    """(FLOPs, element passes) of each way to run a block's conv at ``out_c`` × ``in_c`` channels (the teacher's, or
    a student's slice) beyond the conv with one kernel, which all ways run: merged, the merge; branch-wise and
    separate, the convs they add (the middle channels of ``1x1_kxk`` stay the teacher's)."""
    groups, kinds = block.groups, block.kinds
    mid = block.in_channels // groups  # 1x1_kxk's middle channels per group, the teacher's
    in_g = in_c // groups
    pixels_out, pixels_in, taps = _sizes(block, input_shape)
    kernel, outputs = out_c * in_g * taps, pixels_out * out_c
    seq = 2 * pixels_in * in_c * mid + 2 * pixels_out * out_c * mid * taps  # 1x1_kxk as its two convs
    costs = {MERGED: (2 * out_c * in_g * mid * taps * (SEQUENTIAL in kinds), 3 * kernel * len(kinds))}
    if SEQUENTIAL in kinds:
        costs[BRANCHWISE] = (seq, 3 * kernel * len(kinds) + 6 * outputs)
    if separable(block) and (groups == 1 or "dw_1x1" not in kinds):
        flops = sum({SEQUENTIAL: seq, "1x1": 2 * pixels_out * out_c * in_g, "avg": 2 * pixels_out * out_c * in_g,
                     "dw_1x1": 2 * pixels_out * in_c * taps + 2 * pixels_out * out_c * in_c}.get(k, 0) for k in kinds)
        if "identity" in kinds and "1x1" not in kinds:
            flops += 2 * pixels_out * out_c * in_g
        costs[SEPARATE] = (flops, 4 * outputs * len(kinds) + 3 * pixels_in * in_c)
    return costs


def teacher_cost(block, input_shape, with_student: bool) -> dict[str, tuple[float, float]]:
    """(FLOPs, element passes) of each way to run the teacher's block beyond its one conv; ``with_student`` adds
    what each costs the student's conv in the same step (its slice of the teacher's merged kernel, or its own
    cheapest way)."""
    costs = _costs(block, input_shape, block.out_channels, block.in_channels)
    if with_student:
        whole, own = student_cost(block, input_shape, whole_merged=True), student_cost(block, input_shape, False)
        costs = {plan: _plus(c, whole[MERGED] if plan == MERGED else own[cheaper(own)]) for plan, c in costs.items()}
    return costs


def student_cost(block, input_shape, whole_merged: bool) -> dict[str, tuple[float, float]]:
    """(FLOPs, element passes) of each way to run the student's conv that reads the block's slice, beyond its one
    conv: merged, a slice of the teacher's merged kernel (``whole_merged``: this step made it; a slice and its
    gradient's scatter back) or the merge of its own slice; branch-wise and separate, dense kernels only."""
    s_out, s_in = block.student_channels  # the student kernel's (out, in per group)
    taps = math.prod(block.kernel_size)
    if whole_merged:
        return {MERGED: (0.0, block.weight.numel() + 3 * s_out * s_in * taps)}
    if block.groups != 1:  # the slice is cut from the whole merged kernel
        return {MERGED: _costs(block, input_shape, block.out_channels, block.in_channels)[MERGED]}
    return _costs(block, input_shape, s_out, s_in)


def _plus(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return a[0] + b[0], a[1] + b[1]


def describe_plan(block, input_shape) -> dict:
    """What a GPD step at this input shape runs in the teacher and the student, what each way adds (GFLOP, and
    millions of elements moved by elementwise passes), and the batch from which merging is the teacher's cheapest
    plan at this spatial size."""
    cost = teacher_cost(block, input_shape, with_student=True)
    plan = cheaper(cost)
    student = MERGED if plan == MERGED else cheaper(student_cost(block, input_shape, whole_merged=False))
    return {"input": list(input_shape), "plan": plan, "student_plan": student,
            "gflop": {k: round(f / 1e9, 3) for k, (f, _) in cost.items()},
            "m_elements": {k: round(e / 1e6, 3) for k, (_, e) in cost.items()},
            "merged_from_batch": _merged_from(block, *input_shape[1:])}


def _merged_from(block, c: int, h: int, w: int) -> int:
    """The smallest batch at which the teacher merges (the other ways outgrow merging as the batch grows)."""
    def merges(n: int) -> bool:
        return cheaper(teacher_cost(block, (n, c, h, w), with_student=True)) == MERGED

    hi = 1
    while not merges(hi):
        hi *= 2
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if merges(mid) else (mid, hi)
    return hi


@contextmanager
def recorded_shapes(model: nn.Module):
    """Yields {block name: (block, input shape)} for the branch blocks of ``model`` at their first call inside."""
    from .branch_conv import BranchConv2d  # noqa: PLC0415 (the blocks use this module's cost model)

    seen: dict[str, tuple[nn.Module, tuple]] = {}

    def recorder(name):
        def pre_hook(block, args):
            seen.setdefault(name, (block, tuple(args[0].shape)))
        return pre_hook

    handles = [m.register_forward_pre_hook(recorder(n)) for n, m in model.named_modules() if isinstance(m, BranchConv2d)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def describe_plans(seen: dict[str, tuple[nn.Module, tuple]], batch: int | None = None) -> dict[str, dict]:
    """``describe_plan`` of each recorded block, at the recorded batch size or ``batch``: for reports."""
    return {name: describe_plan(block, (batch or shape[0], *shape[1:])) for name, (block, shape) in seen.items()}


def plans_at(model: nn.Module, x: torch.Tensor, batch: int) -> dict[str, dict]:
    """``describe_plans`` of a GPD step at ``batch`` inputs shaped like ``x`` (one eval forward of ``model``)."""
    was = model.training
    with recorded_shapes(model) as seen, torch.no_grad():
        model.eval()(x)
    model.train(was)
    return describe_plans(seen, batch)
