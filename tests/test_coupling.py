"""Per-channel coupling (gpdc.coupling): residual adds and gates between layouts made of concatenations,
slices, permutations and partial channel ranges are exact at any ratio, both strategies.

The blocks are written the way the long-tail architectures write them (ghost modules, ReXNet's partial
shortcut, Res2Net's hierarchical splits, MixNet's unequal splits, DPN's dual path, ShuffleNetV1's
grouped conv + shuffle), plus a property test over random slice/concat/permute layouts.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gpdc
from gpdc.exactness import check, randomize, reference, set_mode

CASES = [(2.0, "replicate"), (1.5, "grow"), (1.5, "replicate"), (3.0, "grow")]


def cbr(cin, cout, k=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class Ghost(nn.Module):
    """GhostNet: half the channels from a conv, half from a cheap depthwise conv, sliced, plus a shortcut."""

    def __init__(self, c=10):
        super().__init__()
        self.stem = cbr(3, c, 3)
        init = (c + 1) // 2
        self.primary, self.cheap = cbr(c, init), cbr(init, init, 3, groups=init)
        self.c = c
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        p = self.primary(x)
        y = torch.cat([p, self.cheap(p)], dim=1)[:, : self.c]
        return self.head((y + x).mean((2, 3)))


class PartialShortcut(nn.Module):
    """ReXNet: a narrower shortcut added onto the first channels of a wider output."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = cbr(3, 6), cbr(6, 9, 3), cbr(9, 13)
        self.head = nn.Linear(13, 4)

    def forward(self, x):
        s = self.stem(x)
        y = self.a(s)
        y = torch.cat([y[:, :6] + s, y[:, 6:]], dim=1)
        z = self.b(y)
        z = torch.cat([z[:, :9] + y, z[:, 9:]], dim=1)
        return self.head(z.mean((2, 3)))


