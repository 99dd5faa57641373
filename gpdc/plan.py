"""The expansion plan: how many copies each student channel has in the teacher.

Each coupled group (gpdc.coupling) is a list of blocks: runs of channels that widen as a whole (one
channel, or the channels per group of a grouped conv, or a head). The group's ratio adds whole extra
copies of its blocks, cycling over them in order, so multiplicities differ by at most one (METHOD.md
§2); with blocks of one size q the width rounds as ``C' = q * round_half_up(C/q * r)``. A ratio close
to 1 on a tiny group may round to C' = C (no widening). Coupled channels are one channel here, so a
channel tied to several producers has one multiplicity everywhere.

In the teacher, a space's first C channels are the student's own, in order, followed by the second
copies (in channel order), the third copies, ...; ``ChannelMap`` is that map for one run of channels.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .analyze import ChannelAnalysis, Group
from .errors import RuleError, SpecError
from .spec import Spec, match_layer


@dataclass(frozen=True)
class ChannelMap:
    src: np.ndarray  # int64 [C']
    copy: np.ndarray  # int64 [C']

    @property
    def width(self) -> int:
        return len(self.src)

    @property
    def multiplicity(self) -> np.ndarray:
        return np.bincount(self.src)

    @staticmethod
    def build(width: int, teacher_width: int, quantum: int = 1) -> "ChannelMap":
        blocks, tblocks = width // quantum, teacher_width // quantum
        src_block = np.concatenate([np.arange(blocks), np.arange(tblocks - blocks) % max(blocks, 1)]).astype(np.int64)
        copy_block = np.concatenate([np.zeros(blocks, np.int64), np.arange(tblocks - blocks) // max(blocks, 1) + 1])
        lane = np.arange(quantum, dtype=np.int64)
        return ChannelMap(
            (src_block[:, None] * quantum + lane).reshape(-1),
            np.repeat(copy_block, quantum).astype(np.int64),
        )


def teacher_width(width: int, ratio: float, quantum: int) -> int:
    blocks = width // quantum
    return quantum * max(blocks, math.floor(blocks * ratio + 0.5))


@dataclass
class ExpansionPlan:
    groups: list[Group]
    multiplicity: np.ndarray  # copies of each student channel (global channel id, gpdc.coupling) in the teacher
    strategy: str


def plan_expansion(an: ChannelAnalysis, spec: Spec) -> ExpansionPlan:
    rules = spec.expand.layers
    groups = an.groups()
    all_layers = [n.target for n in an.gm.graph.nodes if n.op == "call_module"]
    for key in rules:
        if not any(match_layer(name, {key: rules[key]}) for name in all_layers):
            close = [n for n in all_layers if key.split(".")[0] in n][:3]
            raise SpecError(
                f"expand.layers: the pattern '{key}' matches no layer of the model. Layer names are module "
                f"paths such as {', '.join(repr(n) for n in (close or all_layers[:3]))}; check the spelling or use a glob like 'layer4.*'."
            )
    for g in groups:
        matched = [(name, match_layer(name, rules)) for name in g.layers]
        matched = [(name, m) for name, m in matched if m is not None]
        if g.pinned:
            exact = [(n, m) for n, m in matched if m[0] == "exact" and m[2] > 1]
            if exact:
                raise SpecError(
                    f"expand.layers: '{exact[0][0]}' cannot widen: its output channels {g.pinned}. "
                    "Remove this key (the logits and the data input keep their width)."
                )
            g.ratio, g.rule = 1.0, f"pinned: {g.pinned}"
        elif matched:
            level = "exact" if any(m[0] == "exact" for _, m in matched) else "glob"
            top = [(n, m) for n, m in matched if m[0] == level]
            for n2, m2 in top[1:]:
                if m2[2] != top[0][1][2]:
                    n1, m1 = top[0]
                    path = _path_between(an, g, n1, n2)
                    raise SpecError(
                        f"expand.layers: ratios conflict inside one coupled channel group: '{n1}' gets {m1[2]} from "
                        f"'{m1[1]}' but '{n2}' gets {m2[2]} from '{m2[1]}', and their output channels are tied "
                        f"together by {path}. Give both the same ratio (coupled channels widen with one map)."
                    )
            g.ratio = top[0][1][2]
            g.rule = f"{level} '{top[0][1][1]}'"
        else:
            g.ratio, g.rule = spec.expand.ratio, "default expand.ratio"
    if all(g.pinned for g in groups):
        raise RuleError(_nothing_widens(an))
    multiplicity = np.ones(an.coupling.num_channels, np.int64)
    for g in groups:
        extra = extra_copies(g.unit_sizes, g.ratio)
        for ids, e in zip(g.units, extra):
            multiplicity[ids] += e
        g.teacher_width = g.width + int(np.dot(g.unit_sizes, extra))
    _check_memory(an, groups)
    return ExpansionPlan(groups, multiplicity, spec.expand.strategy)


def extra_copies(sizes: list[int], ratio: float) -> np.ndarray:
    """Extra copies per block (blocks in order) so the group's width grows by ``ratio``: one more copy for
    each block in turn, cycling, as ``ChannelMap.build`` does. Blocks of one size keep whole blocks
    (``teacher_width``); blocks of mixed sizes take copies while they fit the rounded target."""
    n, extra = len(sizes), np.zeros(len(sizes), np.int64)
    if len(set(sizes)) == 1:
        added = teacher_width(n * sizes[0], ratio, sizes[0]) // sizes[0] - n
        return extra + added // n + (np.arange(n) < added % n)
    budget = max(0, math.floor(sum(sizes) * ratio + 0.5) - sum(sizes))
    while budget >= min(sizes):
        for i, size in enumerate(sizes):
            if size <= budget:
                extra[i] += 1
                budget -= size
    return extra


def _check_memory(an: ChannelAnalysis, groups: list[Group]) -> None:
    """Refuse a plan whose teacher parameters alone would not fit in this machine's memory: a weight
    grows with the ratios of its input and output groups, so ``r_max²`` times the student's bounds it."""
    r_max = max(g.teacher_width / max(g.width, 1) for g in groups)
    need = sum(p.numel() * p.element_size() for p in an.gm.parameters()) * r_max ** 2
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else float("inf")
    worst = max(groups, key=lambda g: g.teacher_width / max(g.width, 1))
    if need > have:
        raise SpecError(
            f"the teacher would not fit in memory: group {worst.id} ({', '.join(worst.layers[:2]) or 'no layer'}) widens "
            f"{worst.width} -> {worst.teacher_width} channels ({worst.rule}), so its weights alone need up to "
            f"~{need / 2**30:,.1f} GiB (the student's times {r_max:.3g}²), more than this machine's "
            f"{have / 2**30:,.1f} GiB. Use a smaller expand.ratio (the paper uses 2).")


