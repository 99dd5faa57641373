"""Each branch block runs merged, branch-wise or separate per call (all the same function), and the student reads its
slice of a merged kernel without the whole kernel (METHOD.md §3, 'Cost of merging, and when not to')."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gpdc
from gpdc.branch_conv import (KINDS, BranchConv2d, MergedKernel, SharedBranchConv, applicable_kinds, merge_kernel,
                              merged_once)
from gpdc.branch_plan import (BRANCHWISE, MERGED, PLANS, SEPARATE, describe_plan, flops_only, forced_plan, plans_at,
                              separable, student_cost, teacher_cost, total)


def random_block(draw, dtype=torch.float64) -> BranchConv2d:
    """A block of every kind it can carry; half of them separable (zero padding centring the 1×1 taps)."""
    groups = draw(st.sampled_from([1, 2, 4]))
    channels = groups * draw(st.integers(1, 3))
    k = draw(st.sampled_from([2, 3, 5]))  # an even kernel has no centre a 1×1 conv can read: not separable with 1x1
    dilation = draw(st.sampled_from([1, 2]))
    if draw(st.booleans()):
        padding, mode = dilation * (k // 2) + draw(st.sampled_from([0, 1])) * (dilation > 1), "zeros"
    else:
        padding, mode = draw(st.sampled_from([0, 1, k // 2])), draw(st.sampled_from(["zeros", "reflect", "circular"]))
    conv = nn.Conv2d(channels, channels, k, stride=draw(st.sampled_from([1, 2])), padding=padding, dilation=dilation,
                     groups=groups, bias=draw(st.booleans()), padding_mode=mode)
    kinds = applicable_kinds(conv, KINDS)
    if dilation > 1 and draw(st.booleans()):  # without avg, a dilated zero-padded block is separable too
        kinds.remove("avg")
    block = BranchConv2d(conv, tuple(kinds)).to(dtype)
    with torch.no_grad():
        block.branch_scale.uniform_(-1, 1)
    return block


def bound(ref: torch.Tensor, other_error: float) -> float:
    """DESIGN.md §4: float32 rounding of the other way of computing the same function."""
    return max(1e-5 * max(1.0, float(ref.abs().max())), 10 * other_error)


def run(block: BranchConv2d, x: torch.Tensor, plan: str):
    x = x.clone().requires_grad_(True)
    with forced_plan(plan):
        y = block(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    grads = [x.grad] + [p.grad for p in block.parameters()]
    block.zero_grad()
    return [y.detach()] + grads


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_every_plan_agrees_forward_and_backward(data):
    """Float32 merged, branch-wise and separate against a float64 merged reference, each within the DESIGN.md §4
    bound of the others' error (a plan a block cannot run falls back to the cheapest it can)."""
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    block = random_block(data.draw)
    x = torch.randn(2, block.in_channels, 13, 13, dtype=torch.float64)
    ref = run(block, x, MERGED)
    ours = {plan: run(block.float(), x.float(), plan) for plan in PLANS}
    block.double()
    for i, r in enumerate(ref):
        err = {plan: float((t[i].double() - r).abs().max()) for plan, t in ours.items()}
        for plan in PLANS:
            assert err[plan] <= bound(r, min(e for p, e in err.items() if p != plan)), (i, plan, err)


