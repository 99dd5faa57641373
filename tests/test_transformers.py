"""Transformers and layer-scale models (issue 5): teacher and shared student exact (DESIGN.md §4,
norms in eval and train mode) for both strategies at r = 2 and 1.5, the folded student equal after a
strict load into a fresh instance, and its ONNX file equal in onnxruntime; plus the norm and
attention rules on small models at awkward ratios, and per-layer ratios inside transformer blocks.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpdc
from gpdc.exactness import check, check_expansion, randomize, reference, set_mode
from gpdc.export import check_onnx, export_onnx
from gpdc.models import load_state_dict_strict
from gpdc.zoo import build, fold_into_fresh

CASES = [(2.0, "replicate"), (2.0, "grow"), (1.5, "replicate"), (1.5, "grow")]
MODELS = ["torchvision:vit_b_16", "torchvision:swin_t", "torchvision:maxvit_t", "torchvision:convnext_tiny",
          "timm:deit_tiny_patch16_224", "timm:vit_small_patch16_224", "timm:convnext_atto"]


def assert_exact(model, exp, x, label):
    for nt in (False, True):
        ref, own = reference(model, x, nt)
        for which, cand in (("teacher", exp.teacher), ("student", exp.student)):
            e = check(set_mode(cand, nt), ref, own, x)
            assert e.ok, f"{label} norm-train={nt} {which}: error {e.error:.3g} > bound {e.bound:.3g}"


# the largest run with the full suite only (the fast tier stays under 5 minutes)
SLOW = {"torchvision:vit_b_16", "torchvision:maxvit_t", "torchvision:swin_t", "torchvision:convnext_tiny",
        "timm:vit_small_patch16_224"}


@pytest.mark.zoo
@pytest.mark.parametrize("ref", [pytest.param(r, marks=pytest.mark.slow) if r in SLOW else r for r in MODELS])
def test_transformer_exact_fold_and_onnx(ref, tmp_path):
    torch.manual_seed(0)
    model, s = build(ref)
    randomize(model.eval())
    x = torch.randn(2, 3, s, s)
    for ratio, strategy in CASES:
        exp = gpdc.expand(model, {"input_shape": [2, 3, s, s], "expand": {"ratio": ratio, "strategy": strategy}})
        assert sum(p.numel() for p in exp.teacher.parameters()) > 1.5 * sum(p.numel() for p in model.parameters())
        assert_exact(model, exp, x, f"{ref} r={ratio} {strategy}")
    fresh, fold_error = fold_into_fresh(exp, ref, x)
    assert fold_error <= 1e-5, f"{ref}: fold differs"
    eq = check_onnx(export_onnx(fresh, x, tmp_path / "student.onnx"), fresh, torch.randn(3, 3, s, s))
    assert eq.ok, f"{ref}: onnx {eq}"


def test_per_layer_ratios_in_transformer_blocks():
    """MLP hidden at 3x, embedding at 1.5x (rounded to whole heads of 64: 3 -> 5 heads)."""
    model, s = build("timm:deit_tiny_patch16_224")
    randomize(model.eval())
    spec = {"input_shape": [2, 3, s, s], "expand": {"ratio": 1.5, "layers": {"blocks.*.mlp.fc1": 3.0}}}
    exp = gpdc.expand(model, spec)
    widths = {layer: (g.width, g.teacher_width) for g in exp.groups for layer in g.layers}
    assert widths["blocks.0.mlp.fc1"] == (768, 2304)
    assert widths["blocks.0.attn"] == (192, 320)
    assert exp.teacher.get_submodule("blocks.0.attn").num_heads == 5
    assert_exact(model, exp, torch.randn(2, 3, s, s), "deit per-layer")


class _Norms(nn.Module):
    """GroupNorm (several groups, one group, functional), a channels-first LayerNorm through
    permutes, a functional LayerNorm with its own parameters, and self-attention."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.gn = nn.GroupNorm(4, 12)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1)
        self.gn1 = nn.GroupNorm(1, 12)
        self.gamma = nn.Parameter(torch.rand(12) + 0.5)
        self.beta = nn.Parameter(torch.randn(12))
        self.ln = nn.LayerNorm(12)
        self.attn = nn.MultiheadAttention(12, 3, batch_first=True)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.gelu(self.gn(self.conv1(x)))
        x = x + self.gn1(self.conv2(x))
        x = F.group_norm(x, 2, self.gamma, self.beta)
        x = self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        t = F.layer_norm(t, (12,), self.gamma, self.beta)
        return self.fc(t.mean(1))


@pytest.mark.parametrize("ratio", [11 / 6, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("strategy", ["replicate", "grow"])
def test_norms_and_attention_at_any_ratio(ratio, strategy):
    torch.manual_seed(1)
    model = randomize(_Norms()).eval()
    x = torch.randn(2, 3, 6, 6)
    exp = gpdc.expand(model, {"input_shape": [2, 3, 6, 6], "expand": {"ratio": ratio, "strategy": strategy}})
    assert any(g.teacher_width > g.width for g in exp.groups if g.width == 12)
    assert_exact(model, exp, x, f"norms r={ratio:.3g} {strategy}")
    fresh = _Norms()
    load_state_dict_strict(fresh, dict(exp.fold_state_dict()))
    with torch.no_grad():
        assert torch.allclose(set_mode(exp.student, False)(x), fresh.eval()(x), atol=1e-6)


def test_attention_returning_its_weights_runs_at_the_student_width():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            t = self.proj(x)
            out, w = self.attn(t, t, t)
            return out.sum(-1) + w.sum(-1)

    model = randomize(M().eval())
    exp = gpdc.expand(model, {"input_shape": [2, 4, 8], "expand": {"ratio": 2.0}})
    assert "need_weights=False" in exp.report()["student_width_ops"]["attn"]
    assert exp.teacher.get_submodule("proj").out_features == 16 and exp.teacher.get_submodule("attn").embed_dim == 8
    assert all(c["ok"] for c in check_expansion(exp, torch.randn(2, 4, 8)).values())
    with pytest.raises(gpdc.RuleError, match="need_weights=False"):
        gpdc.expand(model, {"input_shape": [2, 4, 8], "expand": {"ratio": 2.0, "unwidenable": "error"}})


@pytest.mark.parametrize("spec_file,ref", [("specs/deit_tiny.yaml", "timm:deit_tiny_patch16_224"),
                                           ("specs/convnext_tiny.yaml", "torchvision:convnext_tiny")])
def test_bundled_transformer_specs_apply_and_are_exact(spec_file, ref):
    """The spec's layer and branch patterns match the model; run at a small input for speed."""
    model, s = build(ref)
    randomize(model.eval())
    spec = gpdc.load_spec(spec_file)
    spec = spec.model_copy(update={"input_shape": [2, 3, s, s]})
    exp = gpdc.expand(model, spec)
    assert any("branches [" in line for line in exp.log), "the spec's branches.layers matches no k x k conv"
    assert_exact(model, exp, torch.randn(2, 3, s, s), spec_file)
