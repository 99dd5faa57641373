"""Golden tests of the transposed-conv rule (``gpdc.rules.producers.TransposedConvRule``): a decoder widens
through dense and depthwise ConvTranspose layers exactly (float32, relative 1e-5), the teacher's layers have the
planned widths, the folded student is the user's class and exports to ONNX equal to PyTorch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gpdc
from gpdc.exactness import check_expansion, max_rel_difference, randomize
from gpdc.export import check_onnx, export_onnx


class Decoder(nn.Module):
    """Downsample, upsample by a strided ConvTranspose, a second one (dense or depthwise), a skip added on."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1)
        self.refine = nn.ConvTranspose2d(6, 6, 3, padding=1, groups=groups, bias=False)
        self.skip = nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.up(torch.relu(self.bn(self.down(x))))
        return self.head(self.refine(y) + self.skip(x))


def expand(model, ratio, strategy):
    return gpdc.expand(randomize(model.eval()), {"input_shape": [2, 3, 8, 8],
                                                 "expand": {"ratio": ratio, "strategy": strategy}})


@pytest.mark.parametrize("groups", [1, 6], ids=["dense", "depthwise"])
@pytest.mark.parametrize("ratio,strategy", [(2.0, "replicate"), (1.5, "replicate"), (2.0, "grow"), (1.5, "grow")])
def test_decoder_with_transposed_convs_widens_exactly(groups, ratio, strategy, tmp_path):
    exp = expand(Decoder(groups), ratio, strategy)
    checks = check_expansion(exp, torch.randn(2, 3, 8, 8))
    assert all(c["ok"] for c in checks.values()), checks
    up, refine = exp.teacher.get_submodule("up"), exp.teacher.get_submodule("refine")
    assert up.in_channels == exp.teacher.get_submodule("down").out_channels == int(8 * ratio)
    assert up.out_channels == refine.in_channels > 6 and refine.groups == (1 if groups == 1 else refine.in_channels)
    assert exp.report()["student_width_ops"] == {}
    folded = exp.fold()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert max_rel_difference(exp.student(x), folded(x))[0] <= 1e-5
    assert type(folded) is Decoder
    path = export_onnx(folded, x, tmp_path / "decoder.onnx")
    assert check_onnx(path, folded, x).ok


def test_grouped_transposed_conv_runs_at_the_student_width():
    exp = expand(Decoder(groups=2), 2.0, "replicate")
    assert "grouped transposed conv 'refine' is not supported" in exp.report()["student_width_ops"]["refine"]
    assert all(c["ok"] for c in check_expansion(exp, torch.randn(2, 3, 8, 8)).values())
    assert exp.teacher.get_submodule("refine").in_channels == 6
