"""Exactness sweep over the torchvision classification CNNs (DESIGN.md §4); the transformers run the
same matrix in tests/test_transformers.py and every model runs in bench/zoo.py.

For each model (random weights, randomised BN statistics), ratios 2 and 1.5, both strategies,
BN in eval and train mode: the worst error/bound ratio of teacher and shared student (<= 1 is
exact). Writes bench/results/exactness.json.

    python bench/exactness.py [--size 64] [--only resnet,vgg] [--skip-largest]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torchvision

import gpdc
from gpdc.exactness import check, randomize, reference, set_mode

TRANSFORMERS = ("vit", "swin", "maxvit", "convnext")  # full matrix in tests/test_transformers.py; zoo sweep: bench/zoo.py
LARGEST = {"regnet_y_128gf"}  # an r = 2 teacher needs > 10 GB; represented by regnet_y_32gf


def cnn_names() -> list[str]:
    names = torchvision.models.list_models(module=torchvision.models)
    return [n for n in names if not n.startswith(TRANSFORMERS)]


def input_size(name: str, size: int) -> int:
    return max(size, 80) if name.startswith("inception") else size


def sweep_model(name: str, size: int, ratios=(2.0, 1.5), strategies=("replicate", "grow")) -> dict:
    torch.manual_seed(0)
    model = randomize(torchvision.models.get_model(name, weights=None, num_classes=10))
    s = input_size(name, size)
    x = torch.randn(2, 3, s, s)
    refs = {nt: reference(model, x, nt) for nt in (False, True)}
    rows = []
    t0 = time.perf_counter()
    for r in ratios:
        for strategy in strategies:
            exp = gpdc.expand(model, {"input_shape": [2, 3, s, s], "expand": {"ratio": r, "strategy": strategy}})
            for nt, (ref, own) in refs.items():
                for which, cand in (("teacher", exp.teacher), ("student", exp.student)):
                    e = check(set_mode(cand, nt), ref, own, x)
                    rows.append({"ratio": r, "strategy": strategy, "bn": "train" if nt else "eval", "model": which,
                                 "error": e.error, "bound": e.bound, "error_over_bound": e.ratio, "ok": e.ok})
            del exp
    worst = max(rows, key=lambda row: row["error_over_bound"])
    return {"model": name, "input": s, "seconds": time.perf_counter() - t0, "worst_error_over_bound": worst["error_over_bound"],
            "all_exact": all(row["ok"] for row in rows), "worst_case": worst, "cases": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "exactness.json"))
    args = ap.parse_args()
    names = [n for n in cnn_names() if n not in LARGEST]
    if args.only:
        names = [n for n in names if n.startswith(tuple(args.only.split(",")))]
    out = Path(args.out)
    results = json.loads(out.read_text())["models"] if out.exists() else {}
    print(f"{'model':24s} {'worst err/bound':>16s} {'exact':>6s} {'seconds':>8s}")
    for name in names:
        res = sweep_model(name, args.size)
        results[name] = res
        print(f"{name:24s} {res['worst_error_over_bound']:16.3g} {str(res['all_exact']):>6s} {res['seconds']:8.1f}", flush=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                                   "command": "python bench/exactness.py", "skipped_largest": sorted(LARGEST),
                                   "models": results}, indent=1))
        tmp.replace(out)


if __name__ == "__main__":
    main()
