"""Every torchvision classification CNN through the whole compile pipeline (branches on).

Teacher and shared student exact (DESIGN.md §4) — each model runs two of the four (ratio,
strategy) cases, alternating by position in the list so every family sees all four, BN in eval and
in train mode each time; ``bench/exactness.py`` runs the full matrix. For both cases the folded
student equals the shared student and loads strict into a fresh instance of the torchvision
class; for the ratio-1.5 case its ONNX file matches PyTorch in onnxruntime. The largest variants are
represented by their family's smaller members (LARGEST).
"""

import pytest
import torch
import torchvision

import gpdc
from gpdc.exactness import check, randomize, reference, set_mode
from gpdc.export import check_onnx, export_onnx
from gpdc.models import load_state_dict_strict

TRANSFORMERS = ("vit", "swin", "maxvit", "convnext")  # the transformer issue covers these
# represented in tests by smaller members of the same family (a CPU test must stay fast):
LARGEST = {
    "regnet_y_128gf": "regnet_y_8gf", "regnet_y_32gf": "regnet_y_8gf", "regnet_y_16gf": "regnet_y_8gf",
    "regnet_x_32gf": "regnet_x_8gf", "regnet_x_16gf": "regnet_x_8gf",
    "efficientnet_b5": "efficientnet_b4", "efficientnet_b6": "efficientnet_b4", "efficientnet_b7": "efficientnet_b4",
    "efficientnet_v2_m": "efficientnet_v2_s", "efficientnet_v2_l": "efficientnet_v2_s",
    "resnet152": "resnet101", "wide_resnet101_2": "wide_resnet50_2",
    "resnext101_32x8d": "resnext50_32x4d", "resnext101_64x4d": "resnext50_32x4d",
    "vgg13": "vgg11", "vgg16": "vgg11", "vgg19": "vgg11", "vgg13_bn": "vgg11_bn", "vgg16_bn": "vgg11_bn",
    "vgg19_bn": "vgg11_bn",
}
KNOWN_FAILURES: dict[str, str] = {}  # model name -> reason; the aim is an empty table
SIZES = {"alexnet": 64, "inception_v3": 80}
CASES = [(2.0, "replicate"), (1.5, "grow"), (2.0, "grow"), (1.5, "replicate")]

NAMES = [n for n in torchvision.models.list_models(module=torchvision.models)
         if not n.startswith(TRANSFORMERS) and n not in LARGEST]


def test_largest_are_represented():
    for big, small in LARGEST.items():
        assert small in NAMES, f"{big} must be represented by a tested model, {small} is not tested"


@pytest.mark.zoo
@pytest.mark.parametrize("name", NAMES)
def test_teacher_and_student_exact_fold_and_onnx(name, tmp_path):
    if name in KNOWN_FAILURES:
        pytest.xfail(KNOWN_FAILURES[name])
    model = randomize(torchvision.models.get_model(name, weights=None, num_classes=10))
    s = SIZES.get(name, 32)
    x = torch.randn(2, 3, s, s)
    refs = {nt: reference(model, x, nt) for nt in (False, True)}
    i = NAMES.index(name) % 2
    for ratio, strategy in CASES[2 * i: 2 * i + 2]:
        exp = gpdc.expand(model, {"input_shape": [2, 3, s, s], "expand": {"ratio": ratio, "strategy": strategy}})
        widened = [g for g in exp.groups if not g.pinned]
        assert widened and all(g.teacher_width > g.width for g in widened if g.width >= 4)
        for nt, (ref, own) in refs.items():
            for which, cand in (("teacher", exp.teacher), ("student", exp.student)):
                e = check(set_mode(cand, nt), ref, own, x)
                assert e.ok, f"{name} r={ratio} {strategy} bn-train={nt} {which}: error {e.error:.3g} > bound {e.bound:.3g}"
        fresh = torchvision.models.get_model(name, weights=None, num_classes=10)
        load_state_dict_strict(fresh, dict(exp.fold_state_dict()))  # as from student.safetensors
        fresh.eval()
        with torch.no_grad():
            a, b = set_mode(exp.student, False)(x), fresh(x)
        assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(a.abs().max())), f"{name}: fold differs"
        if ratio != 1.5:
            continue  # ONNX once per model (the folded architecture is the same at every ratio)
        path = export_onnx(fresh, x, tmp_path / "student.onnx")
        eq = check_onnx(path, fresh, torch.randn(3, 3, s, s))
        assert eq.ok, f"{name}: onnx {eq}"
