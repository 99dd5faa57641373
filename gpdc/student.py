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

from .branch_conv import MergedKernel, SharedBranchConv
from .param_map import ParamMap


class SharedStudent(nn.Module):
    def __init__(self, student: fx.GraphModule, teacher: nn.Module, param_map: ParamMap):
        super().__init__()
        weightless = {id(p): nn.Parameter(p.detach().to("meta")) for p in student.parameters()}
        net = copy.deepcopy(student, weightless)  # the structure, without copying the weights
        for module in net.modules():
            for name in [k for k, v in module._parameters.items() if v is not None]:
                del module._parameters[name]
        self.net = net
        self.param_map = param_map
        self._teacher = (teacher,)  # a tuple, so the teacher is not registered as a submodule
        self._in_forward = _read_in_forward(net, teacher, param_map)  # parameters its convs read themselves
        self._runners: dict = {}  # feature-tap code -> _Tapped
        self.balanced_grad = False  # see ParamMap / METHOD.md §4: 'paper' (False) or 'balanced' (True)

    @property
    def balanced_grad(self) -> bool:
        return self._balanced

    @balanced_grad.setter
    def balanced_grad(self, value: bool) -> None:
        self._balanced = value
        for module in self.net.modules():
            if isinstance(module, SharedBranchConv):
                module.balanced = value

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
        return functional_call(self.net, self._params(), args, kwargs, strict=False)

    def features(self, taps, *args):
        """``(output, [features])``: the student's forward with feature taps (``Expansion.feature_taps``)."""
        runner = self._runners.get(taps.code)
        if runner is None:  # one per taps, so torch.compile sees the same module every step
            runner = self._runners[taps.code] = _Tapped(self.net, taps.code)
        return functional_call(runner, {f"net.{k}": v for k, v in self._params().items()}, args, strict=False)

    def _params(self) -> dict[str, torch.Tensor]:
        return self.param_map.read_all(dict(self.teacher.named_parameters()), self.balanced_grad, skip=self._in_forward)


class _Tapped(nn.Module):
    """``net`` run by other code of its graph (one with feature outputs); not registered anywhere, so nothing of
    ``net`` appears twice in a state_dict."""

    def __init__(self, net: nn.Module, code):
        super().__init__()
        self.net, self.code = net, code

    def forward(self, *args):
        return self.code(self.net, *args)


def _read_in_forward(net: fx.GraphModule, teacher: nn.Module, param_map: ParamMap) -> frozenset[str]:
    """Make each conv of ``net`` that reads a teacher branch block's merged kernel a ``SharedBranchConv`` (it picks
    per call how to compute with the slice); returns the names of the kernels those convs now read themselves."""
    names = set()
    for name, src in param_map.sources.items():
        kernel = param_map.derived.get(src.teacher)
        if isinstance(kernel, MergedKernel):
            conv_name, _, leaf = name.rpartition(".")
            parent, _, child = conv_name.rpartition(".")
            conv = net.get_submodule(conv_name)
            if leaf == "weight" and type(conv) is nn.Conv2d:
                shared = SharedBranchConv(conv, teacher.get_submodule(kernel.module), src)
                (net.get_submodule(parent) if parent else net).add_module(child, shared)
                names.add(name)
    return frozenset(names)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


@functools.cache
def _warn_outside_gpd() -> None:
    warnings.warn("the shared student is trained in a distributed run outside gpdc.GPD: its gradients reach the "
                  "teacher's parameters outside DistributedDataParallel's forward, are never all-reduced, and the "
                  "ranks drift apart. Wrap gpdc.GPD(expansion) in DistributedDataParallel and backward its .loss "
                  "instead (README, 'Your own loop').", UserWarning, stacklevel=3)
