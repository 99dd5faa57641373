"""Feature distillation: taps, ReviewKD (ABF + HCL against hand computations), FitNet, and GPD + ReviewKD training.

Taps name modules, one-segment globs or torch.fx nodes; the dynamic teacher's tapped features, read back to the
student's channels, equal the student's at init (DESIGN.md §4 criterion against a float64 reference, BatchNorm in
eval and train mode, both IR strategies). ``gpdc train`` with ``kd: reviewkd`` runs scratch, distill and baseline,
checkpoints the connectors, resumes exactly through the weight's warm-up, folds to a strict-loading student, and runs
under torchrun with 2 processes."""

from __future__ import annotations

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
from hypothesis import given, settings, strategies as st
from torch import nn

import gpdc
from conftest import free_port
from gpdc.exactness import compare, randomize, set_mode
from gpdc.feature_kd import ABF, FitNet, ReviewKD, hcl
from gpdc.features import taps_of
from gpdc.spec import TrainSpec
from gpdc.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples/digits"
SPEC = DIGITS / "reviewkd.yaml"


# -- HCL and ABF by hand -----------------------------------------------------------------------------------------

def _mse(a, b) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)


def _pool(m: list[list[float]], size: int) -> list[float]:
    """Average pool of a square map (side divisible by ``size``) into size×size, row-major."""
    step = len(m) // size
    return [sum(m[i * step + a][j * step + b] for a in range(step) for b in range(step)) / step ** 2
            for i in range(size) for j in range(size)]


def test_hcl_against_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    levels = [(torch.randn(1, 1, 8, 8, generator=g), torch.randn(1, 1, 8, 8, generator=g)),
              (torch.randn(1, 1, 4, 4, generator=g), torch.randn(1, 1, 4, 4, generator=g)),
              (torch.randn(1, 1, 1, 1, generator=g), torch.randn(1, 1, 1, 1, generator=g))]
    want = 0.0
    for s, t in levels:
        sm, tm = s[0, 0].tolist(), t[0, 0].tolist()
        flat = lambda m: [v for row in m for v in row]  # noqa: E731
        terms, weights = [(1.0, _mse(flat(sm), flat(tm)))], 1.0
        w = 1.0
        for size in (4, 2, 1):
            if size < len(sm):  # pools smaller than the map: 8×8 uses 4, 2, 1; 4×4 uses 2, 1; 1×1 none
                w /= 2
                terms.append((w, _mse(_pool(sm, size), _pool(tm, size))))
                weights += w
        want += sum(a * b for a, b in terms) / weights
    got = hcl([s for s, _ in levels], [t for _, t in levels])
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_abf_against_a_hand_computation():
    """One channel everywhere: conv1 ×2, conv2 the identity 3×3, BatchNorm in eval mode (÷√(1+ε)), known attention."""
    abf = ABF(1, 1, 1, fuse=True).double().eval()
    with torch.no_grad():
        abf.conv1[0].weight.fill_(2.0)
        abf.conv2[0].weight.zero_()
        abf.conv2[0].weight[0, 0, 1, 1] = 1.0
        abf.att[0].weight.copy_(torch.tensor([[0.5, -1.0], [0.25, 0.75]], dtype=torch.float64).view(2, 2, 1, 1))
        abf.att[0].bias.copy_(torch.tensor([0.1, -0.2], dtype=torch.float64))
    x = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]], dtype=torch.float64)
    residual = torch.tensor([[[[0.7]]]], dtype=torch.float64)
    with torch.no_grad():
        out, fused = abf(x, residual, (2, 2))
    bn = 1 / math.sqrt(1 + 1e-5)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    for i, xv in enumerate([1.0, -2.0, 0.5, 3.0]):
        a = 2 * xv * bn  # conv1 + its BatchNorm
        z0, z1 = sig(0.5 * a - 1.0 * 0.7 + 0.1), sig(0.25 * a + 0.75 * 0.7 - 0.2)
        f = a * z0 + 0.7 * z1
        assert float(fused.flatten()[i]) == pytest.approx(f, rel=1e-12)
        assert float(out.flatten()[i]) == pytest.approx(f * bn, rel=1e-12)


