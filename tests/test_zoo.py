"""A deterministic sample of the zoo through the whole compile pipeline (branches on).

Every torchvision family is represented by one or two members (SAMPLE; the transformer families
are in test_transformers.py with the full case matrix) and every family of the timm list
(`gpdc.zoo.TIMM`, small inputs) is represented by the first listed member of its family (TIMM_SAMPLE);
``bench/zoo.py`` sweeps every model of both. Each torchvision model runs two of the four (ratio,
strategy) cases and each timm model one, alternating by position so all four are covered, with
teacher and shared student exact (DESIGN.md §4, norms in eval and in train mode); the folded student
equals the shared student after a strict load into a fresh instance, and its ONNX file matches
PyTorch in onnxruntime.
"""

import re

import pytest
import torch

import gpdc
from gpdc.exactness import check, randomize, reference, set_mode
from gpdc.export import check_onnx, export_onnx
from gpdc.models import load_state_dict_strict
from gpdc.zoo import KNOWN_FAILURES, TIMM, build, torchvision_names


def family(name: str) -> str:
    return re.sub(r"[\d_].*$", "", name)


SAMPLE = [
    "alexnet", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet", "inception_v3", "mnasnet0_75",
    "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18", "resnet50",
    "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "swin_v2_t", "vgg11_bn", "wide_resnet50_2",
]
IN_TRANSFORMER_TESTS = ("vit_b_16", "swin_t", "maxvit_t", "convnext_tiny")
def first_of_each_family(names: list[str]) -> list[str]:
    firsts: dict[str, str] = {}
    for n in names:
        firsts.setdefault(family(n), n)
    return list(firsts.values())


TIMM_SAMPLE = first_of_each_family(TIMM)
REFS = [f"torchvision:{n}" for n in SAMPLE] + [f"timm:{n}" for n in TIMM_SAMPLE]
CASES = [(2.0, "replicate"), (1.5, "grow"), (2.0, "grow"), (1.5, "replicate")]


def test_every_torchvision_family_is_sampled():
    covered = {family(n) for n in SAMPLE + list(IN_TRANSFORMER_TESTS)}
    missing = sorted({family(n) for n in torchvision_names()} - covered)
    assert not missing, f"torchvision families without a zoo test: {missing}"


@pytest.mark.zoo
@pytest.mark.parametrize("ref", REFS)
def test_exact_fold_and_onnx(ref, tmp_path):
    if ref in KNOWN_FAILURES:
        with pytest.raises(gpdc.GpdcError):  # a known failure must fail cleanly, and must not start passing unseen
            model, s = build(ref)
            gpdc.expand(model, {"input_shape": [2, 3, s, s], "expand": {"ratio": 2.0}})
        return
    torch.manual_seed(0)
    model, s = build(ref)
    randomize(model.eval())
    x = torch.randn(2, 3, s, s)
    refs = {nt: reference(model, x, nt) for nt in (False, True)}
    i = REFS.index(ref)
    cases = CASES[2 * (i % 2): 2 * (i % 2) + 2] if ref.startswith("torchvision") else [CASES[i % 4]]
    for ratio, strategy in cases:
        exp = gpdc.expand(model, {"input_shape": [2, 3, s, s], "expand": {"ratio": ratio, "strategy": strategy}})
        widened = [g for g in exp.groups if not g.pinned]
        assert widened and all(g.teacher_width > g.width for g in widened if g.width >= 4)
        for nt, (r, own) in refs.items():
            for which, cand in (("teacher", exp.teacher), ("student", exp.student)):
                e = check(set_mode(cand, nt), r, own, x)
                assert e.ok, f"{ref} r={ratio} {strategy} norm-train={nt} {which}: error {e.error:.3g} > bound {e.bound:.3g}"
    fresh, _ = build(ref)
    load_state_dict_strict(fresh, dict(exp.fold_state_dict()))  # as from student.safetensors
    fresh.eval()
    with torch.no_grad():
        a, b = set_mode(exp.student, False)(x), fresh(x)
    assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(a.abs().max())), f"{ref}: fold differs"
    eq = check_onnx(export_onnx(fresh, x, tmp_path / "student.onnx"), fresh, torch.randn(3, 3, s, s))
    assert eq.ok, f"{ref}: onnx {eq}"