def test_which_blocks_can_run_separate():
    def block(kinds=("kxk", "1x1", "avg"), **conv):
        return BranchConv2d(nn.Conv2d(4, 4, 3, **{"padding": 1} | conv), kinds)

    assert separable(block())
    assert separable(block(padding=2, dilation=2, kinds=("kxk", "1x1")))
    assert not separable(block(padding=2, dilation=2))  # average pooling has no dilation
    assert not separable(block(padding=0))  # the 1×1 taps would read outside the input
    even = BranchConv2d(nn.Conv2d(4, 4, 2, padding=1), ("kxk", "1x1"))
    assert not separable(even) and separable(BranchConv2d(nn.Conv2d(4, 4, 2, padding=1), ("kxk", "avg")))
    assert separable(block(padding=0, kinds=("kxk", "1x1_kxk")))
    assert not separable(block(padding_mode="reflect"))
    assert SEPARATE not in teacher_cost(block(padding=0), (1, 4, 7, 7), with_student=False)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_the_students_slice_equals_the_slice_of_the_whole_kernel(data):
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    block = random_block(data.draw)
    out_c, in_g = block.weight.shape[:2]
    index = {0: torch.tensor(data.draw(st.lists(st.integers(0, out_c - 1), min_size=1, max_size=out_c))),
             1: torch.tensor(data.draw(st.lists(st.integers(0, in_g - 1), min_size=1, max_size=in_g)))}
    index = {d: i for d, i in index.items() if data.draw(st.booleans())}
    params = {f"b.{n}": p for n, p in block.named_parameters()}
    whole = merge_kernel(block.kinds, dict(block.named_parameters()), block.groups)
    for d, idx in index.items():
        whole = whole.index_select(d, idx)
    torch.testing.assert_close(MergedKernel("b", block).select(params, index), whole, rtol=1e-12, atol=1e-12)


def wide_block(channels: int = 256, student: int = 128) -> BranchConv2d:
    block = BranchConv2d(nn.Conv2d(channels, channels, 3, padding=1), ("kxk", "1x1", "1x1_kxk"))
    block.student_channels = (student, student)
    return block


def test_the_plan_follows_batch_and_spatial_size():
    block = wide_block()
    assert block.plan((1, 256, 7, 7)) == SEPARATE  # the merge's FLOPs and kernel-sized passes outweigh the 1×1 convs
    assert block.plan((256, 256, 7, 7)) == MERGED
    assert block.plan((1, 256, 112, 112)) == MERGED
    n = describe_plan(block, (4, 256, 7, 7))["merged_from_batch"]
    assert describe_plan(block, (n, 256, 7, 7))["plan"] == MERGED
    assert describe_plan(block, (n - 1, 256, 7, 7))["plan"] != MERGED
    with flops_only():  # by FLOPs alone, only 1x1_kxk is worth not merging
        assert block.plan((1, 256, 7, 7)) == BRANCHWISE
        assert BranchConv2d(nn.Conv2d(8, 8, 3), ("kxk", "1x1")).plan((1, 8, 3, 3)) == MERGED


def test_inside_a_gpd_step_branchwise_pays_for_the_students_slice():
    """Merged, the student's slice comes free from the teacher's kernel; branch-wise, the student merges its own slice
    or runs branch-wise itself, whichever is cheaper."""
    block = wide_block(student=128)
    shape = (3, 256, 7, 7)
    alone, in_gpd = teacher_cost(block, shape, with_student=False), teacher_cost(block, shape, with_student=True)
    whole, own = student_cost(block, shape, whole_merged=True), student_cost(block, shape, whole_merged=False)
    assert set(in_gpd) == set(PLANS) and whole[MERGED][0] == 0  # no FLOPs: a slice of the teacher's kernel
    assert in_gpd[MERGED] == tuple(a + b for a, b in zip(alone[MERGED], whole[MERGED]))
    cheapest = min(own.values(), key=total)
    for plan in (BRANCHWISE, SEPARATE):
        assert in_gpd[plan] == tuple(a + b for a, b in zip(alone[plan], cheapest))
    with merged_once():
        assert block.plan(shape) == describe_plan(block, shape)["plan"]


def expanded(ratio=2.0, **spec):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    exp = gpdc.expand(model, {"input_shape": [2, 3, 8, 8], "expand": {"ratio": ratio, **spec}})
    with torch.no_grad():
        for m in exp.teacher.modules():
            if isinstance(m, BranchConv2d):
                m.branch_scale.uniform_(-0.5, 0.5)
    return exp


