"""Layer and group normalisation with per-channel statistic weights: the teacher form of a norm
whose channels are widened unevenly.

Teacher channels are copies of student channels (replicate) or copies plus fresh channels (grow).
A plain LayerNorm over C' teacher channels would weight a student channel by its number of copies
(replicate at a non-integer ratio) or mix in the fresh channels (grow), so the teacher computes the
statistics with weights ``w`` that count every student channel once: ``w_j = 1/(C·copies)``
(replicate) or ``1/C`` on the student's own channels and 0 on fresh ones (grow). Every channel is
then normalised with those statistics: exact at any ratio, in train and eval mode alike (METHOD.md
§2, "multiplicity-weighted statistics"). With uniform copies the weights are uniform and the rules
emit the plain torch norm instead.
"""

from __future__ import annotations

import torch
from torch import nn


def weighted_layer_norm(x: torch.Tensor, stat_weight: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with statistics weighted by ``stat_weight`` (sums to 1)."""
    mean = (x * stat_weight).sum(-1, keepdim=True)
    d = x - mean
    y = d * torch.rsqrt((d * d * stat_weight).sum(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def weighted_group_norm(x: torch.Tensor, groups: torch.Tensor, stat_weight: torch.Tensor, weight, bias,
                        eps: float) -> torch.Tensor:
    """GroupNorm over dim 1 where channel j belongs to group ``groups[j]`` (a one-hot [C', G] matrix)
    and contributes with weight ``stat_weight[j]`` (the weights of one group sum to 1)."""
    B, C = x.shape[:2]
    xs = x.reshape(B, C, -1)
    mean = ((xs.mean(-1) * stat_weight) @ groups) @ groups.t()
    d = xs - mean.unsqueeze(-1)
    var = (((d * d).mean(-1) * stat_weight) @ groups) @ groups.t()
    y = (d * torch.rsqrt(var + eps).unsqueeze(-1)).reshape(x.shape)
    shape = [1, C] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


torch.fx.wrap("weighted_layer_norm")
torch.fx.wrap("weighted_group_norm")


class WeightedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim with weighted statistics (a buffer, not trained)."""

    def __init__(self, source: nn.LayerNorm, width: int, stat_weight: torch.Tensor, weight, bias):
        super().__init__(width, eps=source.eps, elementwise_affine=source.elementwise_affine,
                         bias=source.bias is not None)
        with torch.no_grad():
            if self.weight is not None:
                self.weight.copy_(weight)
            if self.bias is not None:
                self.bias.copy_(bias)
        self.register_buffer("stat_weight", stat_weight, persistent=False)

    def forward(self, x):
        return weighted_layer_norm(x, self.stat_weight, self.weight, self.bias, self.eps)


class WeightedGroupNorm(nn.Module):
    """GroupNorm whose channel-to-group assignment and statistic weights are buffers (the teacher
    width need not be a multiple of the group count)."""

    def __init__(self, source: nn.GroupNorm, groups: torch.Tensor, stat_weight: torch.Tensor, weight, bias):
        super().__init__()
        self.eps = source.eps
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("groups", groups, persistent=False)
        self.register_buffer("stat_weight", stat_weight, persistent=False)

    def forward(self, x):
        return weighted_group_norm(x, self.groups, self.stat_weight, self.weight, self.bias, self.eps)


class WeightedStdConv2d(nn.Conv2d):
    """A weight-standardised conv (timm ``StdConv2d``) whose per-row weight statistics count every student
    input channel once (``col_weight``, summing to 1 over the columns of a row, per kernel position
    averaged), and whose standardised columns are then multiplied by the fan-in scale ``col_scale``."""

    def __init__(self, source: nn.Conv2d, weight: torch.Tensor, bias, col_weight: torch.Tensor, col_scale: torch.Tensor):
        super().__init__(weight.shape[1], weight.shape[0], source.kernel_size, source.stride, source.padding,
                         source.dilation, 1, bias is not None, source.padding_mode)
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        self.eps = source.eps
        self.register_buffer("col_weight", col_weight.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("col_scale", col_scale.view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        w = self.weight
        k = w.shape[2] * w.shape[3]
        mean = (w * self.col_weight).sum((1, 2, 3), keepdim=True) / k
        d = w - mean
        var = (d * d * self.col_weight).sum((1, 2, 3), keepdim=True) / k
        return self._conv_forward(x, d * torch.rsqrt(var + self.eps) * self.col_scale, self.bias)
