"""BatchNorm: per-channel parameters and statistics follow the channel map, unscaled.

Teacher activations are replicated copies of the student's, so each copy sees the student's
values and BatchNorm is exact in eval mode (running stats) and train mode (batch stats) alike.
The student reads the affine parameters of the first copies and keeps its own running statistics.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from ..errors import RuleError
from ..layout import Layout
from .registry import Rule, register_module_rule


class BatchNormRule(Rule):
    def analyze(self, node: fx.Node, an):
        L = an.layout_of(node.args[0])
        m = an.module(node)
        if L is None:
            L = an.pinned_layout(node, 1, m.num_features, "input that is not widened")
        if not isinstance(L, Layout) or L.dim != 1:
            raise RuleError(f"BatchNorm '{node.target}' expects its channels in dim 1.")
        an.info[node] = {"in": L}
        return L

    def expand(self, node: fx.Node, ex) -> None:
        m = ex.an.module(node)
        L = ex.an.info[node]["in"]
        TI = ex.tin(node.args[0], L)
        pos = torch.as_tensor(ex.student_pos(L, TI))
        params = {k: p.detach().index_select(0, pos) for k, p in m.named_parameters(recurse=False)}
        buffers = {}
        for k, b in m.named_buffers(recurse=False):
            buffers[k] = b.detach().index_select(0, pos) if b is not None and b.dim() == 1 else (None if b is None else b.detach().clone())
        new = ex.clone(m, params=params, buffers=buffers, num_features=TI.width)
        ex.emit_module(node, new, ex.arg(node.args[0]), layout=TI)
        rows = TI.positions_of(ex.keys(L))
        for k in params:
            ex.share(node.target, k, index={0: rows})
        ex.log(node, f"batchnorm: {L.width}->{TI.width} channels")


for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
    register_module_rule(_cls, BatchNormRule())
