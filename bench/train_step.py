"""A GPD training step against a KD step, ResNet-34 → ResNet-18 at 224×224 (random data), next to the FLOP ratios
that bound it (METHOD.md §3). Runs unchanged on CPU or CUDA.

    python bench/train_step.py [--batches 4,32] [--precisions fp32] [--steps 2] [--rounds 3] [--device auto]

For each batch size and precision it times a KD step, a GPD step (each branch block and the student's conv that
reads it run the cheaper way at the actual shapes) and a GPD step without branches, and counts their FLOPs
(forward + backward, torch's FlopCounterMode); the three are timed in alternating rounds, the best round of each
reported (a shared machine's drift hits all alike). Two bounds on the GPD/KD ratio:

* dense bound      FLOPs of a GPD step without branches / a KD step;
* best-plan bound  FLOPs of the GPD step with every block run the way of fewest FLOPs (``flops_only``) / a KD step.

Target: time ratio ≤ 1.25 × the best-plan bound. The step as timed picks each block's way by FLOPs and memory
passes (``gpdc.branch_plan``), which can add FLOPs to save time: its FLOP ratio is the as-run bound. The FLOP ratios
at 96×96 (METHOD.md's worked example) and of the all-merged plan are counted too. Writes bench/results/train_step_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import gpdc
from gpdc.branch_plan import MERGED, flops_only, forced_plan
from gpdc.spec import TrainSpec
from gpdc.train.step import Baseline, train_step

ROOT = Path(__file__).resolve().parent.parent


def build(kind: str, device, size: int):
    torch.manual_seed(0)
    static = torchvision.models.resnet34().to(device).eval().requires_grad_(False)
    student = torchvision.models.resnet18()
    if kind == "kd":
        cfg = TrainSpec(gpd=False, kd="dkd")
        return Baseline(student, static, cfg).to(device), cfg
    spec = gpdc.load_spec(ROOT / "specs/r18.yaml").model_copy(update={"input_shape": [2, 3, size, size]})
    if kind == "gpd_no_branches":
        spec = spec.model_copy(update={"branches": spec.branches.model_copy(update={"kinds": []})})
    exp = gpdc.expand(student, spec)
    cfg = TrainSpec(kd="dkd")
    return gpdc.GPD(exp, static, cfg).to(device), cfg


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_flops(model, cfg, x, y, plans=nullcontext()) -> int:
    """FLOPs of one step (forward, backward), with blocks run as ``plans`` (a context) has them."""
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.0)
    with FlopCounterMode(display=False) as fc, plans:
        train_step(model, params, cfg, x, y, opt)
    return fc.get_total_flops()


class Stepper:
    """One kind's model, optimiser and batch, ready to time steps."""

    def __init__(self, kind: str, device, batch: int, precision: str, size: int = 224):
        self.model, cfg = build(kind, device, size)
        self.cfg = cfg.model_copy(update={"precision": precision})
        self.params = list(self.model.parameters())
        self.opt = torch.optim.SGD(self.params, lr=0.01, momentum=0.9, fused=True)  # as gpdc train: one pass each
        self.x = torch.randn(batch, 3, size, size, device=device)
        self.y = torch.randint(0, 1000, (batch,), device=device)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.device = device
        self.model.train()
        self.row = {"kind": kind, "batch": batch, "precision": precision,
                    "flops_per_step": step_flops(self.model, self.cfg, self.x, self.y)}
        if kind == "gpd":
            self.row["flops_fewest"] = step_flops(self.model, self.cfg, self.x, self.y, flops_only())
            self.row["flops_all_merged"] = step_flops(self.model, self.cfg, self.x, self.y, forced_plan(MERGED))
        self.seconds: list[float] = []

    def time(self, steps: int) -> None:
        sync(self.device)
        t = time.perf_counter()
        for _ in range(steps):
            train_step(self.model, self.params, self.cfg, self.x, self.y, self.opt, None, self.scaler)
        sync(self.device)
        self.seconds.append((time.perf_counter() - t) / steps)

    def result(self) -> dict:
        sec = min(self.seconds)  # the least disturbed round on a shared machine
        return self.row | {"step_seconds": sec, "samples_per_second": self.row["batch"] / sec,
                           "rounds_seconds": self.seconds}


def measure(device, batch: int, steps: int, rounds: int, precision: str) -> dict[str, dict]:
    """KD, GPD and branch-free GPD steps timed in alternating rounds (after two warm-up steps each), best round each:
    the machine's drift hits all three alike."""
    steppers = {k: Stepper(k, device, batch, precision) for k in ("kd", "gpd", "gpd_no_branches")}
    for s in steppers.values():
        s.time(2)
        s.seconds.clear()
    for _ in range(rounds):
        for s in steppers.values():
            s.time(steps)
    return {k: s.result() for k, s in steppers.items()}


