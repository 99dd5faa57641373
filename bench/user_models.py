"""Users' models (tests/user_models/): every builder of the corpus through expand, fold and ``gpdc compile``.

Per builder (loaded as ``gpdc compile FILE --entry NAME`` loads it; random weights, randomised BatchNorm
statistics and FrozenBatchNorm2d buffers, batch 2, 32×32 for the CIFAR models and 64×64 for the dense ones):

* expand at r = 1.5 with ``replicate`` and with ``grow``; teacher and shared student against a float64 reference
  (norms in eval and train mode, DESIGN.md §4): "exact" with the worst error / bound over the 8 checks;
* the output structure of ``model(x)`` (from its pytree), whether teacher and shared student return the same one
  ("same structure"), and the coupled channel groups: widened (ratio > 1) and pinned (kept at the student's width,
  e.g. because they reach a pinned output);
* fold (of the ``grow`` expansion): ``fold_state_dict()`` loaded strict into a fresh build equals the shared
  student on every tensor leaf (within 1e-5 relative to max(1, max|leaf|));
* compile: ``gpdc.compile.compile_model`` (branches, checks, fold, ONNX export, onnxruntime check) in-process.

Each builder runs in its own process (memory, time limit). Writes bench/results/user_models.json.

    python bench/user_models.py [--only resnet8x4,vgg8] [--jobs 2] [--timeout 1800] [--resume]
    python bench/user_models.py --table      # the table from the results (--readme: into README.md)
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
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

from gpdc.outputs import describe

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "tests" / "user_models"
OUT = Path(__file__).resolve().parent / "results" / "user_models.json"
FILES = {"kd_cifar.py": 32, "torchvision_dense.py": 64}  # corpus file -> input size
CASES = [(1.5, "replicate"), (1.5, "grow")]
COMPILE_CASE = (1.5, "replicate")
MARKERS = ("<!-- user-models-table -->", "<!-- /user-models-table -->")


def builders() -> list[tuple[str, str]]:
    """(file, builder) for every public zero-argument function defined in the corpus files, in file order."""
    found = []
    for file in FILES:
        spec = importlib.util.spec_from_file_location(f"_user_models_{Path(file).stem}", MODELS / file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
        try:
            spec.loader.exec_module(module)
        finally:
            sys.modules.pop(spec.name, None)
        for name, fn in vars(module).items():
            if (inspect.isfunction(fn) and fn.__module__ == module.__name__ and not name.startswith("_")
                    and not inspect.signature(fn).parameters):
                found.append((file, name))
    return found


def max_rel_leaf_error(a, b) -> float:
    """Worst max|a - b| / max(1, max|a|) over the tensor leaves of two outputs of one structure (compared by
    description: a fresh build from the file has its own, equal, namedtuple / dataclass classes)."""
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    if describe(a) != describe(b) or len(la) != len(lb):
        raise AssertionError(f"outputs differ in structure: {describe(a)} vs {describe(b)}")
    worst = 0.0
    for u, v in zip(la, lb):
        if isinstance(u, torch.Tensor) and u.numel():
            worst = max(worst, float((u.double() - v.double()).abs().max()) / max(1.0, float(u.abs().max())))
    return worst


def sweep(file: str, name: str, row: dict) -> dict:
    import yaml

    import gpdc
    from gpdc.compile import compile_model
    from gpdc.exactness import check_expansion, randomize
    from gpdc.models import load_model

    path, size = MODELS / file, FILES[file]
    row.update(model=name, file=f"tests/user_models/{file}", input=size, stage="build")
    t_all = time.perf_counter()
    torch.manual_seed(0)
    model = randomize(load_model(str(path), name)).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        row["structure"] = describe(model(x))
    row["params"] = sum(p.numel() for p in model.parameters())
    worst, exp, same = 0.0, None, True
    for ratio, strategy in CASES:
        row["stage"] = f"expand r={ratio} {strategy}"
        t0 = time.perf_counter()
        exp = None
        exp = gpdc.expand(model, {"input_shape": [2, 3, size, size], "expand": {"ratio": ratio, "strategy": strategy}})
        with torch.no_grad():
            want = row["structure"]
            got = [describe(exp.teacher.eval()(x)), describe(exp.student.eval()(x))]
        same = same and all(g == want for g in got)
        if not all(g == want for g in got):
            row.setdefault("structure_differs", f"{strategy}: teacher {got[0]}, student {got[1]}")
        checks = check_expansion(exp, x)
        worst = max([worst] + [c["error"] / c["bound"] for c in checks.values()])
        row[f"exact_{strategy}"] = all(c["ok"] for c in checks.values())
        row[f"seconds_{strategy}"] = round(time.perf_counter() - t0, 2)
        row["groups"] = len(exp.groups)
        row["widened"] = sum(g.ratio > 1 for g in exp.groups)
        row["pinned"] = sum(g.pinned is not None for g in exp.groups)
    row.update(expand_exact=all(row[f"exact_{s}"] for _, s in CASES), worst_error_over_bound=worst,
               same_structure=same)
    # fold and compile each record their own failure and the sweep goes on
    row["stage"] = "fold"
    t0 = time.perf_counter()
    try:
        fresh = load_model(str(path), name)
        fresh.load_state_dict(exp.fold_state_dict(), strict=True)
        with torch.no_grad():
            fold_err = max_rel_leaf_error(exp.student.eval()(x), fresh.eval()(x))
        row.update(fold_exact=fold_err <= 1e-5, fold_rel_error=fold_err)
    except Exception as e:
        row.update(fold_exact=False, fold_error=f"{type(e).__name__}: {str(e).strip()[:400]}")
    row["seconds_fold"] = round(time.perf_counter() - t0, 2)
    del exp
    row["stage"] = "compile"
    t0 = time.perf_counter()
    ratio, strategy = COMPILE_CASE
    try:
        with tempfile.TemporaryDirectory() as tmp:
            spec_path = Path(tmp) / "spec.yaml"
            spec_path.write_text(yaml.safe_dump({"input_shape": [2, 3, size, size],
                                                 "expand": {"ratio": ratio, "strategy": strategy}}))
            report, _ = compile_model(str(path), str(spec_path), out=str(Path(tmp) / "out"), entry=name)
        row.update(compile_ok=bool(report["ok"]), onnx_equal=bool(report["onnx"]["ok"]),
                   onnx_max_abs=report["onnx"].get("max_abs"))
    except Exception as e:
        row.update(compile_ok=False, compile_error=f"{type(e).__name__}: {str(e).strip()[:400]}")
    row["seconds_compile"] = round(time.perf_counter() - t0, 2)
    row["stage"] = "done"
    row["seconds"] = round(time.perf_counter() - t_all, 1)
    row["pass"] = bool(row["expand_exact"] and row["same_structure"] and row["fold_exact"] and row["compile_ok"])
    return row


def worker(file: str, name: str, out: str) -> None:
    torch.set_num_threads(int(os.environ.get("GPDC_BENCH_THREADS", "2")))
    row: dict = {"model": name}
    t0 = time.perf_counter()
    try:
        sweep(file, name, row)
    except BaseException as e:  # recorded, not raised: one model's failure must not stop the sweep
        row.update({"pass": False, "error": f"{type(e).__name__}: {str(e).strip()[:600]}",
                    "trace": traceback.format_exc()[-1500:], "seconds": round(time.perf_counter() - t0, 1)})
    Path(out).write_text(json.dumps(row))


def run_one(file: str, name: str, timeout: int) -> dict:
    fd, tmp = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", f"{file}:{name}", "--result", tmp],
                              timeout=timeout, capture_output=True, text=True, cwd=ROOT)
        text = Path(tmp).read_text()
        if text:
            return json.loads(text)
        return {"model": name, "pass": False, "error": f"worker died (exit {proc.returncode}): {proc.stderr[-400:]}"}
    except subprocess.TimeoutExpired:
        return {"model": name, "pass": False, "error": f"over the {timeout} s limit",
                "seconds": round(time.perf_counter() - t0, 1)}
    finally:
        os.unlink(tmp)


def save(results: dict) -> None:
    from gpdc.atomic import atomic_write

    payload = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
               "command": "python bench/user_models.py", "cases": [f"r={r} {s}" for r, s in CASES],
               "compile": f"r={COMPILE_CASE[0]} {COMPILE_CASE[1]}", "models": results}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(OUT, lambda p: Path(p).write_text(json.dumps(payload, indent=1)))


def _yes(v) -> str:
    return "yes" if v else "NO"


def _why(error: str) -> str:
    return "fails: " + error.replace("|", "/").replace("\n", " ")[:110]


def _row(label: str, r: dict) -> str:
    """One table row; a failure is written into the column of the stage that failed."""
    cells = [label, f"`{r['structure']}`" if "structure" in r else "", f"{r['params'] / 1e6:.2f}M" if "params" in r else ""]
    cells.append(f"{r['widened']} / {r['pinned']} (of {r['groups']})" if "groups" in r else "")
    if "expand_exact" not in r:  # stopped before or while expanding
        cells += ["", _why(r["error"]) if "error" in r else f"stopped at {r.get('stage')}", "", ""]
    else:
        cells.append(_yes(r["same_structure"]))
        cells.append(f"{_yes(r['expand_exact'])} ({r['worst_error_over_bound']:.2f})")
        cells.append(_why(r["fold_error"]) if "fold_error" in r else _yes(r.get("fold_exact")))
        if "compile_error" in r:
            cells.append(_why(r["compile_error"]))
        elif "onnx_equal" in r:
            cells.append(_yes(r["onnx_equal"]) + ("" if r.get("compile_ok") else " (a compile check failed)"))
        else:
            cells.append(_why(r["error"]) if "error" in r else "")
    cells.append(f"{r['seconds']:.0f}" if "seconds" in r else "")
    return "| " + " | ".join(cells) + " |"


def table(results: dict) -> str:
    lines = ["| model | output | params | groups widened / pinned | same structure | expand exact (err/bound) | fold exact "
             "| ONNX equal | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    refs = builders()
    for file, name in refs:
        r = results.get(name)
        label = f"{Path(file).stem}:{name}"
        if r is None:
            lines.append(f"| {label} | | | | | not run in the recorded sweep | | | |")
        else:
            lines.append(_row(label, r))
    passed = sum(bool(results.get(n, {}).get("pass")) for _, n in refs)
    missing = sum(n not in results for _, n in refs)
    lines.append(f"\n{passed} of {len(refs)} pass" + (f" ({missing} not run)" if missing else ""))
    return "\n".join(lines)


def update_readme(results: dict) -> None:
    """Replace the README's user-models section (between the user-models-table markers) with the table."""
    from gpdc.atomic import atomic_write

    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = MARKERS
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} section to replace; add the two markers first.")
    body = f"{start}\n{table(results)}\n{end}"
    text = text[: text.index(start)] + body + text[text.index(end) + len(end):]
    atomic_write(readme, lambda p: Path(p).write_text(text))


