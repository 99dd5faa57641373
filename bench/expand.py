"""Cost of trace + analyze + plan + expand (r = 2) against one teacher forward pass, same run.

Each model runs in a fresh subprocess so its peak RSS is its own. Prints a table and writes
bench/results/expand.json.

    python bench/expand.py [--models resnet18,resnet50,mobilenet_v2] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure(name: str, size: int) -> dict:
    import torch
    import torchvision

    import gpdc

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    exp = gpdc.expand(model, {"input_shape": [1, 3, size, size], "expand": {"ratio": 2.0}})
    t_expand = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x = torch.randn(1, 3, size, size)
    exp.teacher.eval()
    with torch.no_grad():
        exp.teacher(x)  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            exp.teacher(x)
            times.append(time.perf_counter() - t)
    t_fwd = min(times)
    return {"model": name, "input": [1, 3, size, size], "expand_s": t_expand, "teacher_forward_s": t_fwd,
            "expand_over_forward": t_expand / t_fwd, "peak_rss_mb": rss1 / 1024, "rss_growth_mb": (rss1 - rss0) / 1024,
            "student_params": sum(p.numel() for p in exp.original.parameters()),
            "teacher_params": sum(p.numel() for p in exp.teacher.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.size)))
        return
    rows = []
    for name in args.models.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", name, "--size", str(args.size)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'model':14s} {'expand s':>9s} {'teacher fwd s':>14s} {'ratio':>7s} {'peak RSS MB':>12s} {'params S→T':>22s}")
    for r in rows:
        print(f"{r['model']:14s} {r['expand_s']:9.2f} {r['teacher_forward_s']:14.3f} {r['expand_over_forward']:7.1f} "
              f"{r['peak_rss_mb']:12.0f} {r['student_params']/1e6:9.1f}M → {r['teacher_params']/1e6:.1f}M")
    out = Path(__file__).parent / "results" / "expand.json"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
                               "command": "python bench/expand.py", "rows": rows}, indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    main()
