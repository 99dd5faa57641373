"""gpdc train's data: workers that do not change the run, exact resume with augmentation, bad images named or
skipped, a user's own datasets (py:FILE), CIFAR integrity, the epoch's line on stdout."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gpdc
from gpdc.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
MODEL = ("from torch import nn\n"
         "def build_model():\n"
         "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),\n"
         "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n")


def imagefolder(root: Path, per_class: int = 6, size: int = 12) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c, colour in enumerate(((255, 0, 0), (0, 0, 255))):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                noise = (torch.rand(size, size, 3, generator=g) * 60).to(torch.uint8)
                img = torch.tensor(colour, dtype=torch.uint8).view(1, 1, 3).expand(size, size, 3) // 2 + noise
                Image.fromarray(img.numpy()).save(d / f"{i}.png")
    return root


def spec(**data):
    return gpdc.Spec.model_validate({"input_shape": [2, 3, 8, 8], "expand": {"ratio": 1.5},
                                     "train": {"epochs": 2, "batch_size": 4}, "data": data})


def timeless(metrics):
    return [{k: v for k, v in m.items() if "second" not in k} for m in metrics]


@pytest.fixture
def model_file(tmp_path):
    (tmp_path / "m.py").write_text(MODEL)
    return str(tmp_path / "m.py")


def test_workers_change_nothing_and_resume_is_exact_with_augmentation(tmp_path, model_file):
    data = f"imagefolder:{imagefolder(tmp_path / 'data')}"
    aug = {"auto_augment": "rand-m9-mstd0.5", "re_prob": 0.25}
    none = train(model_file, spec(workers=0, **aug), data, str(tmp_path / "w0"), export=False)
    two = train(model_file, spec(workers=2, **aug), data, str(tmp_path / "w2"), export=False)
    assert timeless(two) == timeless(none)
    train(model_file, spec(workers=2, **aug), data, str(tmp_path / "r"), export=False, stop_after=1)
    resumed = train(model_file, spec(workers=2, **aug), data, str(tmp_path / "r"), export=False, resume=True)
    assert timeless(resumed) == timeless(none)


def test_training_images_are_augmented_and_evaluation_is_center_cropped(tmp_path):
    from gpdc.spec import DataSpec
    from gpdc.train.data import load_data

    with pytest.raises(gpdc.GpdcError):
        load_data("imagefolder:/nonexistent", (8, 8), DataSpec())
    ds = load_data(f"imagefolder:{imagefolder(tmp_path / 'd', per_class=1, size=20)}", (8, 8), DataSpec())
    names = [type(t).__name__ for t in ds.train.transform.transforms]
    assert names[0] == "RandomResizedCropAndInterpolation" and "RandomHorizontalFlip" in names
    names = [type(t).__name__ for t in ds.test.transform.transforms]
    assert names[:2] == ["Resize", "CenterCrop"] and ds.test[0][0].shape == (3, 8, 8)


@pytest.mark.parametrize("policy", ["stop", pytest.param("skip", marks=pytest.mark.slow)])
def test_a_corrupt_image_is_named_or_skipped(tmp_path, model_file, policy):
    root = imagefolder(tmp_path / "data")
    bad = root / "train" / "class0" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    (tmp_path / "s.yaml").write_text(json.dumps(spec(workers=1, bad_images=policy).model_dump(mode="json")))
    r = subprocess.run([sys.executable, "-m", "gpdc", "train", model_file, "--spec", str(tmp_path / "s.yaml"),
                        "--data", f"imagefolder:{root}", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    if policy == "stop":
        assert r.returncode == 2 and f"cannot read the image {bad}" in " ".join(r.stderr.split()), r.stderr[-2000:]
        assert "Traceback" not in r.stderr
    else:
        assert r.returncode == 0, r.stderr[-2000:]
        rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
        assert [row["skipped_images"] for row in rows] == [1, 1]
        assert "skipped 1 unreadable images" in r.stdout  # the epoch's line, on stdout though it is not a terminal
        assert r.stdout.count("epoch ") >= 2 and "img/s" in r.stdout


def test_a_users_own_datasets(tmp_path, model_file):
    (tmp_path / "mydata.py").write_text(
        "import torch\n"
        "class Blobs(torch.utils.data.Dataset):  # a map-style dataset, not tensors in memory\n"
        "    def __init__(self, n, seed):\n"
        "        g = torch.Generator().manual_seed(seed)\n"
        "        self.y = torch.randint(0, 3, (n,), generator=g)\n"
        "        self.x = torch.randn(n, 3, 8, 8, generator=g) + self.y.view(-1, 1, 1, 1)\n"
        "    def __len__(self):\n"
        "        return len(self.y)\n"
        "    def __getitem__(self, i):\n"
        "        return self.x[i] + 0.1 * torch.randn(3, 8, 8), int(self.y[i])  # augmentation: noise\n"
        "def make():\n"
        "    return Blobs(24, 0), Blobs(12, 1), 3\n"
        "def wrong():\n"
        "    return [1, 2, 3]\n")
    (tmp_path / "m3.py").write_text(MODEL.replace("nn.Linear(4, 2)", "nn.Linear(4, 3)"))
    metrics = train(str(tmp_path / "m3.py"), spec(workers=1), f"py:{tmp_path / 'mydata.py'}:make", str(tmp_path / "o"),
                    export=False)
    assert len(metrics) == 2 and 0 <= metrics[-1]["student_acc"] <= 1
    with pytest.raises(gpdc.GpdcError, match=r"must return \(train, val, num_classes\)"):
        train(model_file, spec(), f"py:{tmp_path / 'mydata.py'}:wrong", str(tmp_path / "o2"))
    with pytest.raises(gpdc.GpdcError, match="has no function 'build_data"):
        train(model_file, spec(), f"py:{tmp_path / 'mydata.py'}", str(tmp_path / "o3"))


def write_cifar(root: Path, kind: str, train: int = 40, test: int = 20) -> Path:
    """CIFAR's python-format files with random images (the layout torchvision extracts)."""
    rng = np.random.default_rng(0)
    classes, folder, files, key = ((10, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                                    "labels") if kind == "cifar10" else
                                   (100, "cifar-100-python", ["train", "test"], "fine_labels"))
    (root / folder).mkdir(parents=True)
    for name in files:
        n = test if "test" in name else train
        batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), key: list(rng.integers(0, classes, n))}
        (root / folder / name).write_bytes(pickle.dumps(batch))
    return root


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_files_load_and_damaged_ones_are_named(tmp_path, kind):
    from gpdc.train.data import load_data

    root = write_cifar(tmp_path, kind)
    data = load_data(f"{kind}:{root}")
    x, y = data.train[0]
    assert x.shape == (3, 32, 32) and 0 <= y < data.num_classes and len(data.test) == 20
    victim = next((root).glob("cifar-*/*"))
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    with pytest.raises(gpdc.GpdcError, match=f"{victim.name} fails the integrity check"):
        load_data(f"{kind}:{root}")
    victim.unlink()
    with pytest.raises(gpdc.GpdcError, match=f"{victim.name} is missing"):
        load_data(f"{kind}:{root}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(gpdc.GpdcError, match="no cifar"):
        load_data(f"{kind}:{tmp_path / 'empty'}")
