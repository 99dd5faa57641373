"""Zoo sweep (issue 5): every torchvision classification model and the timm list of ``gpdc.zoo``
through trace → expand → fold → ONNX.

Per model (random weights with randomised constants, small inputs, batch 2): r = 2 with the
``replicate`` strategy and r = 1.5 with ``grow``; teacher and shared student exact (DESIGN.md §4,
norms in eval and train mode; ``max_rel_error`` = max |error| / max |ref|), the folded student equal to
the shared one after a strict load into a fresh instance, and its ONNX file equal in onnxruntime.
Each model runs in its own process (memory, time limit). Writes bench/results/zoo.json.

    python bench/zoo.py [--only resnet18,timm:deit_tiny_patch16_224] [--timeout 1800] [--resume] [--jobs 2]
    python bench/zoo.py --table      # the table from the results (--readme: into README.md)
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
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results" / "zoo.json"
CASES = [(2.0, "replicate"), (1.5, "grow")]
LARGE = {"torchvision:vit_h_14", "torchvision:regnet_y_128gf"}  # r = 2 needs > 24 GB here: r = 1.5 only


def sweep(ref: str) -> dict:
    import gpdc
    from gpdc.exactness import check, randomize, reference, set_mode
    from gpdc.export import check_onnx, export_onnx
    from gpdc.zoo import build, fold_into_fresh

    row: dict = {"model": ref, "stage": "build"}
    t_all = time.perf_counter()
    torch.manual_seed(0)
    model, s = build(ref)
    randomize(model.eval())
    row["input"] = s
    x = torch.randn(2, 3, s, s)
    refs = {nt: reference(model, x, nt) for nt in (False, True)}
    worst, rel, exp = 0.0, 0.0, None
    for ratio, strategy in CASES[1:] if ref in LARGE else CASES:
        row["stage"] = f"expand r={ratio} {strategy}"
        t0 = time.perf_counter()
        exp = None
        exp = gpdc.expand(model, {"input_shape": [2, 3, s, s], "expand": {"ratio": ratio, "strategy": strategy}})
        row["traced"] = True
        for nt, (r, own) in refs.items():
            for cand in (exp.teacher, exp.student):
                e = check(set_mode(cand, nt), r, own, x)
                worst = max(worst, e.ratio)
                rel = max(rel, e.error / max(e.scale, 1e-30))
        row[f"seconds_r{ratio}"] = round(time.perf_counter() - t0, 2)
    row.update(expand_exact=worst <= 1.0, worst_error_over_bound=worst, max_rel_error=rel,
               student_width_ops=sorted(exp.student_width), teacher_over_student_params=round(
                   exp.report()["teacher_params"] / max(exp.report()["student_params"], 1), 2))
    del model  # the largest models need the memory for fold and export
    row["stage"] = "fold"
    t0 = time.perf_counter()
    fresh, fold_err = fold_into_fresh(exp, ref, x)
    row.update(fold_exact=fold_err <= 1e-5, fold_rel_error=fold_err, seconds_fold=round(time.perf_counter() - t0, 2))
    del exp, refs
    row["stage"] = "onnx"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(fresh, x, Path(tmp) / "student.onnx")
        eq = check_onnx(path, fresh, torch.randn(3, 3, s, s))
    row.update(onnx_equal=eq.ok, onnx_max_abs=eq.max_abs, onnx_cosine=eq.cosine,
               seconds_onnx=round(time.perf_counter() - t0, 2))
    row["stage"] = "done"
    row["seconds"] = round(time.perf_counter() - t_all, 1)
    row["pass"] = bool(row["expand_exact"] and row["fold_exact"] and row["onnx_equal"])
    return row


def worker(ref: str, out: str) -> None:
    torch.set_num_threads(int(os.environ.get("GPDC_BENCH_THREADS", "2")))
    try:
        row = sweep(ref)
    except BaseException as e:  # recorded, not raised: one model's failure must not stop the sweep
        row = {"model": ref, "pass": False, "error": f"{type(e).__name__}: {str(e).strip()[:600]}",
               "trace": traceback.format_exc()[-1500:]}
    Path(out).write_text(json.dumps(row))


def run_one(ref: str, timeout: int) -> dict:
    fd, tmp = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", ref, "--result", tmp], timeout=timeout,
                              capture_output=True, text=True)
        text = Path(tmp).read_text()
        if text:
            return json.loads(text)
        return {"model": ref, "pass": False, "error": f"worker died (exit {proc.returncode}): {proc.stderr[-400:]}"}
    except subprocess.TimeoutExpired:
        return {"model": ref, "pass": False, "error": f"over the {timeout} s limit", "seconds": time.perf_counter() - t0}
    finally:
        os.unlink(tmp)


def save(results: dict) -> None:
    from gpdc.atomic import atomic_write

    payload = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
               "command": "python bench/zoo.py", "cases": [f"r={r} {s}" for r, s in CASES],
               "models": results}
    atomic_write(OUT, lambda p: Path(p).write_text(json.dumps(payload, indent=1)))


def table(results: dict) -> str:
    from gpdc.zoo import KNOWN_FAILURES

    lines = ["| model | input | expand exact (max rel err) | fold exact | ONNX equal | teacher/student params "
             "(ops at student width) | seconds |", "|---|---|---|---|---|---|---|"]
    from gpdc.zoo import all_refs

    for ref in all_refs():
        r = results.get(ref)
        if r is None:
            lines.append(f"| {ref} | | not run in the recorded sweep | | | | |")
            continue
        if "error" in r:
            reason = KNOWN_FAILURES.get(ref, r["error"]).split(";")[0][:90]
            lines.append(f"| {ref} | | fails: {reason} | | | | |")
            continue
        lines.append(f"| {ref} | {r['input']} | {'yes' if r['expand_exact'] else 'NO'} ({r['max_rel_error']:.1e}) | "
                     f"{'yes' if r['fold_exact'] else 'NO'} | {'yes' if r['onnx_equal'] else 'NO'} | "
                     f"{_widening(r)} | {r['seconds']:.0f} |")
    for source in ("torchvision", "timm"):
        refs = [k for k in all_refs() if k.startswith(source)]
        passed = sum(bool(results.get(k, {}).get("pass")) for k in refs)
        missing = sum(k not in results for k in refs)
        lines.append(f"\n{source}: {passed} of {len(refs)} pass" + (f" ({missing} not run)" if missing else ""))
    return "\n".join(lines)


def _widening(row: dict) -> str:
    """Teacher/student parameters at the last case run (r = 1.5), and the ops the teacher runs unwidened."""
    ratio = row.get("teacher_over_student_params")
    ops = row.get("student_width_ops", [])
    return ("" if ratio is None else f"{ratio:g}") + (f" ({len(ops)})" if ops else "")


def update_readme(results: dict) -> None:
    """Replace the README's zoo section (between the zoo-table markers) with the current table."""
    from gpdc.zoo import KNOWN_FAILURES

    readme = Path(__file__).parent.parent / "README.md"
    text = readme.read_text()
    start, end = "<!-- zoo-table -->", "<!-- /zoo-table -->"
    known = "\n".join(f"* `{ref}`: {why}" for ref, why in KNOWN_FAILURES.items()) or "none."
    body = f"{start}\n{table(results)}\n\nKnown failures (`KNOWN_FAILURES` in `gpdc/zoo.py`):\n\n{known}\n{end}"
    text = text[: text.index(start)] + body + text[text.index(end) + len(end):]
    from gpdc.atomic import atomic_write

    atomic_write(readme, lambda p: Path(p).write_text(text))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--jobs", type=int, default=1, help="models run in parallel (one process each)")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    ap.add_argument("--resume", action="store_true", help="skip models already in the results")
    ap.add_argument("--worker")
    ap.add_argument("--result")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.result)
    results = json.loads(OUT.read_text())["models"] if OUT.exists() else {}
    if args.table or args.readme:
        update_readme(results) if args.readme else print(table(results))
        return
    from gpdc.zoo import all_refs

    refs = all_refs()
    if args.resume:
        refs = [r for r in refs if r not in results]
    if args.only:
        want = [w if ":" in w else f"torchvision:{w}" for w in args.only.split(",")]
        refs = [r for r in refs if r in want]
    print(f"{'model':44s} {'pass':>5s} {'err/bound':>10s} {'seconds':>8s}")
    small, large = [r for r in refs if r not in LARGE], [r for r in refs if r in LARGE]
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on the worker processes
        for ref, row in zip(small, pool.map(lambda r: run_one(r, args.timeout), small)):
            record(results, ref, row)
    for ref in large:  # alone: they need most of the memory
        record(results, ref, run_one(ref, args.timeout))


def record(results: dict, ref: str, row: dict) -> None:
    results[ref] = row
    save(results)
    print(f"{ref:44s} {str(row.get('pass')):>5s} {row.get('worst_error_over_bound', float('nan')):10.3g} "
          f"{row.get('seconds', 0):8.1f} {row.get('error', '')[:120]}", flush=True)


if __name__ == "__main__":
    main()
