"""The non-training pipeline behind ``gpdc compile``: expand → check → fold → export → check.

Writes ``teacher.safetensors``, ``student.safetensors``, ``student.onnx`` and ``report.json`` to the
output folder, each through a temporary file renamed into place; bad input is detected before
anything is written.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from .atomic import atomic_write
from .errors import GpdcError
from .exactness import check_expansion
from .expansion import expand
from .export import check_onnx, export_onnx
from .models import load_model
from .spec import load_spec


def prepare_out_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise GpdcError(f"cannot write to the output folder {out} ({e.strerror}); pass a writable folder with --out.") from None
    return out


def _tensors(sd: dict) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def compile_model(model_ref: str, spec_path: str, out: str | None = None, entry: str = "build_model",
                  on_stage: Callable[[str, float], None] = lambda name, s: None) -> tuple[dict, list[str]]:
    """Run the pipeline; returns (report, rewrite log). The report says pass/fail per check."""
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
    out_dir = prepare_out_dir(Path(out) if out else Path("out") / stem)
    with stage("expand"):
        exp = expand(model, spec)
    torch.manual_seed(0)
    x = torch.randn(*spec.input_shape)
    with stage("check_ir"):
        ir = check_expansion(exp, x)
    with stage("fold"):
        folded_sd = exp.fold_state_dict()
        folded = exp.fold(state_dict=folded_sd)
        with torch.no_grad():
            a, b = exp.student.eval()(x), folded(x)
        fold_err = float((a - b).abs().max() / max(1.0, float(a.abs().max())))
        fold = {"max_rel_error": fold_err, "ok": fold_err <= 1e-5}
    with stage("export"):
        onnx_path = out_dir / "student.onnx"
        export_onnx(folded, x, onnx_path)
    with stage("check_onnx"):
        torch.manual_seed(1)
        eq = check_onnx(onnx_path, folded, torch.randn(*spec.input_shape))
    with stage("write"):
        atomic_write(out_dir / "teacher.safetensors", lambda p: save_file(_tensors(exp.teacher.state_dict()), p))
        atomic_write(out_dir / "student.safetensors", lambda p: save_file(_tensors(folded_sd), p))
    report = exp.report() | {
        "model": model_ref,
        "spec": spec.model_dump(),
        "ir": ir,
        "fold": fold,
        "onnx": eq.as_dict(),
        "ok": all(c["ok"] for c in ir.values()) and fold["ok"] and eq.ok,
        "seconds": timings,
        "files": ["teacher.safetensors", "student.safetensors", "student.onnx", "report.json"],
    }
    atomic_write(out_dir / "report.json", lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    report["out"] = str(out_dir)
    return report, exp.log
