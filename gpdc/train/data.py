"""Datasets for ``gpdc train``: nothing downloads.

* ``digits`` (default): scikit-learn's bundled 8×8 digits (1797 images, 10 classes), a fixed split:
  a permutation with seed 0, the first 1437 images (80%) train, the last 360 test. Pixels /16,
  then normalised to mean 0, std 1 with the training split's statistics.
* ``cifar10:DIR`` / ``cifar100:DIR``: torchvision's python version already extracted under DIR, read directly
  (each file checked for shape and labels, not against the official checksums, so generated data of the same
  format works too); training pads by 4, crops 32×32 and flips.
* ``imagefolder:DIR``: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or ``DIR/test``) with timm's transforms
  at the spec's input size (``data:`` section): training RandomResizedCrop + flip (+ auto-augment, random
  erasing), evaluation resize by ``crop_pct`` + center crop.
* ``py:FILE.py[:FUNC]``: ``FUNC()`` (default ``build_data``) in the user's file returns ``(train, val, num_classes)``
  — any map-style datasets of (image tensor, label).
"""

from __future__ import annotations

import pickle
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


_CIFAR = {  # folder, training files, test files, label key, classes (torchvision's python version)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


class CifarImages(Dataset):
    """CIFAR images (uint8 N×32×32×3) and labels, through ``transform`` as PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _cifar_files(folder: Path, names: list[str], key: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of CIFAR's python-format files; a missing, truncated or altered one is named."""
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise GpdcError(f"{path} is missing: {folder} should hold torchvision's extracted python version of the "
                            "dataset; gpdc never downloads data.")
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            data, y = np.asarray(batch["data"], dtype=np.uint8), np.asarray(batch[key], dtype=np.int64)
            ok = data.ndim == 2 and data.shape[1] == 3072 and len(y) == len(data) and (len(y) == 0 or
                                                                                     0 <= y.min() <= y.max() < classes)
        except Exception:  # noqa: BLE001 -- unpickling garbage raises anything
            ok = False
        if not ok:
            raise GpdcError(f"{path} fails the integrity check: it is not a CIFAR batch of 32×32 images with labels "
                            f"0..{classes - 1} (truncated or altered?); extract the original archive there again.")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def _cifar(kind: str, root: str) -> Data:
    import torchvision.transforms as T

    sub, train_files, test_files, key, classes = _CIFAR[kind]
    folder = Path(root) / sub
    if not folder.is_dir():
        raise GpdcError(f"no {kind} dataset under {root}: expected torchvision's extracted python version there "
                        f"({folder}); gpdc never downloads data.")
    norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    train = CifarImages(*_cifar_files(folder, train_files, key, classes), train_tf)
    test = CifarImages(*_cifar_files(folder, test_files, key, classes), T.Compose([T.ToTensor(), norm]))
    return Data(train, test, classes, kind)


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
