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

# "source:name" -> why it fails; listed in the README as well
KNOWN_FAILURES: dict[str, str] = {
    "timm:levit_128s": "attention reshapes q/k/v with reshape_as and splits heads of unequal key/value sizes "
    "inside a traced module; no rule for that pattern",
    "timm:efficientvit_b0": "LiteMLA (linear attention with multi-scale aggregation) is a timm leaf module without "
    "a gpdc rule",
    "timm:ghostnet_100": "the ghost module adds a concat of two convs' outputs, sliced, to a residual: coupling a "
    "concatenated/sliced layout to one space is not supported (channel spaces couple as wholes)",
}

# torchvision input sizes: 64 for the CNNs (at 32 their last feature maps are 1x1, where train-mode BatchNorm
# over a batch of 2 is so ill-conditioned that the float32 original is itself ~3% off its float64 reference);
# transformers with a fixed patch grid or partition size get what they need
_TV_SIZES = {"inception_v3": 80, "vit_h_14": 28, "maxvit_t": 224}
_TV_PREFIX_SIZES = {"swin": 64, "vit_": 32}


def torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def all_refs() -> list[str]:
    return [f"torchvision:{n}" for n in torchvision_names()] + [f"timm:{n}" for n in TIMM]


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

    try:  # transformers take the input size at construction
        return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=64), 64
    except TypeError:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, 64, 64))
        return model, 64
    except Exception:
        return model, model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]


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
