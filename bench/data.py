"""Images/s of `gpdc train`'s loader against a bare torchvision ImageFolder + DataLoader with the same transforms and
workers, on a generated imagefolder (2,000 PNGs per size by default).

    python bench/data.py [--images 2000] [--sizes 64,224] [--batch 64]

Each loader runs two epochs; the second (warm: workers started, files in the page cache) is timed. Writes
bench/results/data.json. Target (issue 13): gpdc / bare ≥ 0.9 at the default workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader

from gpdc.spec import DataSpec
from gpdc.train.data import load_data
from gpdc.train.loader import Batches, default_workers


def generate(root: Path, images: int, size: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", images), ("val", classes)):
        for i in range(n):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")


def timed_epochs(epoch_iter, n_epochs: int = 2) -> float:
    """Images/s of the last of ``n_epochs`` epochs."""
    for e in range(n_epochs):
        t, n = time.perf_counter(), 0
        for x, _ in epoch_iter(e):
            n += len(x)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--sizes", default="64,224")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    rows = []
    print(f"{'size':>5s} {'workers':>7s} {'gpdc img/s':>11s} {'bare img/s':>11s} {'ratio':>6s}")
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as d:
            generate(Path(d), args.images, size)
            for workers in sorted({0, default_workers(1)}):
                spec = DataSpec(workers=workers)
                data = load_data(f"imagefolder:{d}", (size, size), spec)
                ours = Batches(data.train, args.batch, torch.device("cpu"), spec, 0, 0, 1, shuffle=True)
                gpdc_rate = timed_epochs(ours.epoch)
                bare_ds = torchvision.datasets.ImageFolder(os.path.join(d, "train"), transform=data.train.transform)
                bare = DataLoader(bare_ds, batch_size=args.batch, shuffle=True, num_workers=workers,
                                  persistent_workers=workers > 0)
                bare_rate = timed_epochs(lambda e: iter(bare))
                rows.append({"size": size, "workers": workers, "gpdc_images_per_s": gpdc_rate,
                             "bare_images_per_s": bare_rate, "ratio": gpdc_rate / bare_rate})
                print(f"{size:5d} {workers:7d} {gpdc_rate:11.0f} {bare_rate:11.0f} {gpdc_rate / bare_rate:6.2f}", flush=True)
    out = Path(__file__).parent / "results" / "data.json"
    out.write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                               "command": f"python bench/data.py --images {args.images} --sizes {args.sizes}",
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
