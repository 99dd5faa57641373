"""Golden tests, one per rule family: a small model whose expansion fires the rule (its facts are on the node and
the analysis chose that rule), the widths it gives, exactness of teacher and shared student (both strategies,
DESIGN.md §4 bounds), the folded student equal to the shared one, and a valid ONNX export equal to PyTorch.
``test_every_rule_has_a_golden_case`` turns red when a rule class is registered without a case here (the
torchvision/timm integrations have theirs in ``test_rule_registry.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpdc
from gpdc.analyze import ChannelAnalysis
from gpdc.exactness import check_expansion, max_rel_difference, randomize
from gpdc.export import check_onnx, export_onnx
from gpdc.rules import attention, contraction, elementwise, functional, movement, norm, params, probe, producers
from gpdc.rules import registry, student_width
from gpdc.rules.context import FACTS
from gpdc.rules.integrations import INTEGRATIONS

SHAPE = [2, 3, 8, 8]


class Block(nn.Module):
    """stem conv (3 -> 8) -> op -> conv (8 -> 8) -> mean -> linear: the op sees and feeds widened channels."""

    def __init__(self, op):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.op = op
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.conv(self.op(self.stem(x))).mean((2, 3)))


class Lambda(nn.Module):
    """An op written in forward (traced through), with the modules it uses."""

    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for k, m in modules.items():
            self.add_module(k, m)

    def forward(self, x):
        return self.fn(self, x)


class Heads(nn.Module):
    """Inline attention over the spatial tokens: 2 heads of 4, written with reshape/permute and ``matmul`` or SDPA."""

    def __init__(self, sdpa: bool):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.sdpa = sdpa

    def forward(self, x):
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).reshape(B, H * W, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1) @ v
        o = self.proj(o.transpose(1, 2).reshape(B, H * W, C))
        return (t + o).transpose(1, 2).reshape(B, C, H, W)


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)
        return (t + self.attn(t, t, t, need_weights=False)[0]).transpose(1, 2).reshape(B, C, H, W)


def _std_conv():
    from timm.layers import StdConv2d

    return StdConv2d(8, 8, 3, padding=1)


# rule class -> (the op inside Block, facts types it records)
GOLDEN = {
    producers.DenseRule: (lambda: nn.Conv2d(8, 8, 1), {producers.Dense}),
    producers.TransposedConvRule: (lambda: nn.ConvTranspose2d(8, 8, 3, padding=1), {producers.Dense}),
    producers.StdConvRule: (_std_conv, {producers.Dense}),
    norm.BatchNormRule: (lambda: nn.BatchNorm2d(8), {gpdc.rules.ChannelsIn}),
    norm.GroupNormRule: (lambda: nn.GroupNorm(2, 8), {gpdc.rules.ChannelsIn}),
    norm.LayerNormRule: (lambda: Lambda(lambda s, x: s.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2),
                                        ln=nn.LayerNorm(8)), {gpdc.rules.ChannelsIn}),
    elementwise.ChannelwiseRule: (lambda: nn.GELU(), set()),
    elementwise.BinaryRule: (lambda: Lambda(lambda s, x: x + s.c(x), c=nn.Conv2d(8, 8, 1)), {elementwise.Paired}),
    elementwise.PadRule: (lambda: Lambda(lambda s, x: F.pad(x, (1, 1, 1, 1))[..., 1:-1, 1:-1]), set()),
    elementwise.RollRule: (lambda: Lambda(lambda s, x: torch.roll(x, (1, -1), dims=(2, 3))), set()),
    functional.FunctionalDenseRule: (
        lambda: Lambda(lambda s, x: F.conv2d(x, s.w.weight, s.w.bias, padding=1), w=nn.Conv2d(8, 8, 3)),
        {functional.FunctionalDense}),
    movement.CatRule: (lambda: Lambda(lambda s, x: torch.cat([s.a(x), s.b(x)], 1), a=nn.Conv2d(8, 4, 1),
                                      b=nn.Conv2d(8, 4, 1)), {movement.CatChannels}),
    movement.MoveRule: (lambda: Lambda(lambda s, x: torch.cat([x.chunk(2, 1)[1], x[:, :4]], 1)),
                        {movement.Item, movement.Select}),
    movement.BroadcastRule: (lambda: Lambda(lambda s, x: x * (x.square().mean((2, 3), keepdim=True) + 1e-6).rsqrt()
                                            .expand(x.shape)), set()),  # filter response normalisation
    movement.ReduceRule: (lambda: Lambda(lambda s, x: x - x.mean(1, keepdim=True)), {gpdc.rules.ChannelsIn}),
    movement.NormReduceRule: (lambda: Lambda(lambda s, x: x * x.norm(p=2, dim=(2, 3), keepdim=True)),
                              {movement.ReduceOther}),
    contraction.MatmulRule: (lambda: Heads(sdpa=False), {contraction.Batched}),
    contraction.AttentionProductRule: (lambda: Heads(sdpa=True), {probe.Probed}),
    attention.TorchMultiheadAttentionRule: (MHA, {producers.Dense}),
    params.FollowRule: (lambda: Lambda(lambda s, x: x * s.gamma.view(1, -1, 1, 1), gamma=_Param(8)),
                        {params.Follows}),
    probe.ProbedRule: (lambda: Lambda(lambda s, x: x * torch.erf(x)), {probe.Probed}),
    student_width.StudentWidthRule: (lambda: Lambda(lambda s, x: s.lstm(x.flatten(2).transpose(1, 2))[0].transpose(
        1, 2).reshape(x.shape), lstm=nn.LSTM(8, 4, batch_first=True, bidirectional=True)),
        {student_width.StudentWidth}),
}


class _Param(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.p = nn.Parameter(torch.rand(n) + 0.5)

    def view(self, *shape):
        return self.p.view(*shape)


def _registered_classes() -> set[type]:
    """Every rule class in the registries and the fallbacks the analysis uses, but those registered only for the
    torchvision/timm integrations (``test_rule_registry.py`` has their cases)."""
    integration = {id(e.resolve()) for e in INTEGRATIONS if e.installed}
    entries = [(k, r) for t in (registry._MODULE_RULES, registry._FUNCTION_RULES, registry._METHOD_RULES)
               for k, r in t.items()]
    own = {type(r) for k, r in entries if id(k) not in integration}
    return own | {params.FollowRule, probe.ProbedRule, student_width.StudentWidthRule}


def test_every_rule_has_a_golden_case():
    missing = sorted(c.__name__ for c in _registered_classes() - set(GOLDEN))
    assert not missing, f"rule classes without a golden case in tests/test_rule_golden.py: {missing}"


@pytest.mark.parametrize("ratio,strategy", [(2.0, "replicate"), pytest.param(1.5, "grow", marks=pytest.mark.slow)])
@pytest.mark.parametrize("rule", list(GOLDEN), ids=lambda c: c.__name__)
def test_rule_fires_widens_stays_exact_and_exports(rule, ratio, strategy, tmp_path):
    op, facts_types = GOLDEN[rule]
    model = randomize(Block(op()).eval())
    exp = gpdc.expand(model, {"input_shape": SHAPE, "expand": {"ratio": ratio, "strategy": strategy}})
    an = ChannelAnalysis(exp.original)
    fired = [n for n in exp.original.graph.nodes if isinstance(an.rules.get(n), rule)]
    assert fired, f"{rule.__name__} did not fire"
    recorded = {type(n.meta[FACTS]) for n in fired if FACTS in n.meta}
    assert facts_types <= recorded, (facts_types, recorded)
    assert exp.teacher.get_submodule("stem").out_channels == int(8 * ratio)
    assert all(c["ok"] for c in check_expansion(exp, torch.randn(*SHAPE)).values())
    x = torch.randn(*SHAPE)
    folded = exp.fold()
    with torch.no_grad():
        assert max_rel_difference(exp.student(x), folded(x))[0] <= 1e-5
    assert check_onnx(export_onnx(folded, x, tmp_path / "student.onnx"), folded, x).ok


def test_facts_must_be_frozen_dataclasses():
    an = ChannelAnalysis(gpdc.trace(Block(nn.ReLU()), SHAPE))
    node = next(iter(an.gm.graph.nodes))
    with pytest.raises(TypeError, match="frozen dataclass"):
        an.record(node, {"in": None})
