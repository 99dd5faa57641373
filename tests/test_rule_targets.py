"""Every registered target has a case: each module, function and method that has a channel rule (but the
torchvision/timm integrations, which ``test_rule_registry.py`` covers) is applied to widened channels in a small
model, and the teacher and shared student must be exact at r = 1.5 under both strategies (DESIGN.md §4 bounds).

The model reads the op's output through a fixed random weighting summed per sample, so every channel and position
of it counts (a permutation or a wrong copy would show) while nothing pins the channels."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpdc
from gpdc.exactness import check_expansion, randomize
from gpdc.rules import registry
from gpdc.rules.integrations import INTEGRATIONS

SHAPE = [2, 3, 8, 8]


def _unary(fn):
    return lambda x: fn(x)


# ops that need arguments, or that take two tensors: target -> op on the [2, 8, 8, 8] activation x
FUNCTIONS = {
    operator.add: lambda x: x + x.flip(2), operator.iadd: lambda x: operator.iadd(x.clone(), x.flip(3)),
    operator.sub: lambda x: x - x.flip(2), operator.isub: lambda x: operator.isub(x.clone(), x.flip(3)),
    operator.mul: lambda x: x * x.flip(2), operator.imul: lambda x: operator.imul(x.clone(), 2.0),
    operator.truediv: lambda x: x / (x.abs() + 1), operator.itruediv: lambda x: operator.itruediv(x.clone(), 3.0),
    operator.neg: lambda x: -x, operator.getitem: lambda x: x[:, :, 1:, :],
    operator.matmul: lambda x: x @ x.transpose(-2, -1),
    torch.matmul: lambda x: torch.matmul(x, x.transpose(-2, -1)), torch.bmm: lambda x: torch.bmm(
        x.flatten(0, 1), x.flatten(0, 1).transpose(1, 2)).view(x.shape),
    torch.add: lambda x: torch.add(x, 1.0), torch.sub: lambda x: torch.sub(x, x.flip(3)),
    torch.mul: lambda x: torch.mul(x, x), torch.div: lambda x: torch.div(x, 2.0),
    torch.addcmul: lambda x: torch.addcmul(x, x, x.flip(2), value=0.5),
    torch.maximum: lambda x: torch.maximum(x, x.flip(2)), torch.minimum: lambda x: torch.minimum(x, x.flip(2)),
    torch.clamp: lambda x: torch.clamp(x, -0.5, 0.5), torch.clip: lambda x: torch.clip(x, min=-0.5),
    torch.sqrt: lambda x: torch.sqrt(x.abs()), torch.cat: lambda x: torch.cat([x, x.flip(2)], 2),
    torch.concat: lambda x: torch.concat([x, x.flip(3)], 3), torch.chunk: lambda x: torch.chunk(x, 2, 2)[1],
    torch.split: lambda x: torch.split(x, [3, 5], 2)[0], torch.narrow: lambda x: torch.narrow(x, 3, 1, 4),
    torch.flatten: lambda x: torch.flatten(x, 2), torch.reshape: lambda x: torch.reshape(x, (2, 8, 64)),
    torch.permute: lambda x: torch.permute(x, (0, 2, 3, 1)), torch.transpose: lambda x: torch.transpose(x, 1, 3),
    torch.swapaxes: lambda x: torch.swapaxes(x, 1, 2), torch.movedim: lambda x: torch.movedim(x, 1, -1),
    torch.squeeze: lambda x: torch.squeeze(x[:, :, :1], 2), torch.unsqueeze: lambda x: torch.unsqueeze(x, 2),
    torch.unbind: lambda x: torch.unbind(x, 2)[3], torch.mean: lambda x: torch.mean(x, (2, 3)),
    torch.sum: lambda x: torch.sum(x, 1, keepdim=True), torch.norm: lambda x: torch.norm(x, dim=(2, 3)),
    torch.broadcast_to: lambda x: x * torch.broadcast_to(x.mean((2, 3), keepdim=True), x.size()),
    torch.roll: lambda x: torch.roll(x, (1, 2), (2, 3)), F.pad: lambda x: F.pad(x, (1, 0, 0, 1)),
    F.interpolate: lambda x: F.interpolate(x, scale_factor=2.0), F.max_pool1d: lambda x: F.max_pool1d(x.flatten(2), 2),
    F.max_pool2d: lambda x: F.max_pool2d(x, 2), F.max_pool3d: lambda x: F.max_pool3d(x.unsqueeze(2), (1, 2, 2)),
    F.avg_pool2d: lambda x: F.avg_pool2d(x, 2), F.avg_pool3d: lambda x: F.avg_pool3d(x.unsqueeze(2), (1, 2, 2)),
    torch.avg_pool1d: lambda x: torch.avg_pool1d(x.flatten(2), 2),
    torch.adaptive_avg_pool1d: lambda x: torch.adaptive_avg_pool1d(x.flatten(2), 4),
    F.adaptive_avg_pool2d: lambda x: F.adaptive_avg_pool2d(x, 2),
    F.adaptive_avg_pool3d: lambda x: F.adaptive_avg_pool3d(x.unsqueeze(2), (1, 2, 2)),
    F.adaptive_max_pool1d: lambda x: F.adaptive_max_pool1d(x.flatten(2), 4),
    F.adaptive_max_pool2d: lambda x: F.adaptive_max_pool2d(x, 2),
    F.adaptive_max_pool3d: lambda x: F.adaptive_max_pool3d(x.unsqueeze(2), (1, 2, 2)),
    F.dropout: lambda x: F.dropout(x, training=False), F.dropout1d: lambda x: F.dropout1d(x.flatten(2), training=False),
    F.dropout2d: lambda x: F.dropout2d(x, training=False),
    F.dropout3d: lambda x: F.dropout3d(x.unsqueeze(2), training=False), F.leaky_relu: lambda x: F.leaky_relu(x, 0.2), F.hardtanh: lambda x: F.hardtanh(x, -0.5, 0.5),
    F.scaled_dot_product_attention: lambda x: F.scaled_dot_product_attention(*(x.flatten(2).transpose(1, 2),) * 3),
    F.group_norm: lambda x: F.group_norm(x, 2), F.layer_norm: lambda x: F.layer_norm(x.transpose(1, 3), (8,)),
    F.linear: lambda x: F.linear(x.transpose(1, 3), torch.ones(4, 8) / 8),
    F.conv1d: lambda x: F.conv1d(x.flatten(2), torch.ones(4, 8, 1) / 8),
    F.conv2d: lambda x: F.conv2d(x, torch.ones(4, 8, 1, 1) / 8),
    F.conv3d: lambda x: F.conv3d(x.unsqueeze(2), torch.ones(4, 8, 1, 1, 1) / 8),
}
METHODS = {
    "__matmul__": lambda x: x.__matmul__(x.transpose(2, 3)), "add": lambda x: x.add(x.flip(2)),
    "add_": lambda x: x.clone().add_(1.0), "sub": lambda x: x.sub(x.flip(3)), "sub_": lambda x: x.clone().sub_(1.0),
    "mul": lambda x: x.mul(x), "mul_": lambda x: x.clone().mul_(2.0), "div": lambda x: x.div(2.0),
    "div_": lambda x: x.clone().div_(2.0), "clamp": lambda x: x.clamp(-0.5, 0.5),
    "clamp_": lambda x: x.clone().clamp_(min=0.0), "clip": lambda x: x.clip(max=0.5),
    "maximum": lambda x: x.maximum(x.flip(2)), "minimum": lambda x: x.minimum(x.flip(3)),
    "bmm": lambda x: x.flatten(0, 1).bmm(x.flatten(0, 1).transpose(1, 2)).view(x.shape),
    "matmul": lambda x: x.matmul(x.transpose(2, 3)), "chunk": lambda x: x.chunk(2, 3)[0],
    "split": lambda x: x.split(4, 2)[1], "narrow": lambda x: x.narrow(2, 2, 3), "flatten": lambda x: x.flatten(2),
    "movedim": lambda x: x.movedim(1, 3), "permute": lambda x: x.permute(0, 3, 1, 2),
    "reshape": lambda x: x.reshape(2, 8, 4, 16), "view": lambda x: x.view(2, 8, 64),
    "squeeze": lambda x: x[:, :, :1].squeeze(2), "unsqueeze": lambda x: x.unsqueeze(-1),
    "swapaxes": lambda x: x.swapaxes(2, 3), "transpose": lambda x: x.transpose(1, 2),
    "unbind": lambda x: x.unbind(3)[2], "unflatten": lambda x: x.unflatten(2, (2, 4)),
    "mean": lambda x: x.mean(1, keepdim=True), "sum": lambda x: x.sum((2, 3)), "norm": lambda x: x.norm(dim=2),
    "to": lambda x: x.to(torch.float32), "type_as": lambda x: x.type_as(x), "sqrt": lambda x: x.abs().sqrt(),
    "expand": lambda x: x * x.square().mean((2, 3), keepdim=True).expand(x.shape),
    "expand_as": lambda x: x / (x.abs().mean((2, 3), keepdim=True) + 1).expand_as(x),
}
def _flat(x):
    return x.flatten(2)


def _depth(x):
    return x.unsqueeze(2)


def _last(x):
    return x.transpose(1, 3)


class _SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)
        return self.attn(t, t, t, need_weights=False)[0]


# modules that need arguments or another input layout: class -> (constructor args, what the module reads)
MODULES = {
    nn.Conv1d: ((8, 4, 3), _flat), nn.Conv2d: ((8, 4, 3), None), nn.Conv3d: ((8, 4, 1), _depth),
    nn.ConvTranspose1d: ((8, 4, 2), _flat), nn.ConvTranspose2d: ((8, 4, 2), None),
    nn.ConvTranspose3d: ((8, 4, 1), _depth), nn.Linear: ((8, 4), _last),
    nn.BatchNorm1d: ((8,), _flat), nn.BatchNorm2d: ((8,), None), nn.BatchNorm3d: ((8,), _depth),
    nn.Dropout1d: ((), _flat), nn.Dropout3d: ((), _depth), nn.LayerNorm: ((8,), _last), nn.GroupNorm: ((4, 8), None), nn.Flatten: ((2,), None),
    nn.Unflatten: ((3, (2, 4)), None), nn.ChannelShuffle: ((2,), None), nn.Threshold: ((0.1, 0.0), None),
    nn.Upsample: ((None, 2.0), None), nn.UpsamplingBilinear2d: ((None, 2.0), None),
    nn.UpsamplingNearest2d: ((None, 2.0), None), nn.ZeroPad2d: ((1,), None), nn.ConstantPad2d: ((1, 0.5), None),
    nn.ReflectionPad2d: ((1,), None), nn.ReplicationPad2d: ((1,), None), nn.MaxPool1d: ((2,), _flat),
    nn.AvgPool1d: ((2,), _flat), nn.MaxPool2d: ((2,), None), nn.AvgPool2d: ((2,), None),
    nn.MaxPool3d: (((1, 2, 2),), _depth), nn.AvgPool3d: (((1, 2, 2),), _depth),
    nn.AdaptiveAvgPool1d: ((4,), _flat), nn.AdaptiveMaxPool1d: ((4,), _flat), nn.AdaptiveAvgPool2d: ((2,), None),
    nn.AdaptiveMaxPool2d: ((2,), None), nn.AdaptiveAvgPool3d: (((1, 2, 2),), _depth),
    nn.AdaptiveMaxPool3d: (((1, 2, 2),), _depth),
}


class Probe(nn.Module):
    """stem conv (3 -> 8) -> op -> a fixed random weighting of every output entry, summed per sample."""

    def __init__(self, fn=None, module: nn.Module | None = None, reads=None):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fn, self.op, self.reads = fn, module, reads
        with torch.no_grad():
            y = self._op(self.stem(torch.randn(*SHAPE)))
        self.register_buffer("w", torch.randn(y.shape[1:]))

    def _op(self, x):
        if self.op is None:
            return self.fn(x)
        return self.op(x if self.reads is None else self.reads(x))

    def forward(self, x):
        y = self._op(self.stem(x))
        return (y * self.w).flatten(1).sum(1, keepdim=True)


def _cases() -> dict:
    """A case per registered target but the integrations' own: id -> model factory."""
    integration = {id(e.resolve()) for e in INTEGRATIONS if e.installed}
    cases = {}
    for target in registry._FUNCTION_RULES:
        if id(target) not in integration:
            fn = FUNCTIONS.get(target, _unary(target))
            cases[f"function:{registry.qualified_name(target)}"] = lambda fn=fn: Probe(fn)
    for name in registry._METHOD_RULES:
        fn = METHODS.get(name, lambda x, name=name: getattr(x, name)())
        cases[f"method:{name}"] = lambda fn=fn: Probe(fn)
    for cls in registry._MODULE_RULES:
        if id(cls) in integration or cls is nn.SyncBatchNorm:  # SyncBatchNorm: BatchNorm's rule, needs a process group
            continue
        if cls is nn.MultiheadAttention:
            cases["module:MultiheadAttention"] = lambda: Probe(module=_SelfAttention())
            continue
        args, reads = MODULES.get(cls, ((), None))
        cases[f"module:{cls.__name__}"] = lambda cls=cls, args=args, reads=reads: Probe(module=cls(*args), reads=reads)
    return cases


CASES = _cases()


def test_every_registered_target_has_a_case():
    """Each case builds; the registries hold no target without one (a new target needs its entry above only if
    it takes arguments)."""
    integration = {id(e.resolve()) for e in INTEGRATIONS if e.installed}
    targets = [k for table in (registry._FUNCTION_RULES, registry._METHOD_RULES, registry._MODULE_RULES)
               for k in table if id(k) not in integration]
    assert len(CASES) == len(targets) - 1  # all but SyncBatchNorm
    for case in CASES.values():
        case()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["replicate", "grow"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_registered_target_is_exact(case, strategy):
    model = randomize(CASES[case]().eval())
    exp = gpdc.expand(model, {"input_shape": SHAPE, "expand": {"ratio": 1.5, "strategy": strategy}})
    assert exp.teacher.get_submodule("stem").out_channels == 12, exp.report()["groups"]
    checks = check_expansion(exp, torch.randn(*SHAPE))
    assert all(c["ok"] for c in checks.values()), checks
