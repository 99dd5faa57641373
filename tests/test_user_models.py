"""The models users bring (tests/user_models/), loaded as shipped (``gpdc.models.load_model(file, entry)``, what
``gpdc compile FILE --entry NAME`` does), through expand → check → fold, and ``gpdc compile`` end to end.

Per builder and strategy (r = 1.5, ``replicate`` and ``grow``, random weights with randomised BatchNorm
statistics and FrozenBatchNorm2d buffers): teacher and shared student exact in eval and train mode; both return
the model's output structure (same pytree TreeSpec, pinned leaves with the model's shapes); the folded student
is the user's class and, loaded strict into a fresh build, equals the shared student on every tensor leaf.
``expand.free_outputs`` lets feature leaves widen: more groups widen, and the teacher's output read back to the
student's channels equals the student's output. Slow cases (the torchvision dense models, ResNet-32x4, the
``grow`` case of the three deepest CIFAR models) are marked ``slow``.
"""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
import yaml
from safetensors.torch import load_file

import gpdc
from gpdc.exactness import check_expansion, randomize
from gpdc.models import load_model
from gpdc.outputs import describe

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(__file__).resolve().parent / "user_models"
slow = pytest.mark.slow
STRATEGIES = ("replicate", "grow")

# builder -> (file, input size, slow, output structure of the default call ``model(x)``)
CORPUS = {
    "resnet8x4": ("kd_cifar.py", 32, False, "(Tensor, {feats: [Tensor×4], pooled: Tensor})"),
    "resnet8x4_feats": ("kd_cifar.py", 32, False, "(Tensor, {feats: [Tensor×4], pooled: Tensor})"),
    "resnet8x4_namedtuple": ("kd_cifar.py", 32, False, "KDOutput(logits=Tensor, feats=[Tensor×4], pooled=Tensor)"),
    "resnet8x4_dataclass": ("kd_cifar.py", 32, False,
                            "FeatureOutput(logits=Tensor, feats=[Tensor×4], pooled=Tensor)"),
    "resnet32x4": ("kd_cifar.py", 32, True, "Tensor"),
    "resnet56": ("kd_cifar.py", 32, False, "Tensor"),
    "resnet20_4stage": ("kd_cifar.py", 32, False, "Tensor"),
    "wrn_16_2": ("kd_cifar.py", 32, False, "Tensor"),
    "wrn_40_2": ("kd_cifar.py", 32, False, "Tensor"),
    "mobilenetv2": ("kd_cifar.py", 32, False, "Tensor"),
    "shufflenetv1": ("kd_cifar.py", 32, False, "Tensor"),
    "shufflenetv2": ("kd_cifar.py", 32, False, "Tensor"),
    "vgg8": ("kd_cifar.py", 32, False, "Tensor"),
    "fcn_resnet50": ("torchvision_dense.py", 64, True, "OrderedDict{out: Tensor, aux: Tensor}"),
    "deeplabv3_mobilenet_v3_large": ("torchvision_dense.py", 64, True, "OrderedDict{out: Tensor, aux: Tensor}"),
    "lraspp_mobilenet_v3_large": ("torchvision_dense.py", 64, True, "OrderedDict{out: Tensor}"),
    "resnet_fpn_backbone_r18": ("torchvision_dense.py", 64, True,
                                "OrderedDict{0: Tensor, 1: Tensor, 2: Tensor, 3: Tensor, pool: Tensor}"),
}
# models with forward(x, is_feat=False, preact=False): the number of feature maps with is_feat=True
FLAG_MODELS = {"resnet32x4": 4, "resnet56": 4, "resnet20_4stage": 5, "wrn_16_2": 4, "wrn_40_2": 4, "mobilenetv2": 5,
               "shufflenetv1": 4, "shufflenetv2": 4, "vgg8": 5, "resnet8x4": 4}


# the deepest CIFAR models run their `grow` case only with the slow tests (keeps the default run short)
SLOW_GROW = {"resnet56", "wrn_40_2", "shufflenetv2"}


def _marks(name, strategy=None):
    return (slow,) if CORPUS[name][2] or (strategy == "grow" and name in SLOW_GROW) else ()


# --------------------------------------------------------------------------------------------------- helpers

def build(name):
    """A fresh model as ``gpdc compile FILE --entry NAME`` loads it."""
    return load_model(str(MODELS / CORPUS[name][0]), name)


def spec(size, strategy="replicate", batch=2, **expand):
    return {"input_shape": [batch, 3, size, size], "expand": {"ratio": 1.5, "strategy": strategy, **expand}}