def bounds_at(device, batch: int, size: int) -> dict:
    """The two bounds at another input size, from FLOP counts alone."""
    out = {}
    for kind in ("kd", "gpd", "gpd_no_branches"):
        model, cfg = build(kind, device, size)
        model.train()
        x, y = torch.randn(batch, 3, size, size, device=device), torch.randint(0, 1000, (batch,), device=device)
        out[kind] = step_flops(model, cfg, x, y, flops_only())
    return {"batch": batch, "size": size, "dense_bound": out["gpd_no_branches"] / out["kd"],
            "best_plan_bound": out["gpd"] / out["kd"], "best_plan_over_dense": out["gpd"] / out["gpd_no_branches"]}


def bf16_speedups(rows: list[dict]) -> list[dict]:
    """Samples/s under bf16 autocast over float32, per batch size, for the KD and the GPD step."""
    by = {(r["batch"], r["precision"]): r for r in rows}
    return [{"batch": b, **{k: by[b, "bf16"][k]["samples_per_second"] / by[b, "fp32"][k]["samples_per_second"]
                            for k in ("kd", "gpd")}}
            for b in sorted({b for b, _ in by}) if (b, "bf16") in by and (b, "fp32") in by]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default=None, help="comma-separated (default 4,32 on CPU, 64,256 on CUDA)")
    ap.add_argument("--precisions", default=None, help="fp32,bf16,fp16 (default fp32 on CPU, fp32,bf16 on CUDA)")
    ap.add_argument("--steps", type=int, default=2, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; each kind's best is reported")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    if not cuda:
        gpdc.keep_freed_memory()  # as gpdc train does on CPU
    batches = [int(b) for b in (args.batches or ("64,256" if cuda else "4,32")).split(",")]
    precisions = (args.precisions or ("fp32,bf16" if cuda else "fp32")).split(",")
    torch.backends.cudnn.benchmark = cuda  # as a user's GPU run would: each conv's fastest algorithm
    name = torch.cuda.get_device_name(device) if cuda else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    print(f"device: {name}, ResNet-34 → ResNet-18, 224×224, {torch.get_num_threads()} threads")
    print(f"{'batch':>5s} {'prec':>5s} {'KD s/step':>10s} {'GPD s/step':>11s} {'no-branch s':>11s} {'time ratio':>10s} "
          f"{'dense bound':>11s} {'best-plan bound':>15s} {'as run':>7s} {'all-merged':>10s} {'≤1.25×bound':>11s}")
    rows = []
    for batch in batches:
        for precision in precisions:
            m = measure(device, batch, args.steps, args.rounds, precision)
            kd, gpd, plain = m["kd"], m["gpd"], m["gpd_no_branches"]
            row = {"batch": batch, "precision": precision, "kd": kd, "gpd": gpd, "gpd_no_branches": plain,
                   "time_ratio": gpd["step_seconds"] / kd["step_seconds"],
                   "dense_bound": plain["flops_per_step"] / kd["flops_per_step"],
                   "best_plan_bound": gpd["flops_fewest"] / kd["flops_per_step"],
                   "as_run_bound": gpd["flops_per_step"] / kd["flops_per_step"],
                   "all_merged_bound": gpd["flops_all_merged"] / kd["flops_per_step"]}
            row["meets_target"] = row["time_ratio"] <= 1.25 * row["best_plan_bound"]
            rows.append(row)
            print(f"{batch:5d} {precision:>5s} {kd['step_seconds']:10.3f} {gpd['step_seconds']:11.3f} "
                  f"{plain['step_seconds']:11.3f} {row['time_ratio']:10.2f} {row['dense_bound']:11.2f} "
                  f"{row['best_plan_bound']:15.2f} {row['as_run_bound']:7.2f} {row['all_merged_bound']:10.2f} "
                  f"{str(row['meets_target']):>11s}",
                  flush=True)
    speedups = bf16_speedups(rows)
    for s in speedups:
        print(f"batch {s['batch']}: bf16 samples/s over fp32 — KD {s['kd']:.2f}×, GPD {s['gpd']:.2f}×")
    small = [bounds_at(device, b, 96) for b in (4, 32)]
    for s in small:
        print(f"96×96, batch {s['batch']}: dense bound {s['dense_bound']:.2f}, best-plan bound {s['best_plan_bound']:.2f} "
              f"= {s['best_plan_over_dense']:.2f}× the dense bound")
    out = ROOT / "bench" / "results" / f"train_step_{device.type}.json"
    out.write_text(json.dumps({"device": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "command": " ".join(["python", *sys.argv]), "rows": rows, "bf16_over_fp32": speedups, "flops_at_96": small}, indent=1))


if __name__ == "__main__":
    main()