class Res2(nn.Module):
    """Res2Net: the 1x1 output split in scales; each 3x3 conv gets the previous one's output added."""

    def __init__(self, w=4, scale=4):
        super().__init__()
        self.w, self.scale = w, scale
        self.conv1 = cbr(3, w * scale)
        self.convs = nn.ModuleList(cbr(w, w, 3) for _ in range(scale - 1))
        self.conv3 = nn.Conv2d(w * scale, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        spx = torch.split(self.conv1(x), self.w, 1)
        out, sp = [], None
        for i, conv in enumerate(self.convs):
            sp = conv(spx[i] if i == 0 else sp + spx[i])
            out.append(sp)
        y = self.conv3(torch.cat(out + [spx[-1]], 1))
        return self.head(y.mean((2, 3)))


class MixedConv(nn.Module):
    """MixNet: unequal channel splits, one kernel size each, concatenated and added to the input."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 11)
        self.splits = [5, 3, 3]
        self.convs = nn.ModuleList(nn.Conv2d(c, c, k, padding=k // 2, groups=c) for c, k in zip(self.splits, (3, 5, 7)))
        self.pw = cbr(11, 11)
        self.head = nn.Linear(11, 4)

    def forward(self, x):
        x = self.stem(x)
        parts = torch.split(x, self.splits, 1)
        y = self.pw(torch.cat([conv(p) for conv, p in zip(self.convs, parts)], 1))
        return self.head((y + x).mean((2, 3)))


class DualPath(nn.Module):
    """DPN: one conv output split into a residual part (added) and a dense part (concatenated)."""

    def __init__(self, r=6, d=3):
        super().__init__()
        self.r = r
        self.stem = cbr(3, r + d)
        self.blocks = nn.ModuleList(cbr(r + d + i * d, r + d, 3) for i in range(2))
        self.head = nn.Linear(r + 3 * d, 4)

    def forward(self, x):
        x = self.stem(x)
        resid, dense = x[:, : self.r], x[:, self.r:]
        for block in self.blocks:
            y = block(torch.cat([resid, dense], 1))
            resid = resid + y[:, : self.r]
            dense = torch.cat([dense, y[:, self.r:]], 1)
        return self.head(torch.cat([resid, dense], 1).mean((2, 3)))


class ShuffleV1(nn.Module):
    """ShuffleNetV1: grouped 1x1 conv, channel shuffle, grouped 1x1 conv; stride-2 units concatenate
    the pooled shortcut, stride-1 units add the shortcut onto that concatenated layout."""

    def __init__(self, g=2):
        super().__init__()
        self.g = g
        self.stem = cbr(3, 8)
        self.down = nn.Sequential(cbr(8, 4, groups=1), nn.Conv2d(4, 8, 1, groups=g), nn.BatchNorm2d(8))
        self.reduce = cbr(16, 4, groups=g)
        self.expand = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4),
                                    nn.Conv2d(4, 16, 1, groups=g), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 4)

    def shuffle(self, x):
        b, c, h, w = x.shape
        return x.view(b, self.g, c // self.g, h, w).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(torch.cat([self.down(x)[:, :, ::2, ::2], F.avg_pool2d(x, 3, 2, 1)], 1))
        z = self.expand(self.shuffle(self.reduce(y)))
        return self.head(F.relu(z + y).mean((2, 3)))


class ShuffledGate(nn.Module):
    """A gate between one layer's output and a channel-shuffled other layer's, then a residual add."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = cbr(3, 8), cbr(8, 8), cbr(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        a = self.a(x)
        b = self.b(a)
        perm = b.view(b.shape[0], 2, 4, *b.shape[2:]).transpose(1, 2).reshape(b.shape)
        return self.head((a * torch.sigmoid(perm) + self.c(b)).mean((2, 3)))


class FilterResponse(nn.Module):
    """Filter response normalisation + TLU as timm writes it: a per-channel statistic expanded back to ``x.shape``
    (and once with ``expand_as``), then a learned per-channel threshold."""

    def __init__(self, c=8):
        super().__init__()
        self.stem, self.conv, self.head = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1), nn.Linear(c, 5)
        self.weight, self.bias, self.tau = (nn.Parameter(torch.randn(c)) for _ in range(3))

    def frn(self, x, as_of):
        nu2 = x.square().mean((2, 3), keepdim=True)
        scale = (nu2 + 1e-6).rsqrt()
        x = x * (scale.expand(x.shape) if as_of is None else scale.expand_as(as_of))
        return torch.maximum(x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1), self.tau.view(1, -1, 1, 1))

    def forward(self, x):
        x = self.stem(x)
        x = self.frn(x, None)
        y = self.conv(x)
        return self.head(self.frn(y, y).mean((2, 3)))


BLOCKS = {"ghost": Ghost, "partial_shortcut": PartialShortcut, "res2": Res2, "mixed_conv": MixedConv,
          "dual_path": DualPath, "shufflenet_v1": ShuffleV1, "shuffled_gate": ShuffledGate,
          "filter_response_norm": FilterResponse}


def assert_exact(model, size=12, ratio=2.0, strategy="replicate", free=()):
    torch.manual_seed(0)
    randomize(model.eval())
    x = torch.randn(2, 3, size, size)
    exp = gpdc.expand(model, {"input_shape": [2, 3, size, size], "expand": {"ratio": ratio, "strategy": strategy}})
    for train in (False, True):
        ref, own = reference(model, x, train)
        for cand in (exp.teacher, exp.student):
            result = check(set_mode(cand, train), ref, own, x)
            assert result.ok, f"{type(model).__name__} r={ratio} {strategy} train={train}: {result}"
    return exp


@pytest.mark.parametrize("ratio,strategy", CASES)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_exact(name, ratio, strategy):
    exp = assert_exact(BLOCKS[name](), ratio=ratio, strategy=strategy)
    assert any(g.teacher_width > g.width for g in exp.groups), "nothing widened"


