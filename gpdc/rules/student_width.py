"""Ops the teacher runs at the student's width: exact for any op, at the price of not widening it.

Some ops cannot run on the teacher's wider tensors and stay exact: one that mixes or reduces the channels (a
softmax or an L2 norm over channels, ``amax`` over channels, a sort), one that hard-codes the channel count, a
leaf module with parameters that no rule knows (``nn.LSTM``, ``nn.GRU``, a user's leaf module), or an op whose rule
cannot widen it (a reshape moving channels into the batch dim; ``ChannelAnalysis`` falls back). The teacher gathers
the first copy of every student channel from each input (under both strategies the student's own channel: METHOD.md
§2), runs the op unchanged (a module shares its parameters with the student) and then either

* copies the result back into the teacher layout of its input, when the probe found that the output keeps the
  input's channel dim (``F.normalize(x, dim=1)``, a softmax over channels): what follows widens as before; or
* leaves its outputs unwidened, like a model input: layers reading them start at the student's width, and a tensor
  that meets them channel for channel keeps its width (it is pinned).

Both are exact at any ratio and strategy. ``--explain`` and ``report.json`` (``student_width_ops``) name each such
op and why, so a user sees where the teacher does not widen and can register a rule that does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch.fx as fx

from ..analyze import node_label, source_line
from ..errors import RuleError
from ..layout import Layout, TeacherLayout
from .registry import Rule


@dataclass(frozen=True)
class StudentWidth:
    """Analysis facts of an op run at the student's width: why, and (for an output that keeps the channel dim
    of input ``ref``) the output's channel dim."""

    reason: str
    ref: fx.Node | None = None
    dim: int | None = None


def gatherable(node: fx.Node, an) -> bool:
    """Whether every input that carries channels is one tensor with one channel dim (not a tuple of tensors nor a
    channel dim split across dims), so that the student's channels can be gathered from it."""
    return all(an.layout_of(a) is None or isinstance(an.layout_of(a), Layout) for a in node.all_input_nodes)


def run_at_student_width(node: fx.Node, an, reason: str, ref: fx.Node | None = None, dim: int | None = None):
    """Record that ``node`` runs at the student's width; its output layout: the input ``ref``'s channels along
    ``dim``, or None (unwidened). With ``expand.unwidenable: error`` the reason is an error instead."""
    if an.unwidenable == "error" or not gatherable(node, an):
        src = f" Source: {source_line(node)}." if source_line(node) else ""
        raise RuleError(f"node {node_label(node)} cannot be widened: {reason}.{src}"
                        + ("" if gatherable(node, an) else " It cannot run at the student's width either: it receives "
                           "a tuple of tensors that carry channels, or a channel dim split across dims."))
    an.record(node, StudentWidth(reason, ref, dim))
    return None if ref is None else an.layout_of(ref).with_dim(dim)


class StudentInputs:
    """The op's arguments as the student sees them: tensors that carry widened channels gathered to the student's
    channels, and sizes computed from them (``B * C * h`` from ``x.shape``) computed again from the gathered
    tensors, so that a reshape reading the channel count gets the student's."""

    def __init__(self, node: fx.Node, ex):
        self.node, self.ex, self.memo, self.reads = node, ex, {}, {}

    def __call__(self, a: fx.Node):
        if a not in self.memo:
            self.memo[a] = self._value(a)
        return self.memo[a]

    def _value(self, a: fx.Node):
        ex = self.ex
        T = ex.tl.get(a)
        if isinstance(T, TeacherLayout):
            idx = T.positions_of(ex.keys(ex.an.layout_of(a)))  # the first copies: the student's tensor
            return ex.env[a] if np.array_equal(idx, np.arange(T.width)) else ex.index_select(self.node, ex.env[a], T.dim, idx)
        if self.reads_widened_size(a):
            return ex.graph.create_node(a.op, a.target, fx.node.map_arg(a.args, self), fx.node.map_arg(a.kwargs, self),
                                        f"{a.name}_student")
        return ex.env[a]

    def reads_widened_size(self, a: fx.Node) -> bool:
        """A Python value (not a tensor) computed from the size of a tensor that carries widened channels."""
        if a.meta.get("gpdc.shape") is not None or a.op not in ("call_function", "call_method"):
            return False
        if a not in self.reads:
            self.reads[a] = any(isinstance(self.ex.tl.get(b), TeacherLayout) or self.reads_widened_size(b)
                                for b in a.all_input_nodes)
        return self.reads[a]


def expand_at_student_width(node: fx.Node, ex) -> None:
    facts: StudentWidth = ex.facts(node)
    student_input = StudentInputs(node, ex)
    args = fx.node.map_arg(node.args, student_input)
    kwargs = fx.node.map_arg(node.kwargs, student_input)
    if node.op == "call_module":
        m = ex.an.module(node)
        ex.set_module(node.target, copy.deepcopy(m))
        ex.share_unchanged(node.target, m)
    out = ex.graph.create_node(node.op, node.target, args, kwargs, node.name)
    if facts.ref is None:
        ex.env[node], ex.tl[node] = out, None
        ex.log(node, f"runs at the student's width, its output unwidened: {facts.reason}")
        return
    T = ex.tl[facts.ref]
    ex.env[node] = ex.index_select(node, out, facts.dim, ex.student_pos(ex.an.layout_of(facts.ref), T))
    ex.tl[node] = T.take(np.arange(T.width), dim=facts.dim)
    ex.log(node, f"runs at the student's width, its output copied to the teacher's {T.width} channels: {facts.reason}")


class StudentWidthRule(Rule):
    """A leaf module with parameters and no channel rule (``nn.LSTM``, a user's module), or an op whose rule
    cannot widen it (``ChannelAnalysis`` falls back to this rule): run unwidened."""

    def analyze(self, node: fx.Node, an):
        return run_at_student_width(node, an, f"module of type {type(an.module(node)).__name__} has parameters and "
                                              "no channel rule")

    def expand(self, node: fx.Node, ex) -> None:
        expand_at_student_width(node, ex)


STUDENT_WIDTH = StudentWidthRule()