def test_reviewkd_reviews_from_the_deepest_level():
    """Connectors run deepest first, only the deepest without fusion; the result equals the same ABFs composed by
    hand in that order and compared level by level."""
    cfg = TrainSpec(kd="reviewkd", reviewkd={"weight": 2.0})
    student, teacher = [(8, 8, 8), (16, 4, 4), (16,)], [(12, 8, 8), (24, 4, 4), (24,)]
    loss = ReviewKD(student, teacher, cfg).train()
    assert [abf.att is None for abf in loss.abfs] == [True, False, False]
    assert [abf.conv1[0].in_channels for abf in loss.abfs] == [16, 16, 8]  # mid = min(512, 16)
    assert [abf.conv2[0].out_channels for abf in loss.abfs] == [24, 24, 12]
    g = torch.Generator().manual_seed(1)
    fs = [torch.randn(2, *s, generator=g) for s in student]
    ft = [torch.randn(2, *s, generator=g) for s in teacher]
    deep, res = loss.abfs[0](fs[2].view(2, 16, 1, 1), None, (1, 1))
    mid, res = loss.abfs[1](fs[1], res, (4, 4))
    top, _ = loss.abfs[2](fs[0], res, (8, 8))
    want = 2.0 * hcl([top, mid, deep], [ft[0], ft[1], ft[2].view(2, 24, 1, 1)])
    torch.testing.assert_close(loss(fs, ft), want)


def test_fitnet_regresses_each_feature_to_the_teachers():
    cfg = TrainSpec(kd="fitnet", fitnet={"weight": 3.0})
    loss = FitNet([(4, 6, 6), (8,)], [(4, 3, 3), (8,)], cfg).eval()
    with torch.no_grad():
        for r in loss.regressors:
            r[0].weight.copy_(torch.eye(r[0].out_channels).view_as(r[0].weight))
    g = torch.Generator().manual_seed(2)
    fs = [torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 8, generator=g)]
    ft = [torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 8, generator=g)]
    bn = 1 / math.sqrt(1 + 1e-5)
    want = F.mse_loss(F.avg_pool2d(fs[0], 2) * bn, ft[0]) + F.mse_loss(fs[1] * bn, ft[1])
    torch.testing.assert_close(loss(fs, ft), 3.0 * want)


def test_warm_up_ramps_the_weight_per_epoch():
    loss = FitNet([(4,)], [(4,)], TrainSpec(kd="fitnet", fitnet={"weight": 1.0, "warmup_epochs": 4}))
    ramps = []
    for epoch in range(6):
        loss.set_epoch(epoch)
        ramps.append(float(loss.ramp))
    assert ramps == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


# -- taps ----------------------------------------------------------------------------------------------------------

class Net(nn.Module):
    """A user-style CNN: functional ops, a residual add, a pooled head."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(2 * c)
        self.head = nn.Linear(2 * c, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.block1(x))
        x = F.relu(self.bn(self.down(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def expanded(ratio=2.0, strategy="replicate", model=None):
    torch.manual_seed(0)
    model = randomize(model or Net()).double()
    return gpdc.expand(model, {"input_shape": [2, 3, 8, 8], "expand": {"ratio": ratio, "strategy": strategy}})


def test_taps_resolve_modules_globs_and_nodes():
    exp = expanded()
    s, t = exp.feature_taps(["stem", "block*", "relu", "flatten"])
    assert s.names == ["stem", "block1", "relu", "flatten"]
    assert s.shapes == [(6, 8, 8), (6, 8, 8), (6, 8, 8), (12,)]
    assert t.shapes == [(12, 8, 8), (12, 8, 8), (12, 8, 8), (24,)] and all(m is not None for m in t.maps)
    with pytest.raises(gpdc.SpecError, match="'layer1' names no module or node of the student.*stem"):
        exp.feature_taps(["layer1"])


@settings(max_examples=6, deadline=None)
@given(ratio=st.sampled_from([1.5, 2.0, 3.0]), strategy=st.sampled_from(["replicate", "grow"]),
       taps=st.lists(st.sampled_from(["stem", "block1", "add", "relu_1", "bn", "flatten"]), min_size=1, max_size=4))
def test_the_dynamic_teachers_taps_read_back_to_the_students(ratio, strategy, taps):
    """At init, each tapped teacher feature read back to the student's channels is the original's (float64 ref)."""
    exp = expanded(ratio, strategy)
    student, teacher = exp.feature_taps(taps)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for norm_train in (False, True):
        ref_model = set_mode(copy.deepcopy(exp.original), norm_train)
        f32 = set_mode(copy.deepcopy(exp.original).float(), norm_train)
        with torch.no_grad():
            _, ref = student(ref_model, x)
            _, own = student(f32, x.float())
            _, mine = exp.student.train(norm_train).features(student, x)
            _, wide = teacher(exp.teacher.train(norm_train), x)
        for got in (teacher.student_view(wide), mine):
            e = compare(got, ref, own)
            assert e.ok, (taps, norm_train, e)


class ChannelsLast(nn.Module):
    """A ConvNeXt-style block: a depthwise conv on (N, C, H, W), then LayerNorm and an MLP on (N, H, W, C)."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.fc2(F.gelu(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        return self.head((x + y.permute(0, 3, 1, 2)).mean((2, 3)))


