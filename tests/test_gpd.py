"""``gpdc.GPD``: the GPD objective as one module with one backward (METHOD.md §4).

One backward of ``.loss`` gives exactly the gradients of the two backward passes it replaces (float64, both
``student_grad`` modes, with and without a static teacher); the module's parameters are the teacher's, its
state_dict holds the student's BatchNorm buffers and not the static teacher; it runs under bf16 autocast close to
float32, under timm's EMA and AveragedModel, and — the point of it — under DistributedDataParallel with 2 gloo
processes the ranks stay identical (``examples/own_loop.py``), while training the student outside it warns."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpdc
from gpdc.exactness import randomize
from gpdc.train.losses import soft_cross_entropy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from conftest import free_port  # noqa: E402
from model import build_model  # noqa: E402


def expansion(dtype=torch.float64):
    torch.manual_seed(0)
    model = randomize(build_model()).to(dtype).train()
    return gpdc.expand(model, {"input_shape": [2, 3, 16, 16], "expand": {"ratio": 1.5}})


def two_backwards(exp, static, cfg, x, y):
    """METHOD.md §4 as gpdc train did it: teacher loss backward, then student loss backward."""
    exp.student.balanced_grad = cfg.student_grad == "balanced"
    s = static(x) if static is not None else None
    zd = exp.teacher(x)
    loss_d = F.cross_entropy(zd, y) + (gpdc.gpd.kd_loss(cfg, zd, s, y) if s is not None else 0)
    loss_d.backward()
    z = exp.student(x)
    loss_s = F.cross_entropy(z, y) + (gpdc.gpd.kd_loss(cfg, z, s, y) if s is not None else 0)
    loss_s = loss_s + cfg.sce_weight * soft_cross_entropy(z, F.softmax(zd.detach() / cfg.sce_temperature, 1),
                                                          cfg.sce_label_smoothing, cfg.sce_temperature)
    loss_s.backward()
    return {n: p.grad.clone() for n, p in exp.teacher.named_parameters()}


@pytest.mark.parametrize("with_static", [False, True], ids=["no_static", "static_dkd"])
@pytest.mark.parametrize("student_grad", ["paper", "balanced"])
def test_one_backward_equals_the_two_it_replaces(student_grad, with_static):
    exp = expansion()
    static = randomize(build_model()).double().eval() if with_static else None
    gpd = gpdc.GPD(copy.deepcopy(exp), static, {"student_grad": student_grad, "kd": "dkd"})
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (4,))
    want = two_backwards(exp, static, gpd.cfg, x, y)
    out = gpd(x, y)
    out.loss.backward()
    assert set(out.parts) == ({"teacher_ce", "student_ce", "student_sce"}
                              | ({"teacher_kd", "student_kd"} if with_static else set()))
    torch.testing.assert_close(out.loss, sum(out.parts.values()))
    for n, p in gpd.teacher.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-10, atol=1e-12, msg=n)
    for (n, a), b in zip(gpd.student.net.named_buffers(), exp.student.net.buffers()):  # BN statistics alike
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_parameters_state_dict_and_static_teacher():
    exp = expansion(torch.float32)
    static = build_model()
    gpd = gpdc.GPD(exp, static)
    assert [id(p) for p in gpd.parameters()] == [id(p) for p in exp.teacher.parameters()]
    keys = set(gpd.state_dict())
    assert "student.net.stem.1.running_mean" in keys and not any("static" in k for k in keys)
    assert all(not p.requires_grad for p in static.parameters()) and not static.training
    gpd.to(torch.float64)
    assert next(static.parameters()).dtype == torch.float64  # moves with the module
    gpd.train()
    assert not static.training  # keeps the mode the spec gave it


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    gpd = gpdc.GPD(expansion(torch.float32))
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    ref = gpd(x, y).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gpd(x, y)
    out.loss.backward()
    assert abs(float(out.loss.detach()) - float(ref.detach())) <= 0.05 * abs(float(ref.detach()))
    assert all(torch.isfinite(p.grad).all() for p in gpd.parameters() if p.grad is not None)


def test_ema_and_averaged_model_follow_the_shared_parameters():
    from timm.utils import ModelEmaV3

    gpd = gpdc.GPD(expansion(torch.float32))
    ema = ModelEmaV3(gpd, decay=0.5)
    swa = torch.optim.swa_utils.AveragedModel(gpd)
    opt = torch.optim.SGD(gpd.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    gpd(x, y).loss.backward()
    opt.step()
    ema.update(gpd)
    swa.update_parameters(gpd)
    for averaged in (ema.module, swa.module):
        assert averaged.student.teacher is averaged.teacher  # the copy's student reads the copy's teacher
        with torch.no_grad():
            assert averaged.eval().student(x).shape == (4, 10)
    p, e = next(gpd.parameters()), next(ema.module.parameters())
    assert not torch.equal(p, e)


def test_ddp_keeps_ranks_identical_through_gpd():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", str(ROOT / "examples" / "own_loop.py")],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    diffs = [float(line.split("ranks ")[1]) for line in r.stdout.splitlines() if "difference between ranks" in line]
    assert diffs == [0.0] and "folded student SmallNet" in r.stdout, r.stdout + r.stderr[-3000:]
    assert "outside gpdc.GPD" not in r.stderr, r.stderr[-2000:]
    # Every result is printed before the process group is torn down. About one run in twenty on this machine, a rank
    # then aborts inside torch's gloo teardown at interpreter exit ("terminate called without an active exception",
    # also with the DDP wrapper and its last output deleted first); that exit status alone is not gpdc's to judge.
    teardown = "terminate called without an active exception" in r.stderr
    assert r.returncode == 0 or teardown, r.stderr[-3000:]


@pytest.mark.slow  # torchrun with 2 ranks
def test_the_student_trained_outside_gpd_under_ddp_warns(tmp_path):
    code = (
        "import os, sys, warnings, torch, torch.distributed as dist, gpdc\n"
        f"sys.path.insert(0, {str(ROOT / 'examples')!r})\n"
        "from model import build_model\n"
        "from gpdc.train.distributed import ranks_differ\n"
        "dist.init_process_group('gloo')\n"
        "torch.manual_seed(0)\n"
        "exp = gpdc.expand(build_model(), {'input_shape': [2, 3, 16, 16]})\n"
        "ddp = torch.nn.parallel.DistributedDataParallel(exp.teacher)\n"
        "opt = torch.optim.SGD(exp.teacher.parameters(), lr=0.1)\n"
        "torch.manual_seed(1 + dist.get_rank())  # each rank its own data\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    exp.student.train()(torch.randn(2, 3, 16, 16)).sum().backward()\n"
        "assert any('outside gpdc.GPD' in str(m.message) for m in w), [str(m.message) for m in w]\n"
        "opt.step()\n"
        "assert ranks_differ(exp.teacher, 'cpu') > 0  # the trap the warning names: the ranks drift apart\n"
        "del ddp  # DDP's reducer must go before its process group\n"
        "dist.barrier()\n"
        "dist.destroy_process_group()\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    (tmp_path / "outside.py").write_text(code)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", str(tmp_path / "outside.py")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]


def test_one_merge_per_block_per_step(monkeypatch):
    """Merged, the teacher's forward and the student's read of its slice share each block's merged kernel."""
    from gpdc import branch_conv
    from gpdc.branch_plan import MERGED, forced_plan

    gpd = gpdc.GPD(expansion(torch.float32))
    blocks = [m for m in gpd.teacher.modules() if isinstance(m, branch_conv.BranchConv2d)]
    calls = []
    real = branch_conv._merge
    monkeypatch.setattr(branch_conv, "_merge", lambda *a, **k: calls.append(1) or real(*a, **k))
    with forced_plan(MERGED):
        gpd(torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))).loss.backward()
    assert blocks and len(calls) == len(blocks)


def test_a_bad_train_section_is_a_spec_error():
    with pytest.raises(gpdc.SpecError, match="sce_wieght: unknown key"):
        gpdc.GPD(expansion(torch.float32), train={"sce_wieght": 1.0})


def test_sync_batchnorm_keeps_the_state_and_the_loss():
    """Converted for a multi-GPU run, every BatchNorm (the shared student's, which own no parameters, too) is a
    SyncBatchNorm on the same tables: the same state_dict, the same loss (one process falls back to batch_norm)."""
    from gpdc.train.distributed import sync_batchnorm

    gpd = gpdc.GPD(expansion(torch.float32))
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    before, ref = gpd.state_dict(), gpd(x, y).loss
    sync_batchnorm(gpd, torch.device("cpu"))
    kinds = {type(m) for m in gpd.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {nn.SyncBatchNorm}
    after = gpd.state_dict()
    assert list(after) == list(before) and all(after[k] is before[k] or torch.equal(after[k], before[k]) for k in after)
    torch.testing.assert_close(gpd(x, y).loss, ref, rtol=0, atol=0)
