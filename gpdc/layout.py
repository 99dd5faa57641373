"""Channel layouts: which channel of which space each position of a tensor's channel dim holds.

A *space* is the set of C channels one producer (a conv, a linear, the data input) emits. Every
tensor edge that carries channels gets a ``Layout``: along its channel dimension ``dim``, position
p holds channel ``index[p]`` of space ``space[p]``, at spatial sub-position ``sub[p]`` (non-zero
only after a flatten merged spatial positions into the channel dim). Concats, slices, channel
shuffles and flattens are just rearrangements of these arrays, so the teacher can be built for any
of them without model-specific code.

A ``TeacherLayout`` is the same for the widened teacher tensor, plus ``copy[j]``: 0 for the copy of
a student channel the student reads, >= 1 for the extra copies (replicate) or fresh channels (grow).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

SUB_BITS = 24  # spatial sub-positions per channel after a flatten (keys pack them with the channel id)


@dataclass(frozen=True)
class Layout:
    """The student layout of one tensor's channel dimension."""

    dim: int
    space: np.ndarray  # int64 [C]
    index: np.ndarray  # int64 [C]
    sub: np.ndarray  # int64 [C]

    @property
    def width(self) -> int:
        return len(self.space)

    @staticmethod
    def of_space(dim: int, space: int, width: int) -> "Layout":
        return Layout(dim, np.full(width, space, np.int64), np.arange(width, dtype=np.int64), np.zeros(width, np.int64))

    def with_dim(self, dim: int) -> "Layout":
        return Layout(dim, self.space, self.index, self.sub)

    def take(self, positions: np.ndarray, dim: int | None = None, sub: np.ndarray | None = None) -> "Layout":
        return Layout(
            self.dim if dim is None else dim,
            self.space[positions],
            self.index[positions],
            self.sub[positions] if sub is None else sub,
        )

    def spaces(self) -> set[int]:
        return set(np.unique(self.space).tolist())


def cat_layouts(parts: list[Layout], dim: int) -> Layout:
    return Layout(
        dim,
        np.concatenate([p.space for p in parts]),
        np.concatenate([p.index for p in parts]),
        np.concatenate([p.sub for p in parts]),
    )


@dataclass(frozen=True)
class SplitLayout:
    """The channel dim spread over several tensor dims (e.g. inside a channel shuffle).

    ``tags`` has the tensor's full shape; each entry encodes ``position * stride + spatial`` of the
    ``source`` layout, so a later reshape that merges the dims back recovers the permutation."""

    source_node: object  # the fx.Node whose output the split started from
    source: Layout
    stride: int
    tags: torch.Tensor


@dataclass(frozen=True)
class TeacherLayout:
    """The teacher layout of one tensor's channel dimension."""

    dim: int
    space: np.ndarray
    index: np.ndarray
    sub: np.ndarray
    copy: np.ndarray
    keys: np.ndarray = field(repr=False)  # coupled-channel key per position (gpdc.coupling.Coupling.keys)

    @property
    def width(self) -> int:
        return len(self.space)

    def take(self, positions: np.ndarray, dim: int | None = None, sub: np.ndarray | None = None, keys=None) -> "TeacherLayout":
        return TeacherLayout(
            self.dim if dim is None else dim,
            self.space[positions],
            self.index[positions],
            self.sub[positions] if sub is None else sub,
            self.copy[positions],
            self.keys[positions] if keys is None else keys,
        )

    def counts(self) -> np.ndarray:
        """How many copies of its key each position's key has in this tensor."""
        _, inverse, counts = np.unique(self.keys, return_inverse=True, return_counts=True)
        return counts[inverse]

    def positions_of(self, keys: np.ndarray, copy: int = 0) -> np.ndarray:
        """Teacher positions holding copy ``copy`` of each key (every key must be present)."""
        mask = self.copy == copy
        lookup = dict(zip(self.keys[mask].tolist(), np.nonzero(mask)[0].tolist()))
        try:
            return np.array([lookup[k] for k in keys.tolist()], dtype=np.int64)
        except KeyError as e:
            raise AssertionError(f"internal error: channel key {e} has no copy {copy} in the teacher tensor") from None


def cat_teacher(parts: list[TeacherLayout], dim: int) -> TeacherLayout:
    return TeacherLayout(
        dim,
        *(np.concatenate([getattr(p, f) for p in parts]) for f in ("space", "index", "sub", "copy", "keys")),
    )


def encode_tags(layout: Layout, shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """A tag tensor of ``shape``: ``(lead · C + position) · stride + trailing``, where ``position`` runs
    along the channel dim, ``trailing`` is the flat index over the dims after it and ``lead`` the flat
    index over the dims between the batch dim and it (channels-last tensors)."""
    d = layout.dim
    C = shape[d]
    stride = int(np.prod(shape[d + 1 :], dtype=np.int64)) if d + 1 < len(shape) else 1
    pos = torch.arange(C, dtype=torch.int64).view([-1] + [1] * (len(shape) - d - 1)) * stride
    trailing = torch.arange(stride, dtype=torch.int64).view(shape[d + 1 :]) if stride > 1 else torch.zeros((), dtype=torch.int64)
    tags = (pos + trailing).expand(shape[d:])
    if d >= 2:
        lead = torch.arange(int(np.prod(shape[1:d])), dtype=torch.int64).view(shape[1:d] + (1,) * (len(shape) - d))
        tags = lead * (C * stride) + tags
    return tags.expand(shape).contiguous(), stride


def decode_tags(tags: torch.Tensor, stride: int, width: int, default_dim: int | None = None):
    """From a tag tensor after reshapes: ``(dim, positions, spatial, lead)`` if the source positions vary
    along one dim only (for a single channel: ``default_dim``), else None (the channel dim is still split across several dims). ``spatial``
    (trailing-dim offsets) and ``lead`` (leading-dim offsets, relative to the line's first) are None
    unless they vary along that dim, i.e. unless the op merged other dims into the channel dim."""
    pos = (tags // stride) % width
    spatial = tags % stride
    lead = tags // (stride * width)
    varying = [k for k in range(tags.dim()) if tags.shape[k] > 1 and not bool((pos == pos.narrow(k, 0, 1)).all())]
    if not varying and default_dim is not None and tags.numel():
        varying = [default_dim]  # a single channel: it is where the op kept (or merged) the channel dim
    if len(varying) != 1:
        return None
    d = varying[0]
    index = [0] * tags.dim()
    index[d] = slice(None)
    line_pos = pos[tuple(index)].numpy().astype(np.int64)
    line_sub = spatial[tuple(index)].numpy().astype(np.int64)
    line_lead = lead[tuple(index)].numpy().astype(np.int64)
    spatial_along_d = tags.shape[d] > 1 and not bool((spatial == spatial.narrow(d, 0, 1)).all())
    lead_along_d = tags.shape[d] > 1 and not bool((lead == lead.narrow(d, 0, 1)).all())
    return d, line_pos, (line_sub if spatial_along_d else None), (line_lead - line_lead.min() if lead_along_d else None)
