"""Datasets for ``gpdc train``: nothing downloads.

* ``digits`` (default): scikit-learn's bundled 8×8 digits (1797 images, 10 classes), a fixed split:
  a permutation with seed 0, the first 1437 images (80%) train, the last 360 test. Pixels /16,
  then normalised to mean 0, std 1 with the training split's statistics.
* ``cifar10:DIR`` / ``cifar100:DIR``: torchvision's datasets already on disk (the python version); training
  pads by 4, crops 32×32 and flips.
* ``imagefolder:DIR``: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or ``DIR/test``) with timm's transforms
  at the spec's input size (``data:`` section): training RandomResizedCrop + flip (+ auto-augment, random
  erasing), evaluation resize by ``crop_pct`` + center crop.
* ``py:FILE.py[:FUNC]``: ``FUNC()`` (default ``build_data``) in the user's file returns ``(train, val, num_classes)``
  — any map-style datasets of (image tensor, label).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..errors import GpdcError
from ..models import import_user_file
from ..spec import DataSpec

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
        folder = Path(root) / cls.base_folder
        if folder.is_dir():
            raise GpdcError(f"{kind}:{root}: the files in {folder} fail torchvision's integrity (MD5) check — truncated "
                            "or altered; extract the original archive there again.") from None
        raise GpdcError(f"no {kind} dataset under {root}: expected torchvision's extracted python version there "
                        f"({folder}); gpdc never downloads data.") from None
    return Data(train, test, 10 if kind == "cifar10" else 100, kind)


def _imagefolder(root: str, size: tuple[int, int], spec: DataSpec) -> Data:
    import torchvision
    from timm.data import create_transform

    base = Path(root)
    test_dir = next((base / d for d in ("val", "test") if (base / d).is_dir()), None)
    if not (base / "train").is_dir() or test_dir is None:
        raise GpdcError(f"imagefolder:{root} needs {root}/train/<class>/... and {root}/val/<class>/... (or test/).")
    common = {"input_size": (3, *size), "interpolation": spec.interpolation, "mean": spec.mean, "std": spec.std}
    train_tf = create_transform(**common, is_training=True, scale=spec.scale, ratio=spec.ratio, hflip=spec.hflip,
                                vflip=0.0, color_jitter=None, auto_augment=spec.auto_augment, re_prob=spec.re_prob)
    eval_tf = create_transform(**common, is_training=False, crop_pct=spec.crop_pct)
    try:
        train = torchvision.datasets.ImageFolder(str(base / "train"), transform=train_tf)
        test = torchvision.datasets.ImageFolder(str(test_dir), transform=eval_tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise GpdcError(f"imagefolder:{root}: {e}") from None
    if train.classes != test.classes:
        raise GpdcError(f"imagefolder:{root}: train and {test_dir.name} have different classes.")
    return Data(train, test, len(train.classes), f"imagefolder:{root}")


def _user_data(ref: str) -> Data:
    file, _, func = ref.partition(":")
    func = func or "build_data"
    module = import_user_file(Path(file), what="data")
    fn = getattr(module, func, None)
    if not callable(fn):
        raise GpdcError(f"{file} has no function '{func}()'. Define `def {func}(): return train, val, num_classes` "
                        "in it, or name another one: --data py:FILE.py:FUNC.")
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 -- the user's code: one clear line, no traceback
        raise GpdcError(f"{file}:{func}() raised {type(e).__name__}: {e}. Fix it so that it returns "
                        "(train, val, num_classes).") from None
    if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], int) and out[2] > 1
            and all(hasattr(d, "__getitem__") and hasattr(d, "__len__") for d in out[:2])):
        raise GpdcError(f"{file}:{func}() must return (train, val, num_classes): two map-style datasets of (image "
                        f"tensor, label) and the number of classes; it returned {type(out).__name__}.")
    train, test, n = out
    if len(train) == 0 or len(test) == 0:
        raise GpdcError(f"{file}:{func}() returned an empty {'training' if len(train) == 0 else 'validation'} set.")
    return Data(train, test, n, f"py:{ref}")


def load_data(ref: str, input_size: tuple[int, int] = (32, 32), spec: DataSpec | None = None) -> Data:
    spec = spec or DataSpec()
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
        return _imagefolder(root, input_size, spec)
    if kind == "py" and root:
        return _user_data(root)
    raise GpdcError(f"unknown data '{ref}': use digits, cifar10:DIR, cifar100:DIR, imagefolder:DIR or "
                    "py:FILE.py[:FUNC].")
