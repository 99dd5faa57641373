"""On a CUDA device (skipped where there is none; run on a lent GPU): the GPD objective computes the same loss and
gradients there as on CPU (float64, each way of running the branch blocks), runs under bf16 autocast close to float32 and under fp16
with a GradScaler, gives the eager numbers under channels_last + torch.compile, trains under DistributedDataParallel
over nccl with SyncBatchNorm like the module alone, and ``gpdc train`` runs end to end with bf16, channels_last and
SyncBatchNorm (folded student checked in onnxruntime)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import gpdc
from conftest import free_port
from gpdc.branch_conv import BranchConv2d
from gpdc.branch_plan import MERGED, PLANS, forced_plan
from gpdc.exactness import randomize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from model import build_model  # noqa: E402


@pytest.fixture(autouse=True)
def _no_tf32():
    """float32 on CUDA means float32 here: TF32 matmuls and convs would round to 10 mantissa bits."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def objective(dtype=torch.float32, **train) -> gpdc.GPD:
    """The small CNN of examples/model.py at r = 2 with non-zero branches, as a GPD objective."""
    torch.manual_seed(0)
    exp = gpdc.expand(randomize(build_model()), {"input_shape": [2, 3, 16, 16], "expand": {"ratio": 2.0}})
    with torch.no_grad():
        for m in exp.teacher.modules():
            if isinstance(m, BranchConv2d):
                m.branch_scale.uniform_(-0.5, 0.5)
    return gpdc.GPD(exp, train={"sce_weight": 3.0, **train}).to(dtype).train()


def batch(device, dtype=torch.float32, n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g, dtype=dtype).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def loss_and_grads(gpd, x, y, plan=None):
    gpd.zero_grad()
    with forced_plan(plan) if plan else nullcontext():
        out = gpd(x, y)
    out.loss.backward()
    return [out.loss.detach().cpu()] + [p.grad.cpu() for p in gpd.parameters()]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("student_grad", ["paper", "balanced"])
def test_the_same_loss_and_gradients_as_on_cpu(plan, student_grad):
    cpu = objective(torch.float64, student_grad=student_grad)
    gpu = copy.deepcopy(cpu).cuda()
    x, y = batch("cpu", torch.float64)
    want = loss_and_grads(cpu, x, y, MERGED)
    got = loss_and_grads(gpu, x.cuda(), y.cuda(), plan)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_bf16_autocast_stays_close_to_fp32_and_fp16_steps_with_a_scaler():
    gpd = objective().cuda()
    x, y = batch("cuda")
    ref = float(gpd(x, y).loss.detach())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpd(x, y)
    out.loss.backward()
    assert abs(float(out.loss.detach()) - ref) <= 0.05 * abs(ref)
    assert all(torch.isfinite(p.grad).all() for p in gpd.parameters())
    before = [p.detach().clone() for p in gpd.parameters()]
    opt, scaler = torch.optim.SGD(gpd.parameters(), lr=0.05), torch.amp.GradScaler("cuda")
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.float16):
            out = gpd(x, y)
        opt.zero_grad()
        scaler.scale(out.loss).backward()
        scaler.step(opt)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in gpd.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(gpd.parameters(), before))  # the scaler let a step through


@pytest.mark.slow  # torch.compile: over 80 s on the H200 machine (not seen to finish there yet)
def test_channels_last_and_torch_compile_give_the_eager_numbers():
    gpd = objective().cuda()
    x, y = batch("cuda")
    want = loss_and_grads(gpd, x, y)
    gpd.to(memory_format=torch.channels_last)
    compiled = torch.compile(gpd)
    got = loss_and_grads(compiled, x.contiguous(memory_format=torch.channels_last), y)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()) + 1e-7)


def test_ddp_over_nccl_with_sync_batchnorm_trains_like_the_module_alone():
    """One process, so DDP's all-reduce over nccl averages one copy: the same steps as without DDP."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gpdc.train.distributed import sync_batchnorm

    alone = objective().cuda()
    synced = copy.deepcopy(alone)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        sync_batchnorm(synced, torch.device("cuda"))
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.student.modules())
        wrapped = DDP(synced, device_ids=[0])
        losses = []
        for model, params in ((alone, alone.parameters()), (wrapped, synced.parameters())):
            opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
            losses.append([])
            for i in range(3):
                x, y = batch("cuda", n=8 + i)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(x, y)
                opt.zero_grad()
                out.loss.backward()
                opt.step()
                losses[-1].append(float(out.loss.detach()))
        del wrapped, out
    finally:
        dist.destroy_process_group()
    assert losses[0] == pytest.approx(losses[1], rel=1e-5), losses
    for (k, a), b in zip(alone.state_dict().items(), synced.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_gpdc_train_runs_on_cuda_with_bf16_channels_last_and_sync_bn(tmp_path):
    spec = tmp_path / "gpu.yaml"
    spec.write_text((ROOT / "examples/digits/gpd.yaml").read_text().replace(
        "train:\n", "train:\n  precision: bf16\n  channels_last: true\n  sync_bn: true\n"))
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "gpdc", "train", str(ROOT / "examples/digits/student.py"), "--spec",
                        str(spec), "--epochs", "3", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m[k]) for m in metrics for k in ("student_loss", "teacher_loss")), metrics
    assert metrics[-1]["student_acc"] > 0.5, metrics
    assert json.loads((out / "report.json").read_text())["onnx"]["ok"]
