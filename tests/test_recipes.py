"""The recipes of examples/cifar100 and examples/imagenet run: one short epoch each on generated data of the right
shape (CIFAR-100 python-format files written here, a tiny imagefolder), student and teacher from one file."""

import sys
from pathlib import Path

import pytest
import torch

import gpdc
from gpdc.train.loop import train
from test_data import imagefolder, write_cifar

ROOT = Path(__file__).resolve().parent.parent
CIFAR = ROOT / "examples" / "cifar100"
MODELS = str(CIFAR / "models.py")
PAIRS = [("build_resnet8x4", "build_resnet32x4"), ("build_wrn_16_2", "build_wrn_40_2"),
         ("build_mobilenetv2", "build_resnet32x4")]


def short(spec_path: Path, **train_overrides) -> gpdc.Spec:
    spec = gpdc.load_spec(spec_path)
    return spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": 1, "batch_size": 16,
                                                                          **train_overrides})})


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("cifar"), "cifar100", train=32, test=16)


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    sys.path.insert(0, str(CIFAR))
    try:
        import models
    finally:
        sys.path.pop(0)
    folder = tmp_path_factory.mktemp("teachers")
    for name in {t for _, t in PAIRS}:
        torch.save({"state_dict": getattr(models, name)().state_dict()}, folder / f"{name}.pth")
    return folder


CASES = [pytest.param(recipe, s, t, id=f"{recipe}-{s.removeprefix('build_')}",
                      marks=() if (recipe, s) == ("gpd_dkd", "build_resnet8x4") else pytest.mark.slow)
         for s, t in PAIRS for recipe in ("kd", "dkd", "gpd_dkd")]  # the fast tier runs one
CASES += [pytest.param(recipe, "build_resnet8x4", "build_resnet32x4", id=f"{recipe}-resnet8x4", marks=pytest.mark.slow)
          for recipe in ("reviewkd", "gpd_reviewkd")]  # their taps name the CIFAR ResNets' stages


@pytest.mark.parametrize("recipe,student,teacher", CASES)
def test_cifar100_recipe_runs(tmp_path, cifar, teacher_weights, recipe, student, teacher):
    metrics = train(MODELS, short(CIFAR / f"{recipe}.yaml"), f"cifar100:{cifar}", str(tmp_path / "o"),
                    teacher_ref=MODELS, teacher_weights=str(teacher_weights / f"{teacher}.pth"), entry=student,
                    teacher_entry=teacher, export=recipe.startswith("gpd"))
    assert len(metrics) == 1 and metrics[0]["static_acc"] is not None
    assert (metrics[0]["teacher_acc"] is not None) == recipe.startswith("gpd")


def test_cifar100_teacher_recipe_runs(tmp_path, cifar):
    metrics = train(MODELS, short(CIFAR / "teacher.yaml"), f"cifar100:{cifar}", str(tmp_path / "o"),
                    entry="build_wrn_40_2", export=False)
    assert len(metrics) == 1


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["r34_r18_gpd_dkd", "r34_r18_dkd", "r34_r18_gpd_reviewkd", "r34_r18_reviewkd"])
def test_imagenet_recipe_runs_on_an_imagefolder(tmp_path, recipe):
    data = imagefolder(tmp_path / "data", per_class=2, size=40)
    import torchvision

    torch.save(torchvision.models.resnet34(num_classes=2).state_dict(), tmp_path / "r34.pth")
    spec = short(ROOT / "examples" / "imagenet" / f"{recipe}.yaml", batch_size=4, ema=None)
    spec = spec.model_copy(update={"input_shape": [2, 3, 32, 32]})  # the recipe's 224×224 costs minutes on CPU
    metrics = train("torchvision:resnet18", spec, f"imagefolder:{data}", str(tmp_path / "o"),
                    teacher_ref="torchvision:resnet34", teacher_weights=str(tmp_path / "r34.pth"), export=False)
    assert len(metrics) == 1
