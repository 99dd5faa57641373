"""ONNX export and the onnxruntime equivalence check, shared by the CLI and the tests.

``export_onnx`` writes an opset-17 file with a dynamic batch axis (to a temporary file, renamed into place) that
passes ``onnx.checker``'s full check and runs in onnxruntime; where the TorchScript exporter cannot express an op, or
writes a graph onnxruntime cannot run, the dynamo exporter's (opset 18); where neither can, an ``ExportError`` names
both reasons (the exporters' own printing is kept off the console). ``check_onnx`` runs it in onnxruntime on CPU
with graph optimisations off and on, and compares every output against PyTorch: max abs, max rel,
cosine, the worst output. The tolerance is relative to the output scale:
``max abs <= atol · max(1, max|ref|)`` and cosine >= 0.99999 (DESIGN.md §4).
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from .errors import GpdcError
from .outputs import tensor_leaves

OPSET = 17


class _TensorLeaves(nn.Module):
    """The model with its output flattened to a tuple of its tensor leaves (ONNX outputs are flat)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(v for _, v in tensor_leaves(self.model(x)))


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int = OPSET) -> Path:
    """Write ``model`` as ONNX, one output per tensor leaf of its output, named after the leaf's path."""
    path = Path(path)
    model = model.eval()
    with torch.no_grad():
        leaves = tensor_leaves(model(example))
    names = [p.onnx_name for p, _ in leaves]
    batch_axes = {n: {0: "batch"} for n, (_, v) in zip(names, leaves) if v.dim() and v.shape[0] == example.shape[0]}
    flat = _TensorLeaves(model).eval()  # the exporter restores the wrapper's mode, recursively, afterwards
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    failures = []
    try:
        for name, exporter in ((f"TorchScript exporter (opset {opset})", _torchscript),
                               (f"dynamo exporter (opset {max(opset, 18)})", _dynamo)):
            try:
                with _exporters_output(), warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")
                    exporter(flat, example, tmp, names, batch_axes, opset)
                onnx.checker.check_model(tmp, full_check=True)
                _session(Path(tmp), optimize=False).run(None, {"input": example.numpy()})
                break
            except Exception as e:  # torch.onnx, onnx and onnxruntime raise many types here
                failures.append(f"the {name}: {_reason(e)}")
        else:
            raise ExportError("torch.onnx cannot export the folded student, which has your model's architecture (so "
                              f"exporting your model fails the same way): {'; '.join(failures)}. The rewrite itself "
                              "is not involved: `--no-onnx` (gpdc compile, gpdc train) skips the export and keeps "
                              "every other output and check; an op the exporters lack can be given an ONNX "
                              "translation (torch.onnx's custom-op docs).")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _torchscript(flat, example, path, names, batch_axes, opset):
    """Fast, and the opset asked for."""
    torch.onnx.export(flat, (example,), path, opset_version=opset, dynamo=False, input_names=["input"],
                      output_names=names, dynamic_axes={"input": {0: "batch"}, **batch_axes})


def _dynamo(flat, example, path, names, batch_axes, opset):
    """Expresses more ops (adaptive pooling to a size that does not divide the input), at opset 18 at least."""
    torch.onnx.export(flat, (example,), path, opset_version=max(opset, 18), dynamo=True, input_names=["input"],
                      output_names=names, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False)


@contextmanager
def _exporters_output() -> Iterator[None]:
    """Drop what the exporters print — C++ included (the TorchScript exporter prints its whole IR graph when it
    fails): gpdc reports a failure in one paragraph."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no standard streams to quiet (a daemon's closed descriptors)
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1), os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)


def _reason(e: BaseException) -> str:
    """The innermost exception of the chain, type and last line (the dynamo exporter wraps the real reason)."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {(lines[-1] if lines else '')[:300]}"


class ExportError(GpdcError):
    """Neither ONNX exporter can export the model (an op they cannot translate), or onnxruntime cannot run it."""


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
    """Compare onnxruntime (optimisations off and on) with PyTorch on ``inputs``, every output leaf by name.

    An ONNX file whose inputs or outputs do not fit the model (another model's file) is bad input, not a
    numerical failure: ``OnnxMismatchError``."""
    with torch.no_grad():
        refs = {p.onnx_name: v.detach().double().numpy() for p, v in tensor_leaves(model.eval()(inputs))}
    rows = []
    for optimize in (False, True):
        outs = _run_onnx(Path(path), inputs, optimize)
        if len(outs) == len(refs) == 1:  # a single output: its name does not matter
            outs = {next(iter(refs)): next(iter(outs.values()))}
        if set(outs) != set(refs):
            raise OnnxMismatchError(f"the ONNX file {path} does not fit the model: its outputs are "
                                    f"{sorted(outs)}, the model's output leaves are {sorted(refs)}. Pass the ONNX "
                                    "file written for this model.")
        for name, r in refs.items():
            rows.append(_compare(outs[name].astype(np.float64), r, name, optimize, atol, rtol, min_cosine))
    return max(rows, key=lambda row: (not row.ok, row.max_abs / max(row.tolerance, 1e-30)))


class OnnxMismatchError(GpdcError):
    """The ONNX file's inputs or outputs do not fit the PyTorch model."""


def _run_onnx(path: Path, inputs: torch.Tensor, optimize: bool) -> dict[str, np.ndarray]:
    sess = _session(path, optimize)
    feeds = sess.get_inputs()
    if len(feeds) != 1:
        raise OnnxMismatchError(f"the ONNX file {path} takes {len(feeds)} inputs; gpdc models take one tensor.")
    try:
        outs = sess.run(None, {feeds[0].name: inputs.numpy()})
    except Exception as e:  # onnxruntime reports shape/type mismatches as several exception types
        raise OnnxMismatchError(f"onnxruntime cannot run {path} on an input of shape {tuple(inputs.shape)}: "
                                f"{str(e).strip().splitlines()[-1][:300]}. Is it the ONNX file of this model?") from None
    return {o.name: v for o, v in zip(sess.get_outputs(), outs)}


def _compare(o: np.ndarray, r: np.ndarray, name: str, optimize: bool, atol: float, rtol: float,
             min_cosine: float) -> Equivalence:
    setting = "ort optimisations " + ("on" if optimize else "off")
    if o.shape != r.shape:
        return Equivalence(False, float("inf"), float("inf"), 0.0, 0.0, 0.0, name, f"{setting}: shape {o.shape} != {r.shape}")
    if not r.size:
        return Equivalence(True, 0.0, 0.0, 1.0, 0.0, atol, name, setting)
    diff = np.abs(o - r)
    scale = float(np.abs(r).max())
    cos = float((o.ravel() @ r.ravel()) / (np.linalg.norm(o) * np.linalg.norm(r) + 1e-30))
    if not np.linalg.norm(r) and not np.linalg.norm(o):
        cos = 1.0  # two all-zero outputs are equal
    max_rel = float((diff / np.maximum(np.abs(r), 1e-6 * max(1.0, scale))).max())
    tol = atol * max(1.0, scale) + rtol * scale
    ok = bool(diff.max() <= tol and cos >= min_cosine)
    return Equivalence(ok, float(diff.max()), max_rel, cos, scale, tol, name, setting)
