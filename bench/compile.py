"""`gpdc compile` wall time against a bare `torch.onnx.export` + one onnxruntime run, same process.

    python bench/compile.py [--models resnet18,resnet50] [--repeats 3]

Each is run ``--repeats`` times, alternating, after one warm-up of each (imports, first-call costs); the best time of
each is compared (a shared machine is noisy). Prints the ratio and the per-stage breakdown of the best compile;
writes bench/results/compile.json. Target (issue 12): ratio ≤ 5. "checks floor" is the part of that ratio the checks
and the export alone take (check_ir + export + check_onnx over the bare export and run): what no speed-up of the rest
can remove with every check on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime as ort
import torch
import torchvision

from gpdc.compile import compile_model

SPECS = {"resnet18": "specs/r18.yaml", "resnet50": "specs/r50.yaml", "mobilenet_v2": "specs/mobilenet_v2.yaml"}


def bare_export(name: str, shape) -> float:
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(*shape)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        path = os.path.join(d, "m.onnx")
        torch.onnx.export(model, (x,), path, opset_version=17, dynamo=False, input_names=["input"],
                          dynamic_axes={"input": {0: "batch"}})
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        sess.run(None, {"input": x.numpy()})
    return time.perf_counter() - t


BARE_SCRIPT = """
import os, sys, tempfile, torch, torchvision, onnxruntime as ort
model = torchvision.models.get_model(sys.argv[1], weights=None).eval()
x = torch.randn(1, 3, 224, 224)
with tempfile.TemporaryDirectory() as d, torch.no_grad():
    path = os.path.join(d, "m.onnx")
    torch.onnx.export(model, (x,), path, opset_version=17, dynamo=False, input_names=["input"])
    ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
"""


def fresh_process(args: list[str]) -> float:
    """Wall time of a new Python process running ``args`` (what a user waits for, imports included)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    root = Path(__file__).resolve().parent.parent
    for name in args.models.split(","):
        spec = str(root / SPECS[name])
        shape = [1, 3, 224, 224]
        bare, compiled = [], []
        for i in range(args.repeats + 1):  # the first of each is the warm-up
            bare.append(bare_export(name, shape))
            with tempfile.TemporaryDirectory() as out:
                t = time.perf_counter()
                report, _ = compile_model(f"torchvision:{name}", spec, out)
                compiled.append((time.perf_counter() - t, report))
        base = min(bare[1:])
        total, report = min(compiled[1:], key=lambda c: c[0])
        with tempfile.TemporaryDirectory() as out:
            cli = min(fresh_process(["-m", "gpdc", "compile", f"torchvision:{name}", "--spec", spec, "--out", out])
                      for _ in range(2))
        script = min(fresh_process(["-c", BARE_SCRIPT, name]) for _ in range(2))
        floor = sum(report["seconds"][k] for k in ("check_ir", "export", "check_onnx")) / base
        rows.append({"model": name, "compile_s": total, "bare_export_and_run_s": base, "ratio": total / base,
                     "checks_floor_ratio": floor,
                     "stages_s": report["seconds"], "ok": report["ok"], "meets_target": total / base <= 5,
                     "fresh_process": {"gpdc_compile_s": cli, "bare_script_s": script, "ratio": cli / script}})
        stages = ", ".join(f"{k} {v:.2f}" for k, v in report["seconds"].items())
        print(f"{name:10s} compile {total:6.2f}s  bare export+run {base:5.2f}s  ratio {total / base:5.1f}x  "
              f"(checks floor {floor:4.1f}x)  [{stages}]"
              f"  | fresh processes: gpdc compile {cli:5.2f}s, bare script {script:5.2f}s, ratio {cli / script:4.1f}x",
              flush=True)
    out = Path(__file__).parent / "results" / "compile.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores", "threads": torch.get_num_threads(),
                               "command": f"python bench/compile.py --repeats {args.repeats}",
                               "rows": rows}, indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    main()