def flat(out):
    leaves, treespec = pytree.tree_flatten(out)
    return leaves, treespec


def widened(exp) -> int:
    return sum(g.ratio > 1 for g in exp.groups)


def student_features(exp, teacher_output):
    """The teacher's output read back to the student's channels (the API being landed; one place to rename)."""
    fn = getattr(exp, "student_features", None) or exp.student_view
    return fn(teacher_output)


def assert_leaves_close(got, want, rel=1e-5, what=""):
    """Every leaf of ``got`` equals ``want``'s within ``rel`` × max(1, max|leaf|). Leaves only: a fresh build
    from the file has its own (equal but distinct) dataclass / namedtuple classes."""
    g, w = flat(got)[0], flat(want)[0]
    assert len(g) == len(w), f"{what}: {len(g)} leaves vs {len(w)}"
    for i, (a, b) in enumerate(zip(g, w)):
        if not isinstance(b, torch.Tensor):
            assert a == b, f"{what}: leaf {i}: {a!r} != {b!r}"
            continue
        assert a.shape == b.shape, f"{what}: leaf {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        err = float((a.double() - b.double()).abs().max()) if b.numel() else 0.0
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        assert err <= rel * scale, f"{what}: leaf {i} ({tuple(b.shape)}): max error {err:.3g} > {rel} × {scale:.3g}"


# ------------------------------------------------------------------------------------ the corpus itself

def _builders(file):
    import importlib.util

    spec_ = importlib.util.spec_from_file_location(f"_corpus_{Path(file).stem}", MODELS / file)
    module = importlib.util.module_from_spec(spec_)
    sys.modules[spec_.name] = module
    try:
        spec_.loader.exec_module(module)
    finally:
        sys.modules.pop(spec_.name, None)
    return {n for n, f in vars(module).items() if inspect.isfunction(f) and f.__module__ == module.__name__
            and not n.startswith("_") and not inspect.signature(f).parameters}


def test_corpus_lists_every_builder():
    found = _builders("kd_cifar.py") | _builders("torchvision_dense.py")
    assert found == set(CORPUS), f"unlisted: {found - set(CORPUS)}, missing: {set(CORPUS) - found}"


@pytest.mark.parametrize("name", list(CORPUS))
def test_model_runs_eagerly(name):
    """The corpus itself: builds, runs at its input size, returns the documented structure; the flag-style
    models return features with is_feat=True (and pre-activations with preact=True)."""
    model = build(name).eval()
    size = CORPUS[name][1]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x)
    assert describe(out) == CORPUS[name][3]
    logits = flat(out)[0][0]
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()
    if name in FLAG_MODELS:
        with torch.no_grad():
            feat = model(x, is_feat=True)
            pre = model(x, is_feat=True, preact=True)
        n = FLAG_MODELS[name]
        assert describe(feat) == f"(Tensor, {{feats: [Tensor×{n}], pooled: Tensor}})"
        assert torch.equal(feat[0], flat(out)[0][0])
        assert [f.shape for f in feat[1]["feats"]] == [f.shape for f in pre[1]["feats"]]
        assert feat[1]["pooled"].shape == (2, model_width(model))
        if name not in ("mobilenetv2", "wrn_16_2", "wrn_40_2"):  # their features are not ReLU outputs
            assert any((p < 0).any() for p in pre[1]["feats"][1:]), "preact features should keep negatives"
            assert all((f >= 0).all() for f in feat[1]["feats"][1:])


def model_width(model):
    fc = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    return fc.in_features


def test_load_model_imports_a_file_with_postponed_annotations_and_a_dataclass(tmp_path):
    """``python model.py`` runs a file with ``from __future__ import annotations`` and a dataclass output type;
    so must ``gpdc compile model.py`` (dataclasses look their module up in sys.modules while the file runs)."""
    file = tmp_path / "dc_model.py"
    file.write_text("from __future__ import annotations\n"
                    "from dataclasses import dataclass\n"
                    "import torch\n\n\n"
                    "@dataclass\nclass Output:\n    logits: torch.Tensor\n    feats: list\n\n\n"
                    "def build_model():\n    return torch.nn.Conv2d(3, 4, 3)\n")
    assert subprocess.run([sys.executable, str(file)]).returncode == 0
    assert isinstance(load_model(str(file)), torch.nn.Conv2d)


def test_vgg8_pools_once_more_at_64():
    model = build("vgg8").eval()
    with torch.no_grad():
        a = model(torch.randn(2, 3, 64, 64), is_feat=True)
    assert a[1]["feats"][3].shape[-1] == 8 and a[1]["feats"][4].shape[-1] == 4


