"""GPD training: the step, the losses, resume, DDP, ImageFolder data and bad input."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpdc
from conftest import free_port
from gpdc.spec import TrainSpec
from gpdc.train.loop import train
from gpdc.train.losses import dkd, hinton_kd, soft_cross_entropy
from gpdc.train.step import train_step

ROOT = Path(__file__).resolve().parent.parent
STUDENT = str(ROOT / "examples/digits/student.py")
TEACHER = str(ROOT / "examples/digits/teacher.py")


def tiny_spec(**train):
    return gpdc.Spec.model_validate({"input_shape": [2, 1, 8, 8], "expand": {"ratio": 1.5},
                                     "train": {"epochs": 2, "batch_size": 128, "lr": 0.05, **train}})


def test_hinton_kd_by_hand():
    s, t = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.2, 1.5, 1.0]])
    T = 2.0
    ps, pt = F.softmax(s / T, 1)[0], F.softmax(t / T, 1)[0]
    want = float(sum(pt[i] * math.log(pt[i] / ps[i]) for i in range(3))) * T * T
    assert float(hinton_kd(s, t, T)) == pytest.approx(want, rel=1e-6)


def test_soft_cross_entropy_by_hand():
    z, p = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.7, 0.2, 0.1]])
    q = [0.9 * 0.7 + 0.1 / 3, 0.9 * 0.2 + 0.1 / 3, 0.9 * 0.1 + 0.1 / 3]
    logp = F.log_softmax(z, 1)[0]
    assert float(soft_cross_entropy(z, p, 0.1)) == pytest.approx(-sum(q[i] * float(logp[i]) for i in range(3)), rel=1e-6)


def test_dkd_by_hand():
    s, t, y = torch.tensor([[1.0, 2.0, 0.5, -0.3]]), torch.tensor([[0.2, 1.5, 1.0, 0.4]]), torch.tensor([1])
    a, b, T = 1.0, 2.0, 1.5
    ps, pt = F.softmax(s / T, 1)[0], F.softmax(t / T, 1)[0]
    bs, bt = [float(ps[1]), 1 - float(ps[1])], [float(pt[1]), 1 - float(pt[1])]
    tckd = sum(bt[i] * math.log(bt[i] / bs[i]) for i in range(2)) * T * T
    others = [0, 2, 3]
    qs = F.softmax(s[0, others] / T, 0)
    qt = F.softmax(t[0, others] / T, 0)
    nckd = float((qt * (qt / qs).log()).sum()) * T * T
    assert float(dkd(s, t, y, a, b, T)) == pytest.approx(a * tckd + b * nckd, rel=1e-5)


@pytest.mark.parametrize("strategy,grad", [("replicate", "paper"), ("replicate", "balanced"), ("grow", "paper")])
def test_one_step_moves_shared_slice_by_both_gradients(strategy, grad):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).double()
    exp = gpdc.expand(model, {"input_shape": [2, 1, 6, 6], "expand": {"ratio": 1.5, "strategy": strategy}})
    exp.teacher.double()
    exp.student.balanced_grad = grad == "balanced"
    cfg = TrainSpec(lr=1.0, momentum=0.0, weight_decay=0.0, clip_grad=None, kd="none", sce_weight=3.0,
                    student_grad=grad)
    x, y = torch.randn(5, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    params = list(exp.teacher.parameters())
    before = [p.detach().clone() for p in params]
    exp.teacher.train(), exp.student.train()
    # explicit reference: d L_d / d theta + d L_s / d theta, both at the same (old) parameters
    zd = exp.teacher(x)
    g_d = torch.autograd.grad(F.cross_entropy(zd, y), params, allow_unused=True)
    sp = exp.param_map.read_all(dict(exp.teacher.named_parameters()))  # paper scaling
    from torch.func import functional_call
    z = functional_call(copy.deepcopy(exp.original).train(), sp, (x,))  # the student's architecture, plain
    loss_s = F.cross_entropy(z, y) + 3.0 * soft_cross_entropy(z, F.softmax(zd.detach(), 1), 0.1)
    g_sp = torch.autograd.grad(loss_s, list(sp.values()))
    g_s = {id(p): torch.zeros_like(p) for p in params}
    tp = dict(exp.teacher.named_parameters())
    for (name, src), g in zip(exp.param_map.sources.items(), g_sp):
        p = tp[src.teacher]
        if src.teacher in exp.param_map.derived:  # merged kernels: chain through the merge
            g_full = torch.autograd.grad(exp.param_map.derived[src.teacher](tp), params, allow_unused=True,
                                         grad_outputs=_scatter(g, src, exp.param_map.derived[src.teacher](tp), grad))
            for q, gq in zip(params, g_full):
                if gq is not None:
                    g_s[id(q)] += gq
            continue
        g_s[id(p)] += _scatter(g, src, p, grad)
    optimizer = torch.optim.SGD(params, lr=1.0)
    train_step(gpdc.GPD(exp, train=cfg), params, cfg, x, y, optimizer)
    for p, b, gd in zip(params, before, g_d):
        want = b - ((gd if gd is not None else 0) + g_s[id(p)])
        torch.testing.assert_close(p.detach(), want, rtol=1e-9, atol=1e-12)


def _scatter(g, src, like, mode):
    """Gradient w.r.t. the teacher tensor from the gradient w.r.t. the student parameter."""
    for d, s in src.scale.items():
        shape = [1] * g.dim()
        shape[d] = -1
        s = s.to(g.dtype).view(shape)
        g = g / s if mode == "balanced" else g * s
    out = torch.zeros_like(like)
    idx = [torch.arange(n) for n in like.shape]
    for d, i in src.index.items():
        idx[d] = i
    out[torch.meshgrid(*idx, indexing="ij")] = g
    return out


def test_resume_gives_the_same_metrics(tmp_path):
    spec = tiny_spec(epochs=3, ema=0.9)
    full = train(STUDENT, spec, "digits", str(tmp_path / "a"), seed=3, export=False)
    train(STUDENT, spec, "digits", str(tmp_path / "b"), seed=3, export=False, stop_after=2)
    assert not (tmp_path / "b" / "student.safetensors").exists()
    resumed = train(STUDENT, spec, "digits", str(tmp_path / "b"), seed=3, export=False, resume=True)
    strip = lambda ms: [{k: v for k, v in m.items() if "second" not in k} for m in ms]  # noqa: E731 (timings)
    assert strip(resumed) == strip(full)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_distill_run_writes_everything(tmp_path):
    teacher_dir = tmp_path / "t"
    train(TEACHER, gpdc.Spec.model_validate({"input_shape": [2, 1, 8, 8], "train": {"gpd": False, "kd": "none", "epochs": 1}}),
          "digits", str(teacher_dir), export=False)
    out = tmp_path / "s"
    metrics = train(STUDENT, tiny_spec(epochs=1), "digits", str(out), teacher_ref=TEACHER,
                    teacher_weights=str(teacher_dir / "student.safetensors"))
    assert {"student_acc", "teacher_acc", "static_acc", "student_loss", "teacher_loss", "lr", "seconds"} <= set(metrics[0])
    assert sorted(os.listdir(out)) == ["best", "gap.png", "last.ckpt", "metrics.jsonl", "report.json", "student.onnx",
                                       "student.safetensors", "tb", "teacher.safetensors"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"step/student_loss", "step/teacher_loss", "step/lr", "epoch/student_acc", "epoch/teacher_acc",
            "epoch/images_per_second"} <= scalars, scalars
    assert "gap" in events.Tags()["images"]
    assert [e.value for e in events.Scalars("epoch/student_acc")] == pytest.approx([metrics[0]["student_acc"]])
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["student_acc"] == max(m["student_acc"] for m in metrics)
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["ok"]
    plans = report["branch_plans"]  # how each branch block ran at the training batch
    assert plans and all(p["input"][0] == tiny_spec(epochs=1).train.batch_size and p["plan"] in ("merged", "branch-wise")
                         for p in plans.values())
    from safetensors.torch import load_file
    sys.path.insert(0, str(ROOT / "examples/digits"))
    try:
        import student
    finally:
        sys.path.pop(0)
    student.build_model().load_state_dict(load_file(out / "student.safetensors"), strict=True)


def test_imagefolder_run(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c, colour in enumerate(((255, 0, 0), (0, 0, 255))):
            d = tmp_path / "data" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(6):
                noise = (torch.rand(8, 8, 3, generator=g) * 60).to(torch.uint8)
                img = torch.tensor(colour, dtype=torch.uint8).view(1, 1, 3).expand(8, 8, 3) // 2 + noise
                Image.fromarray(img.numpy()).save(d / f"{i}.png")
    (tmp_path / "m.py").write_text(
        "from torch import nn\n"
        "def build_model():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n")
    spec = gpdc.Spec.model_validate({"input_shape": [2, 3, 8, 8], "train": {"epochs": 2, "batch_size": 4}})
    metrics = train(str(tmp_path / "m.py"), spec, f"imagefolder:{tmp_path / 'data'}", str(tmp_path / "out"))
    assert len(metrics) == 2 and (tmp_path / "out" / "student.onnx").exists()


@pytest.mark.slow  # the fast tier keeps DDP through gpdc.GPD (tests/test_gpd.py)
def test_ddp_two_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # three epochs, not two: after two (cosine over two) the student is at 0.57-0.87 depending on the seed (0.73 at
    # seed 0), too close to the 0.5 below; after three it is at 0.88-0.93 for seeds 0-4 (measured, 2 ranks)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                        "-m", "gpdc", "train", STUDENT, "--spec", str(ROOT / "examples/digits/gpd.yaml"),
                        "--epochs", "3", "--out", str(tmp_path / "ddp")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # rank 0 writes once per epoch
    m = json.loads(lines[-1])
    assert all(math.isfinite(json.loads(line)[k]) for line in lines for k in ("student_loss", "teacher_loss")), lines
    assert 0.5 < m["student_acc"] <= 1.0 and m["teacher_acc"] is not None, m
    # accuracy is reduced over both ranks' halves of the 360 test images
    assert round(m["student_acc"] * 360) == pytest.approx(m["student_acc"] * 360, abs=1e-6)
    assert (tmp_path / "ddp" / "student.safetensors").exists()


@pytest.mark.slow  # torchrun with 2 ranks
def test_sync_bn_on_cpu_ranks_is_a_clear_error(tmp_path):
    spec = tmp_path / "sync.yaml"
    spec.write_text((ROOT / "examples/digits/gpd.yaml").read_text().replace("train:\n", "train:\n  sync_bn: true\n"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                        "-m", "gpdc", "train", STUDENT, "--spec", str(spec), "--epochs", "1", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env)
    # torchrun reports its failed ranks with a traceback of its own; none comes from gpdc
    assert r.returncode != 0 and "train.sync_bn needs GPUs" in r.stderr, r.stderr[-2000:]
    assert "exitcode  : 2" in r.stderr and str(ROOT / "gpdc") not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "o" / "last.ckpt").exists()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gpdc", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args,needle", [
    (["--data", "cifar10:/nonexistent"], "does not exist"),
    (["--data", "imagenet"], "unknown data"),
    (["--teacher", TEACHER, "--teacher-weights", "/nonexistent.safetensors"], "do not exist"),
    (["--teacher", TEACHER, "--teacher-weights", "{student_w}"], "do not fit the teacher"),
    (["--student-weights", "{bad}"], "cannot be read"),
    (["--resume"], "no checkpoint"),
])
def test_train_bad_input_exits_2(tmp_path, args, needle):
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "examples/digits"))
    try:
        import student
    finally:
        sys.path.pop(0)
    save_file(student.build_model().state_dict(), tmp_path / "s.safetensors")
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    args = [a.format(student_w=tmp_path / "s.safetensors", bad=tmp_path / "bad.pt") for a in args]
    r = run_cli("train", STUDENT, "--spec", str(ROOT / "examples/digits/gpd.yaml"), "--epochs", "1",
                "--out", str(tmp_path / "o"), *args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert needle in " ".join(r.stderr.split()) and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--epochs", "0"], "epochs: Input should be greater than or equal to 1"),
    (["--epochs", "-1"], "epochs: Input should be greater than or equal to 1"),
    (["--batch-size", "0"], "batch_size: Input should be greater than or equal to 1"),
    (["--lr", "-1"], "lr: Input should be greater than 0"),
])
def test_command_line_overrides_are_validated_like_the_spec(tmp_path, args, needle):
    r = run_cli("train", STUDENT, "--spec", str(ROOT / "examples/digits/gpd.yaml"), "--out", str(tmp_path / "o"), *args)
    assert r.returncode == 2, r.stderr[-2000:]
    text = " ".join(r.stderr.split())
    assert needle in text and f"command line's {' '.join(args)}" in text and "Traceback" not in r.stderr, text
    assert not (tmp_path / "o").exists()  # nothing written, nothing trained


def test_a_model_for_other_images_is_a_clear_error_before_training(tmp_path):
    (tmp_path / "rgb.py").write_text("from torch import nn\n"
                                     "def build_model():\n"
                                     "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
                                     "                         nn.Flatten(), nn.Linear(8, 10))\n")
    r = run_cli("train", str(tmp_path / "rgb.py"), "--spec", str(ROOT / "examples/digits/gpd.yaml"),
                "--out", str(tmp_path / "o"))
    text = " ".join(r.stderr.split())
    assert r.returncode == 2 and "the student cannot run on the data's images (one is [1, 8, 8])" in text, text
    assert "Traceback" not in r.stderr and not (tmp_path / "o" / "last.ckpt").exists()


def test_one_file_holds_student_and_teacher(tmp_path):
    """--entry and --teacher-entry pick two builders of one file; the teacher's weights come as a DDP checkpoint."""
    (tmp_path / "both.py").write_text(
        "from torch import nn\n"
        "def build_student():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(4, 10))\n"
        "def build_teacher():\n"
        "    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(16, 10))\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import both
    finally:
        sys.path.pop(0)
    torch.save({"state_dict": {f"module.{k}": v for k, v in both.build_teacher().state_dict().items()}, "epoch": 9},
               tmp_path / "teacher.pth")
    metrics = train(str(tmp_path / "both.py"), tiny_spec(epochs=1), "digits", str(tmp_path / "o"),
                    teacher_ref=str(tmp_path / "both.py"), teacher_weights=str(tmp_path / "teacher.pth"),
                    entry="build_student", teacher_entry="build_teacher", export=False)
    assert metrics[0]["static_acc"] is not None


@pytest.mark.parametrize("damage,needle", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "cannot be read"),
    (lambda p: p.write_bytes(b"garbage" * 100), "cannot be read"),
    (lambda p: torch.save({"epoch": 1}, p), "is not a gpdc training checkpoint"),
    (None, "belongs to another model or spec"),
], ids=["truncated", "garbage", "foreign", "other_ratio"])
def test_a_bad_checkpoint_is_a_clear_error_naming_it(tmp_path, damage, needle):
    out = tmp_path / "o"
    train(STUDENT, tiny_spec(epochs=2), "digits", str(out), stop_after=1)
    spec = tiny_spec(epochs=2)
    if damage is None:
        spec = spec.model_copy(update={"expand": spec.expand.model_copy(update={"ratio": 2.0})})
    else:
        damage(out / "last.ckpt")
    with pytest.raises(gpdc.GpdcError) as e:
        train(STUDENT, spec, "digits", str(out), resume=True)
    assert needle in str(e.value) and str(out / "last.ckpt") in str(e.value), str(e.value)


