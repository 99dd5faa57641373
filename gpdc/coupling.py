"""Channel coupling: which channels of the student are the same channel in the teacher.

Every producer (conv, linear, the data input) opens a *space* of channels; each channel has a global id
(its space's offset + its index). An op that combines tensors channel by channel (residual add, gate)
ties the channels at equal positions together, one pair at a time, so a residual add onto a slice, a
concat or a channel shuffle couples exactly the channels it meets (union-find over channels). Coupled
channels share a key and one multiplicity in the teacher.

Two coarser relations ride along: channels that must share a multiplicity without being the same
channel (the blocks of a grouped conv, the heads of an attention), and the spaces connected by any
coupling, which form the *groups* the spec's ratios apply to.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from .layout import SUB_BITS, Layout


class UnionFind:
    def __init__(self):
        self.parent: list[int] = []

    def add(self, n: int) -> None:
        self.parent.extend(range(len(self.parent), len(self.parent) + n))

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the oldest member is the root: roots follow graph order

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(int(i)) for i in ids), np.int64, len(ids))


@dataclass
class Space:
    width: int
    origin: str  # node that opened it
    offset: int  # global id of its channel 0
    pinned: str | None = None  # why it never widens


class Coupling:
    """Spaces, coupled channels (``channels``), channels of one multiplicity (``blocks``) and the
    coupling graph between spaces (edges name the coupling node, for error messages)."""

    def __init__(self):
        self.spaces: list[Space] = []
        self.channels = UnionFind()
        self.blocks = UnionFind()
        self.space_sets = UnionFind()
        self.graph = nx.Graph()

    @property
    def num_channels(self) -> int:
        return len(self.channels.parent)

    def new_space(self, width: int, origin: str, pinned: str | None = None) -> int:
        self.spaces.append(Space(width, origin, self.num_channels, pinned))
        for uf in (self.channels, self.blocks):
            uf.add(width)
        self.space_sets.add(1)
        self.graph.add_node(len(self.spaces) - 1)
        return len(self.spaces) - 1

    def ids(self, L: Layout) -> np.ndarray:
        """Global channel id of each position of ``L``."""
        offsets = np.array([s.offset for s in self.spaces], np.int64)
        return offsets[L.space] + L.index if L.width else np.zeros(0, np.int64)

    def space_ids(self, space: int) -> np.ndarray:
        s = self.spaces[space]
        return np.arange(s.offset, s.offset + s.width, dtype=np.int64)

    def keys(self, L: Layout) -> np.ndarray:
        """One key per position: equal for coupled channels at equal spatial sub-positions."""
        return (self.channels.roots(self.ids(L)) << SUB_BITS) | L.sub

    def tie(self, a: Layout, b: Layout, node_name: str) -> None:
        """The channels at equal positions of ``a`` and ``b`` (same width and sub-positions) are one, or,
        for two channels of one producer, widen alike (ops pair their inputs by student position)."""
        for ca, cb, sa, sb in set(zip(self.ids(a).tolist(), self.ids(b).tolist(), a.space.tolist(), b.space.tolist())):
            if sa != sb:  # two channels of one producer (q against k, a gate against its sibling) stay distinct
                self.channels.union(ca, cb)
            self.blocks.union(ca, cb)
        self._join_spaces(a.space.tolist(), b.space.tolist(), node_name)

    def align(self, a: Layout, b: Layout, node_name: str) -> None:
        """The channels at equal positions of ``a`` and ``b`` are distinct but widen alike (same copies)."""
        for ca, cb in set(zip(self.ids(a).tolist(), self.ids(b).tolist())):
            self.blocks.union(ca, cb)
        self._join_spaces(a.space.tolist(), b.space.tolist(), node_name)

    def same_multiplicity(self, L: Layout, block: int, node_name: str) -> None:
        """Each run of ``block`` consecutive positions of ``L`` widens as a whole (grouped convs, heads);
        the spaces a run spans join one group."""
        ids = self.ids(L)
        for start in range(0, len(ids), block):
            run = slice(start, start + block)
            for c in ids[run][1:].tolist():
                self.blocks.union(int(ids[start]), c)
            spaces = L.space[run].tolist()
            self._join_spaces([spaces[0]] * len(spaces), spaces, node_name)

    def _join_spaces(self, sa: list[int], sb: list[int], node_name: str) -> None:
        """Spaces ``sa[i]`` and ``sb[i]`` join one group; the coupling graph names the node that joined them."""
        for a, b in set(zip(sa, sb)):
            if a != b:
                self.graph.add_edge(a, b, node=node_name)
                self.space_sets.union(a, b)
