"""CBR branches: each kind's merged kernel, and each way of running a block, equals its unmerged branch computation;
exact at init."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpdc
from gpdc.branch_conv import KINDS, BranchConv2d, branch_kernel
from gpdc.branch_plan import MERGED, PLANS, forced_plan
from gpdc.exactness import randomize


def unmerged(kind: str, block: BranchConv2d, x: torch.Tensor) -> torch.Tensor:
    """The branch as the layers it stands for (no bias)."""
    s, p, g = block.stride, block.padding, block.groups
    k = block.kernel_size[0]
    if kind == "kxk":
        return F.conv2d(x, block.weight, None, s, p, groups=g)
    if kind == "1x1":
        return F.conv2d(x, block.w_1x1, None, s, p[0] - k // 2, groups=g)
    if kind == "avg":
        return F.avg_pool2d(F.conv2d(x, block.w_avg, None, 1, p, groups=g), k, s)
    if kind == "1x1_kxk":
        mid = F.conv2d(x, block.w_1x1_kxk_a, None, 1, 0, groups=g)
        return F.conv2d(mid, block.w_1x1_kxk_b, None, s, p, groups=g)
    if kind == "identity":
        return x
    if kind == "dw_1x1":
        mid = F.conv2d(x, block.w_dw_1x1_dw, None, s, p, groups=block.in_channels)
        return F.conv2d(mid, block.w_dw_1x1_pw)
    raise AssertionError(kind)


@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5])
def test_each_branch_kernel_matches_its_layers(k, stride, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, k, stride=stride, padding=k // 2, groups=groups, bias=True).double()
    kinds = ("kxk",) + tuple(kd for kd in KINDS if kd != "kxk"
                             and not (kd == "identity" and stride != 1) and not (kd == "dw_1x1" and groups != 1))
    block = BranchConv2d(conv, kinds).double()
    x = torch.randn(2, 8, 11, 11, dtype=torch.float64)
    with torch.no_grad():
        with forced_plan(MERGED):  # exact at init: only the original kernel has a non-zero scale
            torch.testing.assert_close(block(x), conv(x), rtol=0, atol=0)
        for plan in PLANS:  # each way of running the block (merged kernel, branch-wise, separate convs)
            for b, kind in enumerate(kinds):
                kernel = branch_kernel(kind, dict(block.named_parameters()), block.weight, groups)
                assert kernel.shape == block.weight.shape
                scale = torch.zeros_like(block.branch_scale)
                scale[b] = torch.linspace(0.5, 2.0, block.out_channels, dtype=torch.float64)
                block.branch_scale.copy_(scale)
                want = unmerged(kind, block, x) * scale[b].view(1, -1, 1, 1) + conv.bias.view(1, -1, 1, 1)
                with forced_plan(plan):
                    torch.testing.assert_close(block(x), want, rtol=1e-12, atol=1e-12, msg=f"{kind} {plan}")


def test_branch_structure_and_spec_selection():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1),
                          nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 4, 4))
    exp = gpdc.expand(model, {"input_shape": [1, 3, 4, 4], "branches": {"kinds": ["1x1", "identity"], "layers": "2"}})
    assert isinstance(exp.teacher.get_submodule("2"), BranchConv2d)
    assert exp.teacher.get_submodule("2").kinds == ("kxk", "1x1", "identity")
    assert type(exp.teacher.get_submodule("0")) is nn.Conv2d  # not matched by layers
    assert type(exp.teacher.get_submodule("3")) is nn.Conv2d  # 1x1: nothing to merge
    assert any("0: no branches (not matched" in line for line in exp.log)
    off = gpdc.expand(model, {"input_shape": [1, 3, 4, 4], "branches": {"kinds": []}})
    assert not any(isinstance(m, BranchConv2d) for m in off.teacher.modules())


def test_student_reads_the_merged_kernel_after_branch_scales_move():
    import torchvision

    model = randomize(torchvision.models.resnet18(num_classes=5))
    exp = gpdc.expand(model, {"input_shape": [2, 3, 32, 32], "expand": {"ratio": 1.5}})
    with torch.no_grad():
        for m in exp.teacher.modules():
            if isinstance(m, BranchConv2d):
                m.branch_scale.uniform_(-0.3, 0.3)
    x = torch.randn(2, 3, 32, 32)
    fresh = torchvision.models.resnet18(num_classes=5)
    fresh.load_state_dict(exp.fold_state_dict(), strict=True)
    with torch.no_grad():
        a = exp.student.eval()(x)
        b = fresh.eval()(x)
    assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(a.abs().max()))