# ------------------------------------------------------------------------- expand / check / structure / fold

class Case:
    """One (builder, strategy): the randomised model, an input and its expansion (or the error expanding it)."""

    def __init__(self, name, strategy):
        self.name, self.strategy = name, strategy
        self.size = CORPUS[name][1]
        torch.manual_seed(0)
        self.model = randomize(build(name)).eval()
        self.x = torch.randn(2, 3, self.size, self.size)
        self._exp, self._error = None, None
        try:
            self._exp = gpdc.expand(self.model, spec(self.size, strategy))
        except Exception as e:  # raised again by each test that needs the expansion
            self._error = e

    @property
    def exp(self):
        if self._error is not None:
            raise self._error
        return self._exp


@pytest.fixture(scope="module", params=[pytest.param((n, s), id=f"{n}-{s}", marks=_marks(n, s))
                                        for n in CORPUS for s in STRATEGIES])
def case(request):
    return Case(*request.param)


def test_exact(case):
    checks = check_expansion(case.exp, case.x)
    assert set(checks) == {"teacher/eval", "teacher/train", "student/eval", "student/train"}
    bad = {k: v for k, v in checks.items() if not v["ok"]}
    assert not bad, f"not exact: {bad}"


def test_same_output_structure(case):
    exp = case.exp
    with torch.no_grad():
        out = case.model.eval()(case.x)
        t = exp.teacher.eval()(case.x)
        s = exp.student.eval()(case.x)
    (ol, ospec), (tl, tspec), (sl, sspec) = flat(out), flat(t), flat(s)
    assert tspec == ospec, f"teacher returns {describe(t)}, the model {describe(out)}"
    assert sspec == ospec, f"student returns {describe(s)}, the model {describe(out)}"
    # outputs are pinned by default: every leaf keeps the model's shape
    assert [tuple(v.shape) for v in tl] == [tuple(v.shape) for v in ol]
    assert [tuple(v.shape) for v in sl] == [tuple(v.shape) for v in ol]
    assert widened(exp) > 0


def test_fold(case):
    exp = case.exp
    folded = exp.fold()
    assert type(folded) is type(case.model)
    fresh = build(case.name)
    fresh.load_state_dict(exp.fold_state_dict(), strict=True)
    with torch.no_grad():
        want = exp.student.eval()(case.x)
        assert_leaves_close(fresh.eval()(case.x), want, 1e-5, "fresh model with the folded state_dict")
        assert_leaves_close(folded(case.x), want, 1e-5, "exp.fold()")


# -------------------------------------------------------------------------------------- expand.free_outputs

FREE = [  # (builder, free_outputs, strategy): one per output structure kind
    pytest.param("resnet8x4", ["1.feats.*"], "replicate", id="tuple-dict-list-replicate"),
    pytest.param("resnet8x4", ["1.feats.*"], "grow", id="tuple-dict-list-grow"),
    pytest.param("resnet8x4_feats", ["1.feats.*", "1.pooled"], "grow", id="tuple-wrapper"),
    pytest.param("resnet8x4_namedtuple", ["feats.*"], "replicate", id="namedtuple"),
    pytest.param("resnet8x4_dataclass", ["feats.*", "pooled"], "grow", id="dataclass"),
    pytest.param("resnet_fpn_backbone_r18", ["*"], "replicate", id="ordereddict", marks=slow),
]


@pytest.mark.parametrize("name,free,strategy", FREE)
def test_free_outputs_widen_features(name, free, strategy):
    size = CORPUS[name][1]
    torch.manual_seed(0)
    model = randomize(build(name)).eval()
    x = torch.randn(2, 3, size, size)
    pinned = gpdc.expand(model, spec(size, strategy))
    freed = gpdc.expand(model, spec(size, strategy, free_outputs=free))
    assert widened(freed) > widened(pinned), (widened(freed), widened(pinned))
    with torch.no_grad():
        out = model.eval()(x)
        t = freed.teacher.eval()(x)
        s = freed.student.eval()(x)
    (ol, ospec), (tl, tspec), (sl, sspec) = flat(out), flat(t), flat(s)
    assert tspec == ospec and sspec == ospec
    assert [v.shape for v in sl] == [v.shape for v in ol]  # the student keeps the model's widths
    wider = [i for i, (a, b) in enumerate(zip(tl, ol)) if a.shape != b.shape]
    assert wider, "no output leaf of the teacher widened"
    for i in wider:  # widened along the channel dim only
        a, b = tl[i].shape, ol[i].shape
        assert a[0] == b[0] and a[2:] == b[2:] and a[1] > b[1], (i, a, b)
    if name != "resnet_fpn_backbone_r18":
        assert 0 not in wider, "the logits are not freed and must keep their width"
    view = student_features(freed, t)
    assert flat(view)[1] == ospec
    assert_leaves_close(view, s, 1e-4, "student_features(teacher(x)) vs student(x)")
    assert_leaves_close(view, out, 1e-4, "student_features(teacher(x)) vs model(x)")
    checks = check_expansion(freed, x)
    assert all(c["ok"] for c in checks.values()), checks


