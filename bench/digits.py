"""GPD on the bundled digits: test accuracy (mean ± std over seeds) of the student alone, KD, DKD,
GPD from scratch, GPD + KD and GPD + DKD for both IR strategies, ReviewKD and GPD + ReviewKD, plus the static
teacher, and the training-step time of each relative to KD and to the student alone (same run).

    python bench/digits.py [--seeds 10] [--epochs 20] [--workers 2]

Writes bench/results/digits.json and bench/results/digits.png, prints a markdown table. Nothing is
tuned on the test split: every setting is the spec in examples/digits/ (gpd.yaml, reviewkd.yaml, teacher.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDENT = str(ROOT / "examples/digits/student.py")
TEACHER = str(ROOT / "examples/digits/teacher.py")

CONFIGS = {  # name: (train overrides, uses the static teacher)
    "student alone": ({"gpd": False, "kd": "none"}, False),
    "KD": ({"gpd": False, "kd": "hinton"}, True),
    "DKD": ({"gpd": False, "kd": "dkd"}, True),
    "GPD scratch (replicate)": ({"gpd": True, "kd": "none"}, False),
    "GPD + KD (replicate)": ({"gpd": True, "kd": "hinton"}, True),
    "GPD + DKD (replicate)": ({"gpd": True, "kd": "dkd"}, True),
    "GPD scratch (grow)": ({"gpd": True, "kd": "none", "strategy": "grow"}, False),
    "GPD + KD (grow)": ({"gpd": True, "kd": "hinton", "strategy": "grow"}, True),
    "GPD + DKD (grow)": ({"gpd": True, "kd": "dkd", "strategy": "grow"}, True),
    "GPD + DKD (replicate, balanced grad)": ({"gpd": True, "kd": "dkd", "student_grad": "balanced"}, True),
    "ReviewKD": ({"gpd": False, "kd": "reviewkd"}, True),
    "GPD + ReviewKD (replicate)": ({"gpd": True, "kd": "reviewkd"}, True),
}


def _spec(overrides: dict, epochs: int):
    import yaml

    from gpdc import Spec

    base = yaml.safe_load((ROOT / "examples/digits/gpd.yaml").read_text())
    if overrides["kd"] == "reviewkd":  # its taps and weights
        base = yaml.safe_load((ROOT / "examples/digits/reviewkd.yaml").read_text())
    overrides = dict(overrides)
    strategy = overrides.pop("strategy", "replicate")
    base["expand"]["strategy"] = strategy
    base["train"].update(overrides, epochs=epochs)
    return Spec.model_validate(base)


def _run(job):
    import torch

    torch.set_num_threads(1)
    from gpdc.train.loop import train

    name, seed, epochs, teacher_weights = job
    overrides, uses_teacher = CONFIGS[name]
    with tempfile.TemporaryDirectory() as out:
        metrics = train(STUDENT, _spec(overrides, epochs), "digits", out, seed=seed, export=False,
                        teacher_ref=TEACHER if uses_teacher else None, teacher_weights=teacher_weights if uses_teacher else None)
    last = metrics[-1]
    steps = [m["step_seconds"] for m in metrics[1:]] or [metrics[0]["step_seconds"]]
    return name, seed, last["student_acc"], last.get("teacher_acc"), statistics.median(steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    import torch

    from gpdc.train.loop import train

    torch.set_num_threads(1)
    results_dir = ROOT / "bench" / "results"
    teacher_dir = results_dir / "digits_teacher"
    t_metrics = train(TEACHER, str(ROOT / "examples/digits/teacher.yaml"), "digits", str(teacher_dir), seed=0, export=False)
    teacher_weights = str(teacher_dir / "student.safetensors")
    jobs = [(name, seed, args.epochs, teacher_weights) for seed in range(args.seeds) for name in CONFIGS]
    with get_context("spawn").Pool(args.workers) as pool:
        rows = pool.map(_run, jobs, chunksize=1)
    table = {}
    for name in CONFIGS:
        accs = [100 * r[2] for r in rows if r[0] == name]
        taccs = [100 * r[3] for r in rows if r[0] == name and r[3] is not None]
        steps = [r[4] for r in rows if r[0] == name]
        table[name] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                       "accs": accs, "dynamic_teacher_mean": statistics.mean(taccs) if taccs else None,
                       "step_seconds": statistics.median(steps)}
    base_step = table["student alone"]["step_seconds"]
    kd_step = table["KD"]["step_seconds"]
    print(f"static teacher: {100 * t_metrics[-1]['student_acc']:.2f}%  (seeds {args.seeds}, epochs {args.epochs})\n")
    print("| setting | student test acc % (mean ± std) | dynamic teacher % | step time vs student alone | vs KD |")
    print("|---|---|---|---|---|")
    for name, t in table.items():
        dyn = f"{t['dynamic_teacher_mean']:.2f}" if t["dynamic_teacher_mean"] is not None else "—"
        print(f"| {name} | {t['mean']:.2f} ± {t['std']:.2f} | {dyn} | {t['step_seconds'] / base_step:.2f}× | "
              f"{t['step_seconds'] / kd_step:.2f}× |")
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "command": f"python bench/digits.py --seeds {args.seeds} "
           f"--epochs {args.epochs}", "static_teacher_acc": 100 * t_metrics[-1]["student_acc"], "settings": table}
    tmp = results_dir / "digits.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, results_dir / "digits.json")
    _plot(table, out["static_teacher_acc"], results_dir / "digits.png")


def _plot(table, static, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh(range(len(names)), [table[n]["mean"] for n in names], xerr=[table[n]["std"] for n in names], color="tab:green")
    ax.axvline(static, color="tab:blue", ls="--", label=f"static teacher {static:.2f}%")
    ax.set_yticks(range(len(names)), names)
    lo = min(table[n]["mean"] - 2 * table[n]["std"] for n in names)
    ax.set_xlim(max(0, lo - 1), 100)
    ax.set_xlabel("student test accuracy on digits (%)")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
