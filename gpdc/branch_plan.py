"""When a branch block merges its kernel and when it runs its branches (METHOD.md §3, 'Cost of merging').

Merging ``1x1_kxk`` costs ≈ 2·C′³k² FLOPs whatever the batch; running it as its 1×1 and k×k convs costs
≈ 2·B·HW·C′²(1 + k²) beside the conv of the other kinds' kernel, which merge for O(C′²k²). The teacher's block
and the student's conv that reads its slice each pick the cheaper way per call, from the actual shapes; all
ways compute the same function. In a GPD step the student's slice is free when the teacher merged (it is a
slice of the same tensor); otherwise the student merges its own slice (C²C′k²) or runs branch-wise itself.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

SEQUENTIAL = "1x1_kxk"  # the one kind whose merge can cost more than running it
MERGED, BRANCHWISE = "merged", "branch-wise"


_FORCED: ContextVar[str | None] = ContextVar("gpdc_forced_plan", default=None)


@contextmanager
def forced_plan(plan: str):
    """Inside it every block that can run ``plan`` (merged, or branch-wise) does, whatever it costs: to compare
    the two ways (tests, benchmarks)."""
    if plan not in (MERGED, BRANCHWISE):
        raise ValueError(f"plan must be {MERGED!r} or {BRANCHWISE!r}, not {plan!r}")
    token = _FORCED.set(plan)
    try:
        yield
    finally:
        _FORCED.reset(token)


def cheaper(cost: dict[str, float]) -> str:
    forced = _FORCED.get()
    if forced is not None and cost[forced] != math.inf:
        return forced
    return BRANCHWISE if cost[BRANCHWISE] < cost[MERGED] else MERGED


def _sizes(block, input_shape) -> tuple[float, float, float]:
    """(batch · output pixels, batch · input pixels, kernel taps) of a call."""
    b, _, h, w = input_shape
    kh, kw = block.kernel_size
    return b * h * w / (block.stride[0] * block.stride[1]), b * h * w, kh * kw


def teacher_flops(block, input_shape, with_student: bool) -> dict[str, float]:
    """FLOPs of the teacher block's call each way; ``with_student`` adds what its choice costs the student's conv
    in the same step (nothing when merged)."""
    out_c, in_g = block.weight.shape[:2]
    pixels_out, pixels_in, taps = _sizes(block, input_shape)
    conv = 2 * pixels_out * out_c * in_g * taps
    if SEQUENTIAL not in block.kinds:
        return {MERGED: conv, BRANCHWISE: math.inf}
    merge = 2 * out_c * in_g * in_g * taps
    branchwise = 2 * conv + 2 * pixels_in * block.in_channels * in_g
    if with_student:
        branchwise += min(student_flops(block, input_shape, whole_merged=False).values())
    return {MERGED: merge + conv, BRANCHWISE: branchwise}


def student_flops(block, input_shape, whole_merged: bool) -> dict[str, float]:
    """What the student's conv adds to its own conv each way: merged, its slice of the merge (none when the
    teacher's whole merged kernel is at hand); branch-wise (dense convs only), the 1×1 and k×k convs of
    ``1x1_kxk`` over the teacher's middle channels."""
    out_c, in_g = block.weight.shape[:2]
    s_out, s_in = block.student_channels
    pixels_out, pixels_in, taps = _sizes(block, input_shape)
    if SEQUENTIAL not in block.kinds or whole_merged:
        return {MERGED: 0.0, BRANCHWISE: math.inf}
    if block.groups != 1:  # the slice is cut from the whole merged kernel
        return {MERGED: 2 * out_c * in_g * in_g * taps, BRANCHWISE: math.inf}
    return {MERGED: 2 * s_out * s_in * in_g * taps,
            BRANCHWISE: 2 * pixels_in * s_in * in_g + 2 * pixels_out * s_out * in_g * taps}


def describe_plan(block, input_shape) -> dict:
    """What a GPD step at this input shape runs in the teacher and the student, its GFLOP each way, and the
    batch from which merging is the teacher's cheaper plan at this spatial size."""
    cost = teacher_flops(block, input_shape, with_student=True)
    plan = cheaper(cost)
    student = MERGED if plan == MERGED else cheaper(student_flops(block, input_shape, whole_merged=False))
    return {"input": list(input_shape), "plan": plan, "student_plan": student,
            "gflop": {k: round(v / 1e9, 3) for k, v in cost.items() if v != math.inf},
            "merged_from_batch": _merged_from(block, *input_shape[1:])}


def _merged_from(block, c: int, h: int, w: int) -> int:
    """The smallest batch at which the teacher merges (branch-wise outgrows merged as the batch grows)."""
    def merges(n: int) -> bool:
        return cheaper(teacher_flops(block, (n, c, h, w), with_student=True)) == MERGED

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
