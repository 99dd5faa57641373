"""ONNX export and the onnxruntime equivalence check, shared by the CLI and the tests.

``export_onnx`` writes an opset-17 file (18 through the dynamo exporter when the TorchScript exporter
cannot express an op) with a dynamic batch axis (to a temporary file, renamed into
place) and runs ``onnx.checker`` with the full check. ``check_onnx`` runs it in onnxruntime on CPU
with graph optimisations off and on, and compares every output against PyTorch: max abs, max rel,
cosine, the worst output. The tolerance is relative to the output scale:
``max abs <= atol · max(1, max|ref|)`` and cosine >= 0.99999 (DESIGN.md §4).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

OPSET = 17


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int = OPSET) -> Path:
    path = Path(path)
    model = model.eval()
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:  # the TorchScript exporter: fast, and opset 17 exactly
                torch.onnx.export(model, (example,), tmp, opset_version=opset, dynamo=False,
                                  input_names=["input"], output_names=["output"],
                                  dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
            except Exception:  # ops it cannot express (e.g. adaptive pooling to a non-divisor size)
                batch = torch.export.Dim("batch", min=1)
                torch.onnx.export(model, (example,), tmp, opset_version=max(opset, 18), dynamo=True,
                                  input_names=["input"], output_names=["output"],
                                  dynamic_shapes=({0: batch},), verbose=False)
        onnx.checker.check_model(tmp, full_check=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@dataclass
class Equivalence:
    ok: bool
    max_abs: float
    max_rel: float
    cosine: float
    scale: float
    tolerance: float
    worst_output: str
    worst_setting: str

    def as_dict(self) -> dict:
        return asdict(self)


def _session(path: Path, optimize: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check_onnx(path: str | Path, model: nn.Module, inputs: torch.Tensor, atol: float = 1e-4, rtol: float = 0.0,
               min_cosine: float = 0.99999) -> Equivalence:
    """Compare onnxruntime (optimisations off and on) with PyTorch on ``inputs``."""
    with torch.no_grad():
        ref = model.eval()(inputs)
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    refs = [r.detach().double().numpy() for r in refs]
    worst = None
    for optimize in (False, True):
        sess = _session(Path(path), optimize)
        outs = sess.run(None, {sess.get_inputs()[0].name: inputs.numpy()})
        names = [o.name for o in sess.get_outputs()]
        for name, r, o in zip(names, refs, outs):
            o = o.astype(np.float64)
            if o.shape != r.shape:
                return Equivalence(False, float("inf"), float("inf"), 0.0, 0.0, 0.0, name, f"shape {o.shape} != {r.shape}")
            diff = np.abs(o - r)
            scale = float(np.abs(r).max()) if r.size else 0.0
            cos = float((o.ravel() @ r.ravel()) / (np.linalg.norm(o) * np.linalg.norm(r) + 1e-30)) if r.size else 1.0
            max_rel = float((diff / np.maximum(np.abs(r), 1e-6 * max(1.0, scale))).max()) if r.size else 0.0
            tol = atol * max(1.0, scale) + rtol * scale
            row = Equivalence(bool(diff.max() <= tol and cos >= min_cosine), float(diff.max()), max_rel, cos, scale, tol,
                              name, "ort optimisations " + ("on" if optimize else "off"))
            if worst is None or (row.max_abs / max(row.tolerance, 1e-30)) > (worst.max_abs / max(worst.tolerance, 1e-30)) \
                    or not row.ok and worst.ok:
                worst = row
    all_ok = worst.ok
    return Equivalence(all_ok, worst.max_abs, worst.max_rel, worst.cosine, worst.scale, worst.tolerance,
                       worst.worst_output, worst.worst_setting)
