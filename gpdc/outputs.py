"""Model outputs of any structure: a tensor, or any nesting of tuple, list, dict, OrderedDict, namedtuple
and dataclass, with non-tensor leaves passed through.

A leaf is named by its ``LeafPath``, shown as Python would index it (``out[1]['feats'][0]``, ``out['aux']``,
``out.logits``; ``out`` for a plain tensor output), and by a dotted *key* (``1.feats.0``, ``aux``,
``logits``) that spec globs (``expand.free_outputs``) and ONNX output names use. The same walk serves
runtime values (the checks compare every tensor leaf) and traced graphs (the analysis pins or frees each
leaf node), so both sides agree on the names.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx

from .errors import GpdcError


@dataclasses.dataclass(frozen=True)
class LeafPath:
    """Where a leaf sits in an output: steps ("index", i), ("key", k) or ("attr", name)."""

    steps: tuple[tuple[str, Any], ...] = ()

    def __add__(self, step: tuple[str, Any]) -> "LeafPath":
        return LeafPath(self.steps + (step,))

    @property
    def key(self) -> str:
        """Dotted, for spec globs and ONNX names: ``1.feats.0``."""
        return ".".join(str(v) for _, v in self.steps)

    def __str__(self) -> str:
        """As a user indexes it: ``out[1]['feats'][0]``, ``out.logits``, ``out`` for a plain tensor."""
        fmt = {"index": "[{}]", "attr": ".{}"}
        return "out" + "".join(fmt[k].format(v) if k in fmt else f"[{v!r}]" for k, v in self.steps)

    @property
    def onnx_name(self) -> str:
        key = self.key
        return "output" if not key else (f"output.{key}" if key[0].isdigit() else key)

    def matches(self, patterns: list[str]) -> bool:
        """Whether a glob of ``expand.free_outputs`` matches the dotted key, any dotted suffix of it
        (``feats.*`` matches ``1.feats.0``) or the indexed form."""
        parts = [str(v) for _, v in self.steps]
        names = [".".join(parts[i:]) for i in range(len(parts))] + [str(self)]
        return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _children(x) -> list[tuple[tuple[str, Any], Any]] | None:
    """(path step, child) pairs of a container value, None for a leaf."""
    if _is_namedtuple(x):
        return [(("attr", f), getattr(x, f)) for f in x._fields]
    if isinstance(x, (tuple, list)):
        return [(("index", i), v) for i, v in enumerate(x)]
    if isinstance(x, dict):
        return [(("key", k), v) for k, v in x.items()]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return [(("attr", f.name), getattr(x, f.name)) for f in dataclasses.fields(x)]
    return None


def leaves(x, path: LeafPath = LeafPath()) -> Iterator[tuple[LeafPath, Any]]:
    """(path, leaf) for every leaf of a runtime output, in a fixed order."""
    kids = _children(x)
    if kids is None:
        yield path, x
        return
    for step, v in kids:
        yield from leaves(v, path + step)


def tensor_leaves(x) -> list[tuple[LeafPath, torch.Tensor]]:
    return [(p, v) for p, v in leaves(x) if isinstance(v, torch.Tensor)]


def map_leaves(x, fn: Callable[[LeafPath, Any], Any], path: LeafPath = LeafPath()):
    """The same structure with every leaf replaced by ``fn(path, leaf)``."""
    kids = _children(x)
    if kids is None:
        return fn(path, x)
    new = [map_leaves(v, fn, path + step) for step, v in kids]
    if _is_namedtuple(x):
        return type(x)(*new)
    if isinstance(x, (tuple, list)):
        return type(x)(new)
    if isinstance(x, dict):
        out = x.copy()
        out.update(zip(x.keys(), new))
        return out
    return dataclasses.replace(x, **{f.name: v for f, v in zip(dataclasses.fields(x), new)})


@dataclasses.dataclass(frozen=True)
class OutputMap:
    """How a widened output leaf of the teacher holds the student's: ``index`` along ``dim`` picks, for
    each student channel, its first teacher copy (which carries the student's value, both strategies)."""

    dim: int
    index: torch.Tensor
    teacher_width: int

    def read(self, t: torch.Tensor) -> torch.Tensor:
        return t.index_select(self.dim, self.index.to(t.device))


def describe(out) -> str:
    """A readable output structure for tables and messages, e.g. ``(Tensor, {feats: [Tensor×4], pooled: Tensor})``."""
    if isinstance(out, torch.Tensor):
        return "Tensor"
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return f"{type(out).__name__}(" + ", ".join(f"{k}={describe(getattr(out, k))}" for k in out._fields) + ")"
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return f"{type(out).__name__}(" + ", ".join(
            f"{f.name}={describe(getattr(out, f.name))}" for f in dataclasses.fields(out)) + ")"
    if isinstance(out, (tuple, list)):
        items = [describe(v) for v in out]
        body = f"{items[0]}×{len(items)}" if len(items) > 1 and len(set(items)) == 1 else ", ".join(items)
        return f"({body})" if isinstance(out, tuple) else f"[{body}]"
    if isinstance(out, dict):
        prefix = "" if type(out) is dict else type(out).__name__
        return prefix + "{" + ", ".join(f"{k}: {describe(v)}" for k, v in out.items()) + "}"
    return type(out).__name__


# -- the same walk over a traced graph's output argument -------------------------------------------

def is_structure_node(node: fx.Node) -> bool:
    """A call that only builds a container (a namedtuple, dataclass or dict subclass) from its args."""
    t = node.target
    return node.op == "call_function" and isinstance(t, type) and (
        issubclass(t, tuple) and hasattr(t, "_fields") or dataclasses.is_dataclass(t) or issubclass(t, dict))


def _graph_children(a) -> list[tuple[tuple[str, Any], Any]] | None:
    if isinstance(a, fx.Node) and is_structure_node(a):
        t = a.target
        if issubclass(t, dict):
            return _graph_children(a.args[0] if a.args else dict(a.kwargs))
        names = list(t._fields) if hasattr(t, "_fields") else [f.name for f in dataclasses.fields(t)]
        values = dict(zip(names, a.args)) | dict(a.kwargs)
        return [(("attr", n), values[n]) for n in names if n in values]
    if isinstance(a, (tuple, list)):
        return [(("index", i), v) for i, v in enumerate(a)]
    if isinstance(a, dict):
        return [(("key", k), v) for k, v in a.items()]
    return None


def graph_leaves(a, path: LeafPath = LeafPath()) -> Iterator[tuple[LeafPath, Any]]:
    """(path, fx.Node or constant) for every leaf of a graph's output argument."""
    kids = _graph_children(a)
    if kids is None:
        yield path, a
        return
    for step, v in kids:
        yield from graph_leaves(v, path + step)


def output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def logits_path(output, key: str | None, what: str = "the model") -> LeafPath:
    """Which leaf of ``output`` holds the logits: the leaf ``key`` (dotted path) if given; else the output
    itself if it is a tensor, the one leaf named ``logits`` or ``out``, or the first tensor leaf."""
    found = tensor_leaves(output)
    if not found:
        raise GpdcError(f"{what} returns no tensor; gpdc needs its logits.")
    if key is not None:
        hit = [p for p, _ in found if p.key == key]
        if not hit:
            raise GpdcError(f"train.logits: {what} has no output leaf '{key}'; its tensor leaves are "
                            f"{', '.join(repr(p.key) for p, _ in found)}.")
        return hit[0]
    if len(found) == 1:
        return found[0][0]
    named = [p for p, _ in found if p.steps and str(p.steps[-1][1]) in ("logits", "out")]
    if len(named) > 1:
        raise GpdcError(f"{what} returns several leaves that could be the logits ({', '.join(str(p) for p in named)}); "
                        "name one with train.logits (its dotted path, e.g. '" + named[0].key + "').")
    return named[0] if named else found[0][0]


def pick(output, path: LeafPath):
    """The leaf of ``output`` at ``path``."""
    for p, v in leaves(output):
        if p == path:
            return v
    raise GpdcError(f"the model's output has no leaf {path} any more (its structure changed between calls).")
