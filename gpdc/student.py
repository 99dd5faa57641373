"""The shared student: the original architecture run on parameters read out of the teacher.

It owns no weights (hard parameter sharing, METHOD.md §1): every forward reads its parameters
through the ParamMap from the teacher's *current* tensors with ``torch.func.functional_call``, so
gradients of a student loss accumulate in the teacher's parameters. It keeps its own buffers
(BatchNorm running statistics), because it sees different activations than the teacher once
training starts.
"""

from __future__ import annotations

import copy
import functools
import warnings
from contextlib import contextmanager

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call

from .param_map import ParamMap


class SharedStudent(nn.Module):
    def __init__(self, student: fx.GraphModule, teacher: nn.Module, param_map: ParamMap):
        super().__init__()
        net = copy.deepcopy(student)
        for module in net.modules():
            for name in [k for k, v in module._parameters.items() if v is not None]:
                del module._parameters[name]
        self.net = net
        self.param_map = param_map
        self._teacher = (teacher,)  # a tuple, so the teacher is not registered as a submodule
        self.balanced_grad = False  # see ParamMap / METHOD.md §4: 'paper' (False) or 'balanced' (True)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def shared_parameters(self) -> dict:
        """The student's parameters, computed from the teacher's current ones (differentiable)."""
        return self.param_map.read_all(dict(self.teacher.named_parameters()), self.balanced_grad)

    @contextmanager
    def inside_gpd(self):
        """Calls made by ``gpdc.GPD``, whose one backward DDP sees whole."""
        self._in_gpd = True
        try:
            yield
        finally:
            self._in_gpd = False

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled() and not getattr(self, "_in_gpd", False) and _distributed():
            _warn_outside_gpd()
        return functional_call(self.net, self.shared_parameters(), args, kwargs, strict=False)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


@functools.cache
def _warn_outside_gpd() -> None:
    warnings.warn("the shared student is trained in a distributed run outside gpdc.GPD: its gradients reach the "
                  "teacher's parameters outside DistributedDataParallel's forward, are never all-reduced, and the "
                  "ranks drift apart. Wrap gpdc.GPD(expansion) in DistributedDataParallel and backward its .loss "
                  "instead (README, 'Your own loop').", UserWarning, stacklevel=3)