@pytest.mark.parametrize("strategy", ["replicate", "grow"])
def test_taps_inside_a_channels_last_block_are_read_channels_first(strategy):
    """The MLP's (N, H, W, C) features come out as (N, C, H, W) for the student, the dynamic teacher (read back to
    the student's channels exactly) and the static teacher, and a feature loss is built on their channels — not on
    H = 5 "channels", as a dim-1 convention would silently do."""
    torch.manual_seed(0)
    model = randomize(ChannelsLast()).double()
    exp = gpdc.expand(model, {"input_shape": [2, 3, 5, 6], "expand": {"ratio": 2.0, "strategy": strategy}})
    student, teacher = exp.feature_taps(["fc1", "fc2", "dw"])  # in graph order: dw, fc1, fc2
    assert student.dims == [1, 3, 3] and student.shapes == [(8, 5, 6), (32, 5, 6), (8, 5, 6)]
    assert teacher.shapes == [(16, 5, 6), (64, 5, 6), (16, 5, 6)]
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        _, (_, fc1, _) = student(exp.original, x)
        torch.testing.assert_close(fc1, model.fc1(model.norm(model.dw(model.stem(x)).permute(0, 2, 3, 1)))
                                   .permute(0, 3, 1, 2))
        for norm_train in (False, True):
            _, ref = student(set_mode(exp.original, norm_train), x)
            _, own = student(set_mode(copy.deepcopy(exp.original).float(), norm_train), x.float())
            _, wide = teacher(set_mode(exp.teacher, norm_train), x)
            e = compare(teacher.student_view(wide), ref, own)
            assert e.ok, (norm_train, e)
    static = ChannelsLast(12).double()
    gpd = gpdc.GPD(exp, static, {"kd": "fitnet"}, features={"student": ["fc2"]}).double()
    assert [r[0].in_channels for r in gpd.feature_kd["teacher"].regressors] == [16]
    assert [(r[0].in_channels, r[0].out_channels) for r in gpd.feature_kd["student"].regressors] == [(8, 12)]
    gpd(x, torch.tensor([1, 2])).loss.backward()


def test_a_feature_loss_needs_taps_and_pairs_them_in_order():
    exp = expanded()
    static = randomize(Net(8)).double().eval()
    with pytest.raises(gpdc.SpecError, match="add a features: section"):
        gpdc.GPD(exp, static, {"kd": "reviewkd"})
    with pytest.raises(gpdc.SpecError, match="the student has 2 tapped features and the static teacher 1"):
        gpdc.GPD(exp, static, {"kd": "reviewkd"}, features={"student": ["stem", "relu"], "teacher": ["relu"]})
    with pytest.raises(gpdc.SpecError, match=r"\(N, 12, 4\) with its channels first"):
        taps = taps_of(gpdc.trace(Tokens(), [2, 4, 6]), ["proj"], "the student")
        ReviewKD(taps.shapes, taps.shapes, TrainSpec(kd="reviewkd"))


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 12)

    def forward(self, x):
        return self.proj(x).mean(1)


def test_gpd_with_reviewkd_trains_connectors_beside_the_teacher():
    exp = expanded()
    static = randomize(Net(8)).double().eval()
    gpd = gpdc.GPD(exp, static, {"kd": "reviewkd"}, features={"student": ["stem", "relu", "flatten"]}).double()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,))
    out = gpd(x, y)
    assert set(out.parts) == {"teacher_ce", "student_ce", "teacher_kd", "student_kd", "student_sce"}
    out.loss.backward()
    connectors = dict(gpd.feature_kd.named_parameters())
    assert connectors and all(p.grad is not None and p.grad.abs().sum() > 0 for p in connectors.values())
    assert gpd.feature_kd["teacher"].abfs[0].conv1[0].in_channels == 24  # the teacher's (r = 2) pooled feature
    assert gpd.feature_kd["student"].abfs[0].conv1[0].in_channels == 12
    keys = gpd.state_dict().keys()
    assert any(k.startswith("feature_kd.teacher.") for k in keys) and not any(k.startswith("static") for k in keys)
    assert isinstance(exp.fold(), Net)  # the connectors are not the student's


