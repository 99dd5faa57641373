"""Weights in the forms people have them load into the model; what does not fit is named key by key."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gpdc.errors import GpdcError
from gpdc.weights import load_weights


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def trained() -> dict:
    m = model()
    m(torch.randn(1, 3, 5, 5))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    return m.state_dict()


FORMS = {
    "state_dict": lambda sd: sd,
    "wrapped in state_dict": lambda sd: {"state_dict": sd, "epoch": 3, "best_acc": 71.2},
    "wrapped in model": lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
    "wrapped in ema": lambda sd: {"ema": sd},
    "DDP prefixes": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "DDP prefixes in a checkpoint": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    "torch.compile prefixes": lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
}


FLAT = ("state_dict", "DDP prefixes", "torch.compile prefixes")  # what a .safetensors file can hold


@pytest.mark.parametrize("form,suffix", [(f, ".pth") for f in FORMS] + [(f, ".safetensors") for f in FLAT])
def test_every_form_loads_the_same_weights(tmp_path, form, suffix):
    sd = trained()
    obj = FORMS[form](sd)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in obj.items()}, path)
    else:
        torch.save(obj, path)
    m = model()
    m(torch.randn(1, 3, 5, 5))
    load_weights(m, str(path), "teacher")
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_a_mismatch_names_missing_unexpected_and_misshaped_keys(tmp_path):
    sd = trained()
    sd.pop("1.running_mean")
    sd["extra.weight"] = torch.zeros(1)
    sd["0.weight"] = torch.zeros(5, 3, 3, 3)
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    m = model()
    m(torch.randn(1, 3, 5, 5))
    with pytest.raises(GpdcError) as e:
        load_weights(m, str(tmp_path / "w.pth"), "teacher")
    text = str(e.value)
    assert "1.running_mean" in text and "extra.weight" in text and "0.weight" in text, text


def test_a_file_without_weights_is_a_clear_error(tmp_path):
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, tmp_path / "w.pth")
    with pytest.raises(GpdcError, match="hold no state_dict"):
        load_weights(model(), str(tmp_path / "w.pth"), "teacher")
