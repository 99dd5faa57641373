"""The model zoo gpdc is checked against: every torchvision classification model and a list of timm
models across families, built with random weights at small input sizes (shared by the zoo tests and
``bench/zoo.py``), and the models known not to work, with the reason.
"""

from __future__ import annotations

import torch
from torch import nn

# timm models across families; the zoo sweep must pass >= 90% of them (issue 5)
TIMM = [
    "resnet18", "resnet50d", "seresnet50", "resnetv2_50x1_bit", "densenet121", "dla34", "hrnet_w18_small",
    "repvgg_a0", "efficientnet_b0", "efficientnet_lite0", "tf_efficientnetv2_b0", "mobilenetv2_100",
    "mnasnet_100", "mobilenetv3_small_100", "mobilenetv3_large_100", "lcnet_050", "regnetx_002", "regnety_002",
    "convnext_atto", "convnext_nano", "convnextv2_atto", "poolformer_s12", "deit_tiny_patch16_224",
    "deit_small_patch16_224", "deit3_small_patch16_224", "vit_tiny_patch16_224", "vit_small_patch16_224",
    "pit_ti_224", "mixer_s16_224", "resmlp_12_224", "swin_tiny_patch4_window7_224", "levit_128s",
    "efficientvit_b0", "ghostnet_100", "resnet34", "efficientnet_b1", "regnetx_004", "convnext_pico", "tinynet_a",
    "fbnetc_100", "semnasnet_100", "spnasnet_100", "ese_vovnet19b_dw", "selecsls42b", "vit_base_patch16_224",
]
# the long tail (issue 11): the smallest member of as many other timm families, and the models the issue names
TIMM_LONG_TAIL = [
    "rexnet_100", "mixnet_s", "res2net50_14w_8s", "cspresnet50", "dpn68", "cait_xxs24_224", "coat_lite_tiny",
    "edgenext_xx_small", "mobilevit_xxs", "xcit_nano_12_p16_224", "twins_svt_small", "pvt_v2_b0", "nest_tiny",
    "gcvit_xxtiny", "fastvit_t8", "efficientformer_l1", "tresnet_m", "nf_regnet_b0", "regnetz_b16", "hgnetv2_b0",
    "inception_next_atto", "ghostnetv2_100", "mobilenetv4_conv_small", "repghostnet_050", "vgg11", "inception_v3",
    "legacy_xception", "xception41p", "skresnet18", "resnest14d", "mobileone_s1", "efficientformerv2_s0",
    "tiny_vit_5m_224", "crossvit_tiny_240", "beit_base_patch16_224", "eva02_tiny_patch14_224", "convit_tiny",
    "visformer_tiny", "sequencer2d_s", "maxvit_pico_rw_256", "davit_tiny", "focalnet_tiny_srf", "hiera_tiny_224",
    "rdnet_tiny", "starnet_s050", "mambaout_femto", "hardcorenas_a", "halonet_h1", "convmixer_768_32",
    "cpubone_nano", "efficientvit_m0", "fasternet_t0", "iformer_t", "lcnetv2_small", "lowformer_b0", "mvitv2_tiny",
    "nextvit_small", "repvit_m1", "legacy_seresnet18", "shvit_s1", "swiftformer_xs", "swinv2_cr_tiny_ns_224",
    "swinv2_tiny_window8_256", "tnt_s_patch16_224", "vit_tiny_r_s16_p8_224", "vit_relpos_small_patch16_224",
    "samvit_base_patch16_224", "vitamin_small_224", "volo_d1_224", "efficientvim_m1", "gmlp_ti16_224",
    "inception_v4", "hieradet_small", "csatv2", "cspnext_tiny",
]

# "source:name" -> why it fails; listed in the README as well
KNOWN_FAILURES: dict[str, str] = {}  # none in the recorded sweep: ops no rule widens run at the student's width

# torchvision input sizes: 64 for the CNNs (at 32 their last feature maps are 1x1, where train-mode BatchNorm
# over a batch of 2 is so ill-conditioned that the float32 original is itself ~3% off its float64 reference);
# transformers with a fixed patch grid or partition size get what they need
_TV_SIZES = {"inception_v3": 80, "vit_h_14": 28, "maxvit_t": 224}
_TV_PREFIX_SIZES = {"swin": 64, "vit_": 32}


def torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def all_refs() -> list[str]:
    return [f"torchvision:{n}" for n in torchvision_names()] + [f"timm:{n}" for n in TIMM + TIMM_LONG_TAIL]


def build(ref: str, num_classes: int = 10, cnn_size: int = 64) -> tuple[nn.Module, int]:
    """(model with random weights, square input size) for ``source:name``; torchvision CNNs take
    ``cnn_size`` (float64 checks can go smaller)."""
    source, name = ref.split(":", 1)
    if source == "torchvision":
        import torchvision

        size = _TV_SIZES.get(name) or next((s for p, s in _TV_PREFIX_SIZES.items() if name.startswith(p)), cnn_size)
        kwargs = {"image_size": size} if name.startswith("vit_") else {}
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs), size
    import timm

    try:  # transformers take the input size at construction (some accept 64 and then fail to run at it)
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=64)
    except TypeError:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if _runs_at(model, 64):
        return model, 64
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    return model, model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]


def _runs_at(model: nn.Module, size: int) -> bool:
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, size, size))
        return True
    except Exception:
        return False


def fold_into_fresh(exp, ref: str, x: torch.Tensor) -> tuple[nn.Module, float]:
    """A fresh ``ref`` model with the folded student loaded strict (as from student.safetensors), and its
    error against the shared student (eval mode), relative to ``max(1, max|output|)``."""
    from .exactness import max_rel_difference, set_mode
    from .models import load_state_dict_strict

    fresh, _ = build(ref)
    load_state_dict_strict(fresh, dict(exp.fold_state_dict()))
    fresh.eval()
    with torch.no_grad():
        a, b = set_mode(exp.student, False)(x), fresh(x)
    return fresh, max_rel_difference(a, b)[0]