def _nothing_widens(an: ChannelAnalysis) -> str:
    functional = [n for n in an.gm.graph.nodes if n.op == "call_function"
                  and getattr(n.target, "__name__", "") in ("conv1d", "conv2d", "conv3d", "linear")]
    why = (f" The model computes {functional[0].target.__name__} functionally at node '{functional[0].name}' (in "
           f"'{functional[0].meta.get('gpdc.scope', '')}'); a functional layer opens no widened channels when its "
           "weight is computed from parameters by ops that mix its fan-in (e.g. weight standardisation), which "
           "gpdc cannot widen exactly." if functional else "")
    features = [p for p in an.pinned_outputs if p.key]
    if features:
        keys = ", ".join(f"'{p.key}'" for p in features[:6]) + (", ..." if len(features) > 6 else "")
        glob = features[-1].key.rsplit(".", 1)[0] + ".*" if "." in features[-1].key else features[-1].key
        why += (f" The model returns {len(features)} output tensors ({keys}) and outputs keep their width unless the "
                f"spec frees them: add its feature outputs to expand.free_outputs (e.g. ['{glob}']) so they widen (the "
                "Expansion's output_maps read the student's channels back out of them).")
    return ("no channel group of this model can widen: every group's channels are pinned (they reach the model's "
            f"outputs or meet the data input) or come from ops gpdc has no producer rule for.{why} Otherwise register "
            "a rule for the layer type (gpdc.register_module_rule) to widen it.")


def _path_between(an: ChannelAnalysis, g: Group, layer1: str, layer2: str) -> str:
    def space_of(layer):
        node = next(n for n in an.gm.graph.nodes if n.op == "call_module" and n.target == layer)
        return int(an.layouts[node].space[0])

    names = an.coupling_path(space_of(layer1), space_of(layer2))
    return ", ".join(f"node '{n}'" for n in names) if names else "the same channels"
