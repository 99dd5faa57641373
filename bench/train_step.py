"""Samples/second of a GPD training step vs a KD step, ResNet-34 → ResNet-18 at 224×224 (random data),
with the FLOP ratio that bounds the slowdown. Runs unchanged on CPU or CUDA.

    python bench/train_step.py [--batch 8] [--steps 5] [--device auto]

Writes bench/results/train_step_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import gpdc
from gpdc.spec import TrainSpec
from gpdc.train.step import Baseline, train_step

ROOT = Path(__file__).resolve().parent.parent


def build(kind: str, device, batch: int):
    torch.manual_seed(0)
    static = torchvision.models.resnet34().to(device).eval().requires_grad_(False)
    student = torchvision.models.resnet18()
    if kind == "kd":
        cfg = TrainSpec(gpd=False, kd="dkd")
        return Baseline(student, static, cfg).to(device), cfg
    spec = gpdc.load_spec(ROOT / "specs/r18.yaml").model_copy(update={"input_shape": [2, 3, 224, 224]})
    if kind == "gpd_no_branches":
        spec = spec.model_copy(update={"branches": spec.branches.model_copy(update={"kinds": []})})
    exp = gpdc.expand(student, spec)
    cfg = TrainSpec(kd="dkd")
    return gpdc.GPD(exp, static, cfg).to(device), cfg


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(kind: str, device, batch: int, steps: int) -> dict:
    model, cfg = build(kind, device, batch)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    model.train()
    with FlopCounterMode(display=False) as fc:
        train_step(model, params, cfg, x, y, opt)
    flops = fc.get_total_flops()
    for _ in range(2):
        train_step(model, params, cfg, x, y, opt)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        train_step(model, params, cfg, x, y, opt)
    sync(device)
    sec = (time.perf_counter() - t) / steps
    return {"kind": kind, "batch": batch, "step_seconds": sec, "samples_per_second": batch / sec, "flops_per_step": flops}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    batch = args.batch or (64 if device.type == "cuda" else 8)
    kd = measure("kd", device, batch, args.steps)
    gpd = measure("gpd", device, batch, args.steps)
    plain = measure("gpd_no_branches", device, batch, args.steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    print(f"device: {name}, batch {batch}, ResNet-34 → ResNet-18, 224×224")
    print(f"{'step':16s} {'samples/s':>10s} {'GFLOP/step':>11s}")
    for r in (kd, gpd, plain):
        print(f"{r['kind']:16s} {r['samples_per_second']:10.1f} {r['flops_per_step'] / 1e9:11.1f}")
    ratio = kd["samples_per_second"] / gpd["samples_per_second"]
    fratio = gpd["flops_per_step"] / kd["flops_per_step"]
    print(f"GPD step is {ratio:.2f}× slower than KD; the FLOP ratio is {fratio:.2f}×")
    print(f"without CBR branches: {kd['samples_per_second'] / plain['samples_per_second']:.2f}× slower, "
          f"FLOP ratio {plain['flops_per_step'] / kd['flops_per_step']:.2f}×")
    out = ROOT / "bench" / "results" / f"train_step_{device.type}.json"
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "command": "python bench/train_step.py",
                               "kd": kd, "gpd": gpd, "gpd_no_branches": plain,
                               "slowdown": ratio, "flop_ratio": fratio}, indent=1))


if __name__ == "__main__":
    main()