# -- gpdc train -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    spec = gpdc.load_spec(DIGITS / "teacher.yaml")
    train(str(DIGITS / "teacher.py"), spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": 3})}),
          "digits", str(out), export=False)
    return out / "student.safetensors"


def reviewkd_spec(**train):
    spec = gpdc.load_spec(SPEC)
    return spec.model_copy(update={"train": TrainSpec.model_validate(spec.train.model_dump() | {"epochs": 3, **train})})


def test_gpd_reviewkd_runs_resumes_exactly_and_folds(tmp_path, digits_teacher):
    spec = reviewkd_spec(reviewkd={"weight": 1.0, "warmup_epochs": 2})
    kw = dict(teacher_ref=str(DIGITS / "teacher.py"), teacher_weights=str(digits_teacher), seed=2)
    full = train(str(DIGITS / "student.py"), spec, "digits", str(tmp_path / "a"), **kw)
    assert all(math.isfinite(m["student_loss"]) for m in full) and full[-1]["student_acc"] > 0.5, full
    state = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)
    assert any(k.startswith("feature_kd.student.abfs.") for k in state["objective"])
    train(str(DIGITS / "student.py"), spec, "digits", str(tmp_path / "b"), export=False, stop_after=1, **kw)
    resumed = train(str(DIGITS / "student.py"), spec, "digits", str(tmp_path / "b"), export=False, resume=True, **kw)
    strip = lambda ms: [{k: v for k, v in m.items() if "second" not in k} for m in ms]  # noqa: E731 (timings)
    assert strip(resumed) == strip(full)
    from safetensors.torch import load_file
    sys.path.insert(0, str(DIGITS))
    try:
        import student
    finally:
        sys.path.pop(0)
    student.build_model().load_state_dict(load_file(tmp_path / "a" / "student.safetensors"), strict=True)
    assert json.loads((tmp_path / "a" / "report.json").read_text())["onnx"]["ok"]


@pytest.mark.parametrize("options", [{"gpd": False}, {}], ids=["reviewkd_baseline", "scratch"])
def test_reviewkd_baseline_and_scratch_run(tmp_path, digits_teacher, options):
    kw = dict(teacher_ref=str(DIGITS / "teacher.py"), teacher_weights=str(digits_teacher)) if options else {}
    metrics = train(str(DIGITS / "student.py"), reviewkd_spec(**options), "digits", str(tmp_path / "o"), export=False,
                    **kw)
    assert metrics[-1]["student_acc"] > 0.4 and all(math.isfinite(m["student_loss"]) for m in metrics), metrics


@pytest.mark.slow  # torchrun with 2 ranks
def test_gpd_reviewkd_under_torchrun(tmp_path, digits_teacher):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                        "-m", "gpdc", "train", str(DIGITS / "student.py"), "--spec", str(SPEC), "--epochs", "2",
                        "--teacher", str(DIGITS / "teacher.py"), "--teacher-weights", str(digits_teacher),
                        "--out", str(tmp_path / "ddp")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["student_acc"] > 0.3, lines


def test_a_registered_feature_loss_of_ones_own(monkeypatch):
    """README's attention transfer: registered by name, accepted by the spec, built for teacher and student."""
    from gpdc import feature_kd

    monkeypatch.setattr(feature_kd, "FEATURE_LOSSES", dict(feature_kd.FEATURE_LOSSES))
    at = lambda f: F.normalize(f.pow(2).mean(1).flatten(1))  # noqa: E731

    @gpdc.register_feature_loss("at")
    class AttentionTransfer(gpdc.FeatureLoss):
        def __init__(self, student, teacher, cfg, student_shapes=None):
            super().__init__(student, teacher, weight=1000.0)

        def forward(self, fs, ft):
            return self.scaled(sum((at(s) - at(t)).pow(2).mean() for s, t in zip(fs, ft)))

    exp = expanded()
    static = randomize(Net(8)).double().eval()
    gpd = gpdc.GPD(exp, static, {"kd": "at"}, features={"student": ["stem", "relu"]})
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,))
    parts = gpd(x, y).parts
    with torch.no_grad():
        _, fs = exp.student.features(gpd.taps[0], x)
        _, ft = gpd.static_taps(static, x)
    want = 1000.0 * sum((at(s) - at(t)).pow(2).mean() for s, t in zip(fs, ft))
    torch.testing.assert_close(parts["student_kd"].detach(), want)
    with pytest.raises(gpdc.SpecError, match="unknown distillation 'attention'.*at"):
        gpdc.GPD(exp, static, {"kd": "attention"})


