"""Deployment folding: conv + BatchNorm fusion on a traced student (METHOD.md §3, last line).

``W·γ/√(σ²+ε)`` and bias ``β + (b−μ)·γ/√(σ²+ε)``, applied where a BatchNorm's only input is a conv
whose output feeds nothing else; the fused graph computes the eval-mode student.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fuse_conv_bn(gm: fx.GraphModule) -> fx.GraphModule:
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and type(modules[src.target]) is nn.Conv2d
                and len(src.users) == 1 and modules[node.target].track_running_stats):
            continue
        fused = fuse_conv_bn_eval(modules[src.target].eval(), modules[node.target].eval())
        parent, _, leaf = src.target.rpartition(".")
        (gm.get_submodule(parent) if parent else gm).add_module(leaf, fused)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