def test_grad_accum_gives_the_full_batch_step():
    """Without BatchNorm, two micro-batches whose losses are weighted by their share give the full-batch step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).double()
    exp = gpdc.expand(model, {"input_shape": [2, 1, 6, 6], "expand": {"ratio": 1.5}})
    x, y = torch.randn(6, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    after = []
    for accum in (1, 2, 3):
        gpd = gpdc.GPD(copy.deepcopy(exp), train={"grad_accum": accum, "kd": "none"})
        params = list(gpd.parameters())
        losses = train_step(gpd, params, gpd.cfg, x, y, torch.optim.SGD(params, lr=0.5))
        after.append(([p.detach().clone() for p in params], losses))
    for params, losses in after[1:]:
        for p, q in zip(params, after[0][0]):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        assert losses == pytest.approx(after[0][1], rel=1e-9)


@pytest.mark.parametrize("options", [
    {"precision": "bf16", "channels_last": True, "grad_accum": 2},
    {"precision": "fp16"},
], ids=["bf16_channels_last_accum", "fp16_scaler"])
def test_mixed_precision_runs_and_resumes(tmp_path, options):
    spec = tiny_spec(epochs=2)
    spec = spec.model_copy(update={"train": spec.train.model_copy(update=options)})
    full = train(STUDENT, spec, "digits", str(tmp_path / "a"), seed=1, export=False)
    assert all(math.isfinite(m[k]) for m in full for k in ("student_loss", "teacher_loss")), full
    assert full[-1]["student_acc"] > 0.3, full  # it learns
    train(STUDENT, spec, "digits", str(tmp_path / "b"), seed=1, export=False, stop_after=1)
    if options["precision"] == "fp16":
        assert "scaler" in torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    resumed = train(STUDENT, spec, "digits", str(tmp_path / "b"), seed=1, export=False, resume=True)
    strip = lambda ms: [{k: v for k, v in m.items() if "second" not in k} for m in ms]  # noqa: E731 (timings)
    assert strip(resumed) == strip(full)


@pytest.mark.slow
def test_compiled_objective_trains(tmp_path):
    spec = tiny_spec(epochs=1)
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"compile": True})})
    metrics = train(STUDENT, spec, "digits", str(tmp_path / "c"), export=False)
    assert math.isfinite(metrics[0]["student_loss"]) and metrics[0]["student_acc"] > 0.1, metrics


@pytest.mark.skipif(sys.platform != "linux" or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only")
def test_cpu_training_keeps_freed_memory_in_the_process():
    """gpdc train on CPU asks glibc to serve blocks up to 32 MiB from its heap and keep freed heap (each step would
    otherwise page-fault fresh memory for its large tensors): both settings are accepted."""
    assert gpdc.keep_freed_memory()


@pytest.mark.slow  # a training run
def test_a_student_no_onnx_exporter_takes_keeps_its_trained_weights(tmp_path):
    """After training, an export neither ONNX exporter can do is reported (report.json, the log), not a crash that
    loses the run; the folded student is written."""
    (tmp_path / "m.py").write_text(
        "import torch.nn.functional as F\n"
        "from torch import nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv1, self.conv2, self.fc = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3), nn.Linear(6, 10)\n"
        "    def forward(self, x):\n"
        "        q = x.unsqueeze(1)\n"
        "        x = x + F.scaled_dot_product_attention(q, q, q).squeeze(1)  # 5-D: not for the dynamo exporter\n"
        "        x = F.interpolate(self.conv1(x), scale_factor=0.5, mode='bicubic', antialias=True)  # nor TorchScript\n"
        "        return self.fc(self.conv2(x).mean((2, 3)))\n"
        "def build_model():\n"
        "    return M()\n")
    lines = []
    metrics = train(str(tmp_path / "m.py"), tiny_spec(epochs=1), "digits", str(tmp_path / "out"), log=lines.append)
    out = tmp_path / "out"
    assert len(metrics) == 1 and (out / "student.safetensors").exists() and not (out / "student.onnx").exists()
    report = json.loads((out / "report.json").read_text())
    assert not report["onnx"]["ok"] and "torch.onnx cannot export" in report["onnx"]["error"]
    assert any(line.startswith("no student.onnx: torch.onnx cannot export") for line in lines)