def test_partial_shortcut_gives_coupled_channels_one_multiplicity():
    exp = assert_exact(PartialShortcut(), ratio=1.5, strategy="replicate")
    group = next(g for g in exp.groups if g.summary()["per_channel"])
    assert sorted(group.space_widths) == [6, 9, 13]
    assert group.width == 13  # 13 distinct channels: the 6 and the 9 are the first channels of the 13
    assert group.teacher_width == 13 + 7  # round(13 * 1.5) - 13 extra copies, one multiplicity per channel
    assert set(exp.plan.multiplicity.tolist()) == {1, 2}


def test_ratio_conflict_across_a_partial_shortcut_names_the_coupling():
    with pytest.raises(gpdc.SpecError, match="ratios conflict"):
        gpdc.expand(PartialShortcut(), {"input_shape": [2, 3, 12, 12],
                                        "expand": {"ratio": 2.0, "layers": {"stem.0": 2.0, "a.0": 3.0}}})


class Reversed(nn.Module):
    """Channels of one layer paired with each other: ``a + a[:, reversed]`` (and a GLU-style gate of halves)."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        a = self.a(x)
        y = a + a[:, [5, 4, 3, 2, 1, 0]]
        g, v = y.chunk(2, dim=1)
        return self.head(torch.cat([torch.sigmoid(g) * v, v], 1).mean((2, 3)))


@pytest.mark.parametrize("ratio,strategy", CASES)
def test_channels_of_one_layer_paired_with_each_other(ratio, strategy):
    assert_exact(Reversed(), ratio=ratio, strategy=strategy)


class RandomLayouts(nn.Module):
    """Two producers concatenated, permuted and sliced, then added to a third producer's output."""

    def __init__(self, w1, w2, perm, start):
        super().__init__()
        self.a, self.b = cbr(3, w1), cbr(3, w2)
        self.register_buffer("perm", torch.tensor(perm), persistent=False)
        self.start, self.n = start, len(perm) - start
        self.c = cbr(3, self.n)
        self.head = nn.Linear(self.n, 2)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)[:, self.perm.tolist()][:, self.start:]
        return self.head((y + self.c(x)).mean((2, 3)))


@settings(max_examples=12, deadline=None)
@given(w1=st.integers(1, 5), w2=st.integers(1, 5), seed=st.integers(0, 10**6), start=st.integers(0, 3),
       ratio=st.sampled_from([1.5, 2.0, 2.5]), strategy=st.sampled_from(["replicate", "grow"]))
def test_random_permuted_slices_are_exact(w1, w2, seed, start, ratio, strategy):
    perm = torch.randperm(w1 + w2, generator=torch.Generator().manual_seed(seed)).tolist()
    start = min(start, w1 + w2 - 1)
    assert_exact(RandomLayouts(w1, w2, perm, start), size=6, ratio=ratio, strategy=strategy)


PARTIAL_FILE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 9, 3, padding=1)
        self.head = nn.Linear(9, 4)

    def forward(self, x):
        s = self.stem(x)
        y = self.a(s)
        return self.head(torch.cat([y[:, :6] + s, y[:, 6:]], 1).mean((2, 3)))


def build_model():
    return Net()
'''


def test_cli_group_table_marks_per_channel_groups(tmp_path):
    from click.testing import CliRunner

    from gpdc.cli import main

    (tmp_path / "model.py").write_text(PARTIAL_FILE)
    (tmp_path / "spec.yaml").write_text("input_shape: [2, 3, 8, 8]\n")
    r = CliRunner().invoke(main, ["expand", str(tmp_path / "model.py"), "--spec", str(tmp_path / "spec.yaml")])
    assert r.exit_code == 0, r.output
    row = next(line for line in r.stdout.splitlines() if "stem" in line)
    assert "9 (per channel)" in row and "18" in row, r.stdout
