"""The compile pipeline: fold after training steps, gpdc compile / gpdc check end to end, bad input."""

import json
import os
import stat
import subprocess
import sys

import onnx
import pytest
import torch
import torchvision
from onnx import numpy_helper
from safetensors.torch import load_file

import gpdc
from gpdc.exactness import randomize


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gpdc", *args], capture_output=True, text=True)


@pytest.mark.parametrize("name,strategy", [("resnet18", "replicate"), ("mobilenet_v3_small", "grow"),
                                           ("shufflenet_v2_x0_5", "replicate")])
def test_fold_equals_student_after_optimizer_steps(name, strategy):
    # 48 x 48: the last maps of all three nets are 2 x 2. At 32 x 32 they are 1 x 1, and train-mode BatchNorm over
    # 4 values per channel is ill-conditioned (ShuffleNet: gradient norm ~1e4, outputs ~1e23 after three steps,
    # NaN on some CPUs). The gradient is clipped as gpdc train clips it (train.clip_grad): the steps still move
    # the teacher well away from the student (measured: >= 30x the 1e-3 below), and the outputs stay finite.
    size = 48
    model = randomize(torchvision.models.get_model(name, weights=None, num_classes=10))
    exp = gpdc.expand(model, {"input_shape": [4, 3, size, size], "expand": {"ratio": 1.5, "strategy": strategy}})
    opt = torch.optim.SGD(exp.teacher.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        x, y = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))
        opt.zero_grad()
        exp.teacher.train(), exp.student.train()
        loss = torch.nn.functional.cross_entropy(exp.teacher(x), y) + torch.nn.functional.cross_entropy(exp.student(x), y)
        loss.backward()
        assert torch.isfinite(loss), f"{name}: loss {float(loss)} at step {step}"
        torch.nn.utils.clip_grad_norm_(exp.teacher.parameters(), 5.0, error_if_nonfinite=True)
        opt.step()
    x = torch.randn(4, 3, size, size)
    exp.teacher.eval(), exp.student.eval()
    with torch.no_grad():
        student, teacher = exp.student(x), exp.teacher(x)
        folded = exp.fold()(x)
        fused = exp.fold(fuse_bn=True)(x)
    for what, out in (("student", student), ("teacher", teacher), ("folded", folded), ("fused", fused)):
        assert torch.isfinite(out).all(), f"{name}: the {what} output is not finite after training: {out}"
    gap = float((student - teacher).abs().max())
    assert gap > 1e-3, f"{name}: training did not move student and teacher apart (max difference {gap:.3g})"
    scale = max(1.0, float(student.abs().max()))
    fold_err, fused_err = float((folded - student).abs().max()), float((fused - student).abs().max())
    assert fold_err <= 1e-5 * scale, f"{name}: fold differs from the student by {fold_err:.3g} (scale {scale:.3g})"
    assert fused_err <= 1e-4 * scale, f"{name}: BN-fused fold differs from the student by {fused_err:.3g} (scale {scale:.3g})"
    fresh = torchvision.models.get_model(name, weights=None, num_classes=10)
    fresh.load_state_dict(exp.fold_state_dict(), strict=True)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled")
    r = run_cli("compile", "examples/model.py", "--spec", "specs/example.yaml", "--out", str(out), "--explain")
    return out, r


def test_compile_writes_checked_artifacts(compiled):
    out, r = compiled
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["report.json", "student.onnx", "student.safetensors", "teacher.safetensors"]
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["fold"]["ok"] and report["onnx"]["ok"]
    assert all(c["ok"] for c in report["ir"].values())
    assert set(report["seconds"]) >= {"expand", "fold", "export", "check_onnx"}
    assert all("C" in g and "C_teacher" in g for g in report["groups"])
    assert "[branch] stage1.0.conv1: branches" in r.stdout  # --explain
    plans = report["branch_plans"]  # how a GPD step at the spec's batch runs each block, and what each way costs
    assert plans and all(p["plan"] in p["gflop"] and set(p["gflop"]) == set(p["m_elements"]) for p in plans.values())
    assert f"{next(iter(plans))}: a GPD step at batch" in r.stdout
    sys.path.insert(0, "examples")
    try:
        from model import build_model
    finally:
        sys.path.pop(0)
    build_model().load_state_dict(load_file(out / "student.safetensors"), strict=True)
    teacher = load_file(out / "teacher.safetensors")
    assert any(k.endswith("branch_scale") for k in teacher)