@pytest.mark.parametrize("strategy", ["replicate", "grow"])
@pytest.mark.parametrize("ratio", [1.5, 2.0])
def test_a_gpd_step_has_the_same_loss_and_gradients_every_way(ratio, strategy):
    """Teacher and student run merged, branch-wise or separate: the loss and every gradient agree (float64)."""
    exp = expanded(ratio, strategy=strategy)
    assert any(isinstance(m, SharedBranchConv) for m in exp.student.net.modules())
    gpd = gpdc.GPD(exp, train={"sce_weight": 1.0}).double()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    results = {}
    for plan in PLANS:
        gpd.zero_grad()
        with forced_plan(plan):
            out = gpd(x, y)
        out.loss.backward()
        results[plan] = [out.loss.detach()] + [p.grad.clone() for p in gpd.parameters()]
    for plan in (BRANCHWISE, SEPARATE):
        for a, b in zip(results[MERGED], results[plan]):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_the_student_in_balanced_mode_always_merges():
    exp = expanded()
    exp.student.balanced_grad = True
    shared = [m for m in exp.student.net.modules() if isinstance(m, SharedBranchConv)]
    assert shared and all(m.balanced for m in shared)
    x = torch.randn(2, 3, 8, 8)
    with forced_plan(MERGED), torch.no_grad():
        b = exp.student.eval()(x)
    for plan in (BRANCHWISE, SEPARATE):
        with forced_plan(plan), torch.no_grad():
            torch.testing.assert_close(exp.student(x), b, rtol=0, atol=0)


def test_plans_are_reported_at_a_batch_size():
    block = wide_block()
    model = nn.Sequential(block)
    plans = plans_at(model, torch.randn(2, 256, 7, 7), batch=1)
    assert plans["0"]["plan"] == SEPARATE and plans["0"]["input"] == [1, 256, 7, 7]
    assert plans_at(model, torch.randn(2, 256, 7, 7), batch=4096)["0"]["plan"] == MERGED
    assert model.training  # the eval forward it took leaves the mode as it was


@pytest.mark.parametrize("ratio", [1.5, 2.0])
def test_expand_records_the_students_widths_on_each_block(ratio):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                          nn.LazyLinear(4))
    model(torch.randn(1, 3, 4, 4))
    exp = gpdc.expand(model, {"input_shape": [1, 3, 4, 4], "expand": {"ratio": ratio}})
    block = exp.teacher.get_submodule("2")
    assert block.student_channels == (8, 8) and block.weight.shape[0] == int(8 * ratio)


def test_a_grouped_students_slice_costs_the_teachers_whole_merge():
    """A grouped kernel's slice is cut from the whole merged kernel: the student pays the teacher's merge."""
    block = BranchConv2d(nn.Conv2d(64, 64, 3, padding=1, groups=4), ("kxk", "1x1", "1x1_kxk"))
    block.student_channels = (32, 8)
    shape = (2, 64, 7, 7)
    assert student_cost(block, shape, whole_merged=False) == {MERGED: teacher_cost(block, shape, False)[MERGED]}


@pytest.mark.slow
@pytest.mark.parametrize("plan", PLANS)
def test_torch_compile_gives_the_eager_step_every_way(plan):
    """The plans are Python decisions on shapes and the channel runs are ``narrow`` views: torch.compile of the GPD
    objective traces each way and matches eager (float32, the DESIGN.md §4 scale)."""
    exp = expanded(1.5)
    gpd = gpdc.GPD(exp, train={"sce_weight": 1.0})
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    results = []
    for model in (gpd, torch.compile(gpd)):
        gpd.zero_grad()
        with forced_plan(plan):
            out = model(x, y)
        out.loss.backward()
        results.append([out.loss.detach()] + [p.grad.clone() for p in gpd.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * max(1.0, float(a.abs().max())))
