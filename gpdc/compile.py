"""The non-training pipeline behind ``gpdc compile``: expand → check → fold → export → check.

Writes ``teacher.safetensors``, ``student.safetensors``, ``student.onnx`` (unless ``onnx=False``: for a model
torch.onnx cannot export) and ``report.json`` to the output folder, together or not at all: into a staging folder
beside it that is swapped in at the end (:mod:`gpdc.outdir`; other files in the folder are kept). Bad input is detected before anything is
written; a failed or interrupted run leaves the previous outputs as they were.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from .branch_conv import merged_once
from .branch_plan import describe_plans, recorded_shapes
from .exactness import check_expansion, check_shape, max_rel_difference
from .expansion import expand
from .export import check_onnx, export_onnx
from .models import load_model
from .outdir import StagedDir
from .spec import load_spec


def prepare_out_dir(out: Path, staged: StagedDir) -> Path:
    """Check that ``out`` can be written; returns the staging folder the run writes into."""
    return staged.open(out)


def _tensors(sd: dict) -> dict:
    """The tensors of a state_dict as safetensors stores them: contiguous, and each storage once (a tied
    weight's second name gets a copy)."""
    out, seen = {}, set()
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            v = v.detach()
            storage = v.untyped_storage().data_ptr()
            out[k] = v.clone() if storage in seen else v.contiguous()
            seen.add(storage)
    return out


def compile_model(model_ref: str, spec_path: str, out: str | None = None, entry: str = "build_model",
                  on_stage: Callable[[str, float], None] = lambda name, s: None,
                  onnx: bool = True) -> tuple[dict, list[str]]:
    """Run the pipeline; returns (report, rewrite log). The report says pass/fail per check.

    While it runs, SIGINT raises KeyboardInterrupt and SIGTERM ``gpdc.outdir.Terminated``, so that the
    staging folder is removed whatever happens."""
    with StagedDir() as staged:
        return _compile(model_ref, spec_path, out, entry, on_stage, staged, onnx)


def _compile(model_ref: str, spec_path: str, out: str | None, entry: str, on_stage: Callable[[str, float], None],
             staged: StagedDir, onnx: bool) -> tuple[dict, list[str]]:
    timings: dict[str, float] = {}

    @contextmanager
    def stage(name):
        t = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - t
        on_stage(name, timings[name])

    spec = load_spec(spec_path)
    with stage("load"):
        model = load_model(model_ref, entry)
    stem = model_ref.split(":", 1)[1] if ":" in model_ref else Path(model_ref).stem
    out_dir = prepare_out_dir(Path(out) if out else Path("out") / stem, staged)  # the staging folder
    with stage("expand"):
        exp = expand(model, spec)
    torch.manual_seed(0)
    shape, shape_note = check_shape(exp)
    x = torch.randn(*shape)
    with merged_once():  # the parameters stay as they are: checks and fold merge each block once
        with stage("check_ir"), recorded_shapes(exp.teacher) as seen:
            ir = check_expansion(exp, x)
        with stage("fold"):
            folded_sd = exp.fold_state_dict()
            folded = exp.fold(state_dict=folded_sd)
            with torch.no_grad():
                a, b = exp.student.eval()(x), folded(x)
            fold_err, fold_leaf = max_rel_difference(a, b)
            fold = {"max_rel_error": fold_err, "ok": fold_err <= 1e-5, "leaf": fold_leaf}
    plans = describe_plans(seen)
    eq = None
    if onnx:
        with stage("export"), staged.writing("student.onnx"):
            onnx_path = out_dir / "student.onnx"
            export_onnx(folded, x, onnx_path)
        with stage("check_onnx"):
            torch.manual_seed(1)
            eq = check_onnx(onnx_path, folded, torch.randn(*shape))
    with stage("write"):
        staged.write("teacher.safetensors", lambda p: save_file(_tensors(exp.teacher.state_dict()), p))
        staged.write("student.safetensors", lambda p: save_file(_tensors(folded_sd), p))
    report = exp.report() | {
        "model": model_ref,
        "spec": spec.model_dump(),
        "ir": ir,
        "fold": fold,
        "branch_plans": plans,
        "onnx": eq.as_dict() if eq else None,
        "ok": all(c["ok"] for c in ir.values()) and fold["ok"] and (eq is None or eq.ok),
        "check_input_shape": shape,
        "notes": [n for n in (shape_note,) if n],
        "seconds": timings,
        "files": ["teacher.safetensors", "student.safetensors", *(["student.onnx"] if eq else []), "report.json"],
    }
    staged.write("report.json", lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    staged.commit()  # the files appear at once
    report["out"] = str(staged.shown)
    return report, exp.log + [_plan_line(name, p) for name, p in plans.items()]


def _plan_line(name: str, plan: dict) -> str:
    shape = "x".join(map(str, plan["input"][2:]))
    ways = ", ".join(f"{k} {plan['gflop'][k]} GFLOP + {plan['m_elements'][k]} M elements" for k in plan["gflop"])
    return (f"{name}: a GPD step at batch {plan['input'][0]} ({shape}) runs {plan['plan']} (its student conv "
            f"{plan['student_plan']}), merged from batch {plan['merged_from_batch']} ({ways})")