def test_check_passes_and_tampered_onnx_fails(compiled, tmp_path):
    out, _ = compiled
    ok = run_cli("check", str(out / "student.onnx"), "--model", "examples/model.py", "--weights", str(out / "student.safetensors"))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    proto = onnx.load(out / "student.onnx")
    init = max(proto.graph.initializer, key=lambda t: int(torch.tensor(t.dims).prod()) if t.dims else 0)
    w = numpy_helper.to_array(init).copy()
    w += 0.5  # every weight of the largest layer: one weight alone can sit on a channel the check inputs leave dead
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(proto, tmp_path / "tampered.onnx")
    bad = run_cli("check", str(tmp_path / "tampered.onnx"), "--model", "examples/model.py", "--weights", str(out / "student.safetensors"))
    assert bad.returncode == 1, bad.stderr
    assert json.loads(bad.stdout)["ok"] is False


def test_check_rejects_mismatched_weights(compiled):
    out, _ = compiled
    r = run_cli("check", str(out / "student.onnx"), "--model", "torchvision:resnet18", "--weights", str(out / "student.safetensors"))
    assert r.returncode == 2 and "does not match" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", ["malformed_spec", "no_build_model", "unknown_torchvision", "unwritable_out"])
def test_compile_bad_input_exits_2_and_writes_nothing(kind, tmp_path):
    out = tmp_path / "out"
    spec = "specs/example.yaml"
    model = "examples/model.py"
    if kind == "malformed_spec":
        (tmp_path / "s.yaml").write_text("expand:\n  ratio: [2\n")
        spec = str(tmp_path / "s.yaml")
    elif kind == "no_build_model":
        (tmp_path / "m.py").write_text("x = 1\n")
        model = str(tmp_path / "m.py")
    elif kind == "unknown_torchvision":
        model = "torchvision:not_a_model"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        out = locked / "out"
        if os.geteuid() == 0:  # root ignores permissions: use a path below a regular file instead
            (tmp_path / "file").write_text("")
            out = tmp_path / "file" / "out"
    r = run_cli("compile", model, "--spec", spec, "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "error:" in r.stderr
    assert not out.exists() or not any(out.iterdir())


NO_ONNX = '''
import torch.nn.functional as F
from torch import nn


class NoOnnx(nn.Module):
    """Ops neither ONNX exporter takes: an antialiased bicubic resize (TorchScript), 5-D attention (dynamo)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        q = x.unsqueeze(1)
        x = x + F.scaled_dot_product_attention(q, q, q).squeeze(1)
        x = F.interpolate(self.conv1(x), scale_factor=2.0, mode="bicubic", antialias=True)
        return self.head(self.conv2(x).mean((2, 3)))


def build_model():
    return NoOnnx()
'''


@pytest.mark.slow  # two CLI processes
def test_a_model_no_onnx_exporter_takes_is_one_paragraph_and_compiles_with_no_onnx(tmp_path):
    """Both exporters' reasons in one paragraph (their own printing — the TorchScript exporter's whole IR graph —
    kept off the console), nothing written; ``--no-onnx`` writes the rest, every other check on."""
    (tmp_path / "m.py").write_text(NO_ONNX)
    (tmp_path / "s.yaml").write_text("input_shape: [2, 3, 6, 6]\n")
    args = [str(tmp_path / "m.py"), "--spec", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")]
    r = run_cli("compile", *args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "Torch IR" not in r.stdout + r.stderr
    error = r.stderr[r.stderr.index("error:"):]
    assert "torch.onnx cannot export" in error and "_upsample_bicubic2d_aa" in error and "only 4D" in error
    assert "--no-onnx" in error and not (tmp_path / "out").exists()
    r = run_cli("compile", *args, "--no-onnx")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["report.json", "student.safetensors", "teacher.safetensors"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["ok"] and report["onnx"] is None and all(c["ok"] for c in report["ir"].values())