def _zoo(name: str) -> nn.Module:
    import timm
    import torchvision

    if name.startswith("timm:"):
        kw = {"img_size": 32} if "vit" in name else {"conv_mlp": False} if "convnext" in name else {}  # its MLP: NHWC
        return timm.create_model(name[5:], num_classes=10, **kw)
    return getattr(torchvision.models, name)(num_classes=10)


@pytest.mark.slow
@pytest.mark.parametrize("name,taps", [("mobilenet_v2", "features.*"), ("densenet121", "features.denseblock*"),
                                       ("timm:efficientnet_b0", "blocks.*"), ("timm:vit_tiny_patch16_224", "blocks.*"),
                                       ("timm:convnext_atto", "stages.*.blocks.0.mlp.fc1")])
def test_zoo_taps_read_back_exactly(name, taps):
    """Real architectures, every stage tapped: the dynamic teacher's features read back are the student's. The CNNs
    run at 64×64: at 32×32 their last stages are 1×1 maps, where train-mode BatchNorm over 2 values per channel is so
    ill-conditioned that float32 rounding alone can flip a normalised sign (the original's own error reached 1.4 % of
    the output's scale for one input)."""
    torch.manual_seed(0)
    size = 32 if "vit" in name else 64
    exp = gpdc.expand(randomize(_zoo(name)).eval(), {"input_shape": [2, 3, size, size], "expand": {"ratio": 2.0}})
    student, teacher = exp.feature_taps([taps])
    assert len(student.names) >= 4, student.names
    assert "convnext" not in name or student.dims == [3] * 4, student.dims  # inside the blocks: (N, H, W, C)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    for norm_train in (False, True):
        with torch.no_grad():
            _, ref = student(set_mode(copy.deepcopy(exp.original).double(), norm_train), x.double())
            _, own = student(set_mode(copy.deepcopy(exp.original), norm_train), x)
            _, wide = teacher(set_mode(exp.teacher, norm_train), x)
        e = compare(teacher.student_view(wide), ref, own)
        assert e.ok, (norm_train, e)


def test_a_wrong_tap_on_the_command_line_is_one_paragraph_and_nothing_written(tmp_path, digits_teacher):
    spec = tmp_path / "bad.yaml"
    spec.write_text(SPEC.read_text().replace("[stage1, down, stage2, pool]", "[stage1, dwn, stage2, pool]"))
    r = subprocess.run([sys.executable, "-m", "gpdc", "train", str(DIGITS / "student.py"), "--spec", str(spec),
                        "--teacher", str(DIGITS / "teacher.py"), "--teacher-weights", str(digits_teacher),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "'dwn' names no module or node of the static teacher" in r.stderr and "down, fc, pool" in r.stderr
    assert not (tmp_path / "o").exists()


class InPlace(nn.Module):
    """A residual sum rectified in place after it, as torchvision's ResNets do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        out = self.conv(x)
        out += 1.0
        return self.head(self.relu(out).mean((2, 3)))


def test_a_tap_keeps_its_value_through_later_in_place_ops():
    torch.manual_seed(0)
    model = InPlace()
    gm = gpdc.trace(model, [2, 3, 6, 6])
    add = next(n.name for n in gm.graph.nodes if "add" in n.name)
    taps = taps_of(gm, ["conv", add], "the model", model)
    x = torch.randn(2, 3, 6, 6)
    out, (conv, summed) = taps(model, x)
    with torch.no_grad():
        want = model.conv(x)
    torch.testing.assert_close(conv, want)  # not shifted by the in-place += 1
    torch.testing.assert_close(summed, want + 1.0)  # not rectified by the in-place ReLU
    assert (summed < 0).any()
    torch.testing.assert_close(out, model(x))


def test_reviewkd_recipes_fill_what_is_not_given():
    assert (TrainSpec().reviewkd.weight, TrainSpec().reviewkd.warmup_epochs) == (1.0, 0)  # ImageNet's
    cifar = TrainSpec(kd="reviewkd", reviewkd={"recipe": "cifar100"}).reviewkd
    assert (cifar.weight, cifar.warmup_epochs) == (5.0, 20)
    own = TrainSpec(kd="reviewkd", reviewkd={"recipe": "cifar100", "weight": 2.0}).reviewkd
    assert (own.weight, own.warmup_epochs) == (2.0, 20)
    assert TrainSpec.model_validate(TrainSpec(reviewkd={"recipe": "cifar100"}).model_dump()).reviewkd == cifar
    with pytest.raises(gpdc.SpecError, match="train.reviewkd.recipe"):
        gpdc.load_spec({"train": {"reviewkd": {"recipe": "cifar10"}}})
