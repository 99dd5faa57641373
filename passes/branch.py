"""CBR branch pass: the teacher's selected k×k convs (k > 1) become merge-on-forward branch blocks.

Runs after IR on the teacher GraphModule (in place on that new module; the user's model is never
touched). Each block is exact at init (every new branch has scale 0). The shared student's conv
weight becomes the channel slice of the merged kernel: the pass registers the merged kernel as a
derived tensor of the ParamMap, so student, fold and checkpoints all read the same definition.
"""

from __future__ import annotations

import fnmatch

import torch.fx as fx
from torch import nn

from gpdc.branch_conv import BranchConv2d, MergedKernel, applicable_kinds
from gpdc.param_map import ParamMap
from gpdc.pass_manager import Pass, PassResult
from gpdc.spec import BranchSpec


class ChannelBranchReparameterization(Pass):
    name = "branch"
    requires = frozenset({"teacher"})
    ensures = frozenset({"branched"})
    in_place = True

    def __init__(self, spec: BranchSpec, param_map: ParamMap):
        self.spec = spec
        self.param_map = param_map

    def call(self, gm: fx.GraphModule) -> PassResult:
        log = []
        if not self.spec.kinds:
            return PassResult(gm, False, log=["branches disabled (branches.kinds: [])"])
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            conv = gm.get_submodule(node.target)
            if type(conv) is not nn.Conv2d:
                continue
            if not fnmatch.fnmatchcase(node.target, self.spec.layers):
                log.append(f"{node.target}: no branches (not matched by branches.layers '{self.spec.layers}')")
                continue
            if max(conv.kernel_size) == 1:
                log.append(f"{node.target}: no branches (1x1 conv: nothing to merge)")
                continue
            kinds = applicable_kinds(conv, self.spec.kinds)
            skipped = [k for k in self.spec.kinds if k not in kinds]
            block = BranchConv2d(conv, tuple(kinds))
            block.student_channels = self._student_channels(f"{node.target}.weight", conv)
            parent, _, leaf = node.target.rpartition(".")
            (gm.get_submodule(parent) if parent else gm).add_module(leaf, block)
            self.param_map.derive(f"{node.target}.weight", MergedKernel(node.target, block))
            log.append(f"{node.target}: branches {list(kinds)}" + (f" (skipped {skipped}: shape/stride/groups)" if skipped else ""))
        return PassResult(gm, True, log=log)

    def _student_channels(self, weight: str, conv: nn.Conv2d) -> tuple[int, int]:
        """(out, in per group) of the student's kernel that reads this teacher kernel: what its slice costs."""
        for src in self.param_map.sources.values():
            if src.teacher == weight:
                return tuple(len(src.index[d]) if d in src.index else conv.weight.shape[d] for d in (0, 1))
        return tuple(conv.weight.shape[:2])
