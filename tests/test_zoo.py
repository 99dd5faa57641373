"""A deterministic sample of the zoo through the whole compile pipeline (branches on).

Every family of torchvision's classification models and of the timm list (`gpdc.zoo.TIMM`) is
represented by one or two members, the long tail (`gpdc.zoo.TIMM_LONG_TAIL`) by one model per mechanism (a family is the module that defines the model; the transformer
families run the full case matrix in test_transformers.py); ``bench/zoo.py`` sweeps every model. Each torchvision model runs two of the four (ratio,
strategy) cases and each timm model one, alternating by position so all four are covered, with
teacher and shared student exact (DESIGN.md §4, norms in eval and in train mode); the folded student
equals the shared student after a strict load into a fresh instance, and its ONNX file matches
PyTorch in onnxruntime.
"""

import pytest
import torch

import gpdc
from gpdc.exactness import check, randomize, reference, set_mode
from gpdc.export import check_onnx, export_onnx
from gpdc.zoo import KNOWN_FAILURES, TIMM, TIMM_LONG_TAIL, build, fold_into_fresh, torchvision_names

# one or two members per family (a family = the torchvision/timm module that defines the model); the
# transformer families run the full case matrix in test_transformers.py
TORCHVISION_SAMPLE = [
    "alexnet", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet", "inception_v3", "mnasnet0_75",
    "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18", "resnext50_32x4d",
    "shufflenet_v2_x0_5", "squeezenet1_1", "swin_v2_t", "vgg11_bn",
]
TIMM_SAMPLE = [
    "resnet18", "resnetv2_50x1_bit", "densenet121", "dla34", "hrnet_w18_small", "repvgg_a0", "efficientnet_b0",
    "mobilenetv3_small_100", "regnety_002", "convnextv2_atto", "poolformer_s12", "deit3_small_patch16_224",
    "vit_tiny_patch16_224", "pit_ti_224", "resmlp_12_224", "swin_tiny_patch4_window7_224", "levit_128s",
    "efficientvit_b0", "ghostnet_100", "ese_vovnet19b_dw", "selecsls42b",
]
# the long tail (`gpdc.zoo.TIMM_LONG_TAIL`, swept by bench/zoo.py): one model per mechanism it exercises
LONG_TAIL_SAMPLE = [
    "rexnet_100",  # a residual add onto the first channels of a wider output (per-channel coupling)
    "mixnet_s",  # unequal channel splits, concatenated, then a residual add
    "edgenext_xx_small",  # Res2Net-style splits through depthwise convs, and XCiT attention written inline
    "pvt_v2_b0",  # inline attention with a single head and a spatially reduced key/value
    "efficientvit_m0",  # a product over the channels (q^T k on channels-first maps), per-head cascades
    "mambaout_femto",  # a gate between two slices of one projection
    "nf_regnet_b0",  # scaled weight standardisation computed functionally: gathered at the student's size
    "visformer_tiny",  # a head split that also regroups the spatial dims
    "mobilevit_xxs",  # channels moved into the batch dim: those reshapes run at the student's width
    "swiftformer_xs",  # an L2 norm over the channels: runs at the student's width, its output copied back
]
# models with ops no rule widens: `expand.unwidenable: error` must stop them with a gpdc error naming the op
UNWIDENABLE_SAMPLE = {"timm:mobilevit_xxs": "reshape", "timm:swiftformer_xs": "normalize",
                      "timm:sequencer2d_s": "LSTM"}
IN_TRANSFORMER_TESTS = ["vit_b_16", "swin_t", "maxvit_t", "convnext_tiny"]
REFS = [f"torchvision:{n}" for n in TORCHVISION_SAMPLE] + [f"timm:{n}" for n in TIMM_SAMPLE + LONG_TAIL_SAMPLE]
CASES = [(2.0, "replicate"), (1.5, "grow"), (2.0, "grow"), (1.5, "replicate")]


def family(ref: str) -> str:
    source, name = ref.split(":", 1)
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model_builder(name).__module__
    from timm.models import is_model_in_modules, list_modules

    return next(m for m in list_modules() if is_model_in_modules(name, [m]))


def test_the_timm_lists_span_100_models_of_40_families():
    refs = [f"timm:{n}" for n in TIMM + TIMM_LONG_TAIL]
    assert len(set(refs)) == len(refs) >= 100
    assert len({family(r) for r in refs}) >= 40


@pytest.mark.parametrize("ref", sorted(set(KNOWN_FAILURES) - set(REFS)) or [pytest.param(None, marks=pytest.mark.skip(
    reason="no known failures"))])
def test_known_failure_fails_cleanly(ref):
    """Each known failure stops with a gpdc error (exit 2 in the CLI, never a crash), and turns this red the day
    it starts to pass."""
    model, s = build(ref)
    with pytest.raises(gpdc.GpdcError):
        gpdc.expand(model, {"input_shape": [2, 3, s, s], "expand": {"ratio": 2.0}})


@pytest.mark.parametrize("ref", [pytest.param(r, marks=pytest.mark.slow) if r == "timm:sequencer2d_s" else r
                                 for r in sorted(UNWIDENABLE_SAMPLE)])
def test_unwidenable_ops_run_at_the_student_width_or_stop_when_asked(ref):
    model, s = build(ref)
    spec = {"input_shape": [2, 3, s, s], "expand": {"ratio": 2.0}}
    ops = gpdc.expand(model, spec).report()["student_width_ops"]
    assert ops and any(UNWIDENABLE_SAMPLE[ref] in name + why for name, why in ops.items()), ops
    with pytest.raises(gpdc.RuleError, match=UNWIDENABLE_SAMPLE[ref]):
        gpdc.expand(model, spec | {"expand": {"ratio": 2.0, "unwidenable": "error"}})


def test_every_family_is_sampled():
    sampled = {family(r) for r in REFS + [f"torchvision:{n}" for n in IN_TRANSFORMER_TESTS]}
    everything = [f"torchvision:{n}" for n in torchvision_names()] + [f"timm:{n}" for n in TIMM]
    missing = sorted({family(r) for r in everything} - sampled)
    assert not missing, f"zoo families without a test: {missing}"


# the slowest samples run with the full suite only (the fast tier stays under 5 minutes)
SLOW = {"torchvision:resnet18", "timm:resnetv2_50x1_bit", "timm:swin_tiny_patch4_window7_224",
        "torchvision:vgg11_bn", "timm:selecsls42b", "torchvision:inception_v3", "torchvision:efficientnet_v2_s",
        "torchvision:alexnet", "torchvision:swin_v2_t", "timm:dla34", "torchvision:resnext50_32x4d"}


@pytest.mark.zoo
@pytest.mark.parametrize("ref", [pytest.param(r, marks=pytest.mark.slow) if r in SLOW else r for r in REFS])
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
    fresh, fold_error = fold_into_fresh(exp, ref, x)
    assert fold_error <= 1e-5, f"{ref}: fold differs"
    eq = check_onnx(export_onnx(fresh, x, tmp_path / "student.onnx"), fresh, torch.randn(3, 3, s, s))
    assert eq.ok, f"{ref}: onnx {eq}"
