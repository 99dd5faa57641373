"""Datasets for ``gpdc train``: nothing downloads.

* ``digits`` (default): scikit-learn's bundled 8×8 digits (1797 images, 10 classes), a fixed split:
  a permutation with seed 0, the first 1437 images (80%) train, the last 360 test. Pixels /16,
  then normalised to mean 0, std 1 with the training split's statistics.
* ``cifar10:DIR`` / ``cifar100:DIR``: torchvision's datasets already on disk (the python version).
* ``imagefolder:DIR``: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or ``DIR/test``),
  resized to the spec's input size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..errors import GpdcError

DIGITS_TRAIN = 1437


@dataclass
class Data:
    train: Dataset
    test: Dataset
    num_classes: int
    name: str


def digits() -> Data:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))
    x, y = x[perm], y[perm]
    mean, std = x[:DIGITS_TRAIN].mean(), x[:DIGITS_TRAIN].std()
    x = (x - mean) / std
    return Data(TensorDataset(x[:DIGITS_TRAIN], y[:DIGITS_TRAIN]), TensorDataset(x[DIGITS_TRAIN:], y[DIGITS_TRAIN:]), 10, "digits")


def _cifar(kind: str, root: str) -> Data:
    import torchvision
    import torchvision.transforms as T

    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    try:
        train = cls(root, train=True, download=False, transform=train_tf)
        test = cls(root, train=False, download=False, transform=T.Compose([T.ToTensor(), norm]))
    except RuntimeError:
        raise GpdcError(f"no {kind} dataset under {root}: expected torchvision's extracted python version there "
                        f"(e.g. {root}/cifar-10-batches-py); gpdc never downloads data.") from None
    return Data(train, test, 10 if kind == "cifar10" else 100, kind)


def _imagefolder(root: str, size: tuple[int, int]) -> Data:
    import torchvision
    import torchvision.transforms as T

    base = Path(root)
    test_dir = next((base / d for d in ("val", "test") if (base / d).is_dir()), None)
    if not (base / "train").is_dir() or test_dir is None:
        raise GpdcError(f"imagefolder:{root} needs {root}/train/<class>/... and {root}/val/<class>/... (or test/).")
    tf = T.Compose([T.Resize(size), T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    try:
        train = torchvision.datasets.ImageFolder(str(base / "train"), transform=tf)
        test = torchvision.datasets.ImageFolder(str(test_dir), transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise GpdcError(f"imagefolder:{root}: {e}") from None
    if train.classes != test.classes:
        raise GpdcError(f"imagefolder:{root}: train and {test_dir.name} have different classes.")
    return Data(train, test, len(train.classes), f"imagefolder:{root}")


def load_data(ref: str, input_size: tuple[int, int] = (32, 32)) -> Data:
    if ref == "digits":
        return digits()
    kind, _, root = ref.partition(":")
    if kind in ("cifar10", "cifar100") and root:
        if not Path(root).is_dir():
            raise GpdcError(f"data folder {root} does not exist; pass {kind}:DIR with the extracted dataset.")
        return _cifar(kind, root)
    if kind == "imagefolder" and root:
        if not Path(root).is_dir():
            raise GpdcError(f"data folder {root} does not exist; pass imagefolder:DIR with train/ and val/ inside.")
        return _imagefolder(root, input_size)
    raise GpdcError(f"unknown data '{ref}': use digits, cifar10:DIR, cifar100:DIR or imagefolder:DIR.")