def test_checks_leave_the_expansion_unchanged():
    """check_expansion runs BatchNorm in train mode; it must not move the running statistics (gpdc compile
    folds right after its checks: the shipped student must be the user's model, not one momentum step off)."""
    torch.manual_seed(0)
    model = randomize(build("resnet8x4_feats")).eval()
    x = torch.randn(2, 3, 32, 32)
    exp = gpdc.expand(model, spec(32))
    before = {k: v.clone() for k, v in exp.teacher.state_dict().items()}
    check_expansion(exp, x)
    changed = [k for k, v in exp.teacher.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, f"check_expansion changed {len(changed)} teacher tensors, e.g. {changed[:4]}"
    fresh = build("resnet8x4_feats")
    fresh.load_state_dict(exp.fold_state_dict(), strict=True)
    with torch.no_grad():
        assert_leaves_close(fresh.eval()(x), model.eval()(x), 1e-5, "folded right after the checks vs the model")


# --------------------------------------------------------------------------- static sizes and batch 1

def test_static_size_branch_follows_input_shape():
    """vgg8's ``if h == 64`` is decided by the spec's input size: the extra pool is traced at 64, not at 32."""
    model = randomize(build("vgg8")).eval()
    at32 = gpdc.expand(model, spec(32))
    at64 = gpdc.expand(model, spec(64))
    pools = lambda exp: {n.target for n in exp.original.graph.nodes if n.op == "call_module"} & {"pool3"}  # noqa: E731
    assert pools(at32) == set() and pools(at64) == {"pool3"}
    checks = check_expansion(at64, torch.randn(2, 3, 64, 64))
    assert all(c["ok"] for c in checks.values()), checks


@slow
def test_batch1_input_shape_with_bn_after_global_pooling():
    """DeepLabV3's ASPP pooling branch has BatchNorm on a 1×1 map: at batch 1 train-mode BN cannot run."""
    torch.manual_seed(0)
    model = randomize(build("deeplabv3_mobilenet_v3_large")).eval()
    exp = gpdc.expand(model, spec(64, batch=1))
    x1 = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model.eval()(x1)
        assert_leaves_close(student_features(exp, exp.teacher.eval()(x1)), want, 1e-4, "teacher at batch 1")
        assert_leaves_close(exp.student.eval()(x1), want, 1e-4, "student at batch 1")
    checks = check_expansion(exp, torch.randn(2, 3, 64, 64))
    assert all(c["ok"] for c in checks.values()), checks


# ---------------------------------------------------------------------------------------- gpdc compile

COMPILE = [  # (builder, extra expand keys, strategy, batch)
    pytest.param("resnet8x4", {}, "replicate", 2, id="resnet8x4"),
    pytest.param("resnet8x4_feats", {"free_outputs": ["1.feats.*"]}, "grow", 2, id="resnet8x4_feats-free"),
    pytest.param("vgg8", {}, "grow", 2, id="vgg8"),
    pytest.param("shufflenetv2", {}, "replicate", 2, id="shufflenetv2"),
    pytest.param("resnet_fpn_backbone_r18", {}, "replicate", 2, id="resnet_fpn_backbone_r18", marks=slow),
    pytest.param("deeplabv3_mobilenet_v3_large", {}, "replicate", 1, id="deeplabv3-batch1", marks=slow),
]


@pytest.mark.parametrize("name,extra,strategy,batch", COMPILE)
def test_gpdc_compile(name, extra, strategy, batch, tmp_path):
    size = CORPUS[name][1]
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec(size, strategy, batch=batch, **extra)))
    out = tmp_path / "out"
    file = os.path.relpath(MODELS / CORPUS[name][0], ROOT)  # as a user types it from the repository root
    r = subprocess.run([sys.executable, "-m", "gpdc", "compile", file, "--entry", name, "--spec", str(spec_file),
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert sorted(os.listdir(out)) == ["report.json", "student.onnx", "student.safetensors", "teacher.safetensors"]
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is True, {k: report.get(k) for k in ("ir", "fold", "onnx")}
    build(name).load_state_dict(load_file(out / "student.safetensors"), strict=True)