def record(results: dict, name: str, row: dict) -> None:
    results[name] = row
    save(results)
    err = row.get("error", "")
    print(f"{name:32s} {str(row.get('pass')):>5s} {row.get('worst_error_over_bound', float('nan')):10.3g} "
          f"{row.get('widened', ''):>3} {row.get('pinned', ''):>3} {row.get('seconds', 0):8.1f} {err[:110]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated builder names")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--jobs", type=int, default=1, help="models run in parallel (one process each)")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    ap.add_argument("--resume", action="store_true", help="skip models already in the results")
    ap.add_argument("--worker")
    ap.add_argument("--result")
    args = ap.parse_args()
    if args.worker:
        file, name = args.worker.split(":", 1)
        return worker(file, name, args.result)
    results = json.loads(OUT.read_text())["models"] if OUT.exists() else {}
    if args.table or args.readme:
        update_readme(results) if args.readme else print(table(results))
        return
    refs = builders()
    if args.only:
        want = set(args.only.split(","))
        unknown = want - {n for _, n in refs}
        if unknown:
            raise SystemExit(f"unknown builders: {sorted(unknown)}; the corpus has {[n for _, n in refs]}")
        refs = [(f, n) for f, n in refs if n in want]
    if args.resume:
        refs = [(f, n) for f, n in refs if n not in results]
    print(f"{'model':32s} {'pass':>5s} {'err/bound':>10s} {'wid':>3s} {'pin':>3s} {'seconds':>8s}")
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on the worker processes
        for (file, name), row in zip(refs, pool.map(lambda fn: run_one(*fn, args.timeout), refs)):
            record(results, name, row)


if __name__ == "__main__":
    main()
