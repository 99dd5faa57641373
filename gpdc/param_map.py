"""The ParamMap: how every student parameter is read out of the teacher's parameters.

For each student parameter: the teacher tensor, an index set per dim and a per-index scale per
dim. Reading it is the CBR channel extraction (METHOD.md §2, last paragraph); it is differentiable,
so a loss on the student sends gradients into the shared teacher tensors. It is the single source
of truth for the shared student, for fold and for checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary


_RUNS = WeakIdKeyDictionary()  # index tensor -> (start, length) when it is consecutive channels, else False


def take(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """``t.index_select(dim, idx)``; a ``narrow`` view when ``idx`` is a run of consecutive channels (the student's
    channels are mostly the teacher's first ones), whose backward copies into place instead of scatter-adding — the
    scatter along a kernel's input dim is a strided loop (ms per call at 1024 channels on CPU)."""
    run = _RUNS.get(idx)
    if run is None:
        n = idx.numel()
        start = int(idx[0]) if n else 0
        consecutive = n > 0 and bool(torch.equal(idx, torch.arange(start, start + n, device=idx.device, dtype=idx.dtype)))
        run = _RUNS[idx] = (start, n) if consecutive else False
    return t.narrow(dim, *run) if run else t.index_select(dim, idx)


class _BalancedScale(torch.autograd.Function):
    """Forward ``t * s``; backward ``grad / s``: the shared slice gets a plain step in student
    coordinates instead of the IR multiplicity's m² (METHOD.md §4, 'balanced')."""

    @staticmethod
    def forward(ctx, t, s):
        ctx.save_for_backward(s)
        return t * s

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        return grad / s, None


@dataclass
class ParamSource:
    teacher: str
    index: dict[int, torch.Tensor] = field(default_factory=dict)
    scale: dict[int, torch.Tensor] = field(default_factory=dict)

    def index_on(self, device: torch.device) -> dict[int, torch.Tensor]:
        for d, idx in self.index.items():
            if idx.device != device:
                self.index[d] = idx.to(device)
        return self.index

    def select(self, t: torch.Tensor) -> torch.Tensor:
        for d, idx in self.index_on(t.device).items():
            t = take(t, d, idx)
        return t

    def rescale_channels(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Activation ``t`` [N, C, ...] times this kernel's scale on its dim ``dim`` (0: the output channels it makes,
        1: the input channels it reads): the scale moved off the kernel onto the (smaller) tensor it multiplies."""
        s = self.scale.get(dim)
        if s is None:
            return t
        return t * s.to(device=t.device, dtype=t.dtype).view(1, -1, *([1] * (t.dim() - 2)))

    def rescale(self, t: torch.Tensor, balanced: bool = False, dims=None) -> torch.Tensor:
        """``t`` times the scale of each dim (of ``dims`` only, when given)."""
        for d, s in self.scale.items():
            if dims is not None and d not in dims:
                continue
            if s.device != t.device or s.dtype != t.dtype:
                self.scale[d] = s = s.to(device=t.device, dtype=t.dtype)
            shape = [1] * t.dim()
            shape[d] = -1
            t = _BalancedScale.apply(t, s.view(shape)) if balanced else t * s.view(shape)
        return t


class ParamMap:
    """Student parameter name -> ParamSource; ``derived`` teacher tensors (e.g. a CBR block's merged
    kernel) are computed from the teacher's parameters before they are indexed — only the selected part of
    one when it has a ``select(teacher_params, index)``."""

    def __init__(self):
        self.sources: dict[str, ParamSource] = {}
        self.derived: dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]] = {}

    def add(self, student_name: str, teacher_name: str, index=None, scale=None) -> None:
        def tensors(d, dtype):
            out = {}
            for k, v in (d or {}).items():
                v = np.asarray(v)
                if dtype is not torch.int64 and np.all(v == 1):
                    continue
                out[k] = torch.as_tensor(v, dtype=dtype)
            return out

        self.sources[student_name] = ParamSource(teacher_name, tensors(index, torch.int64), tensors(scale, torch.float32))

    def derive(self, teacher_name: str, fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> None:
        self.derived[teacher_name] = fn

    def _selected(self, src: ParamSource, teacher_params: dict[str, torch.Tensor], cache: dict) -> torch.Tensor:
        derived = self.derived.get(src.teacher)
        if derived is None:
            return src.select(teacher_params[src.teacher])
        if hasattr(derived, "select"):
            return derived.select(teacher_params, src.index)
        if src.teacher not in cache:
            cache[src.teacher] = derived(teacher_params)
        return src.select(cache[src.teacher])

    def read(self, name: str, teacher_params: dict[str, torch.Tensor]) -> torch.Tensor:
        src = self.sources[name]
        return src.rescale(self._selected(src, teacher_params, {}))

    def read_all(self, teacher_params: dict[str, torch.Tensor], balanced: bool = False,
                 skip: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
        cache: dict = {}
        return {name: src.rescale(self._selected(src, teacher_params, cache), balanced)
                for name, src in self.sources.items() if name not in skip}

    def __len__(self) -> int:
        return len(self.sources)
