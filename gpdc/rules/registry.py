"""The channel-rule registry, keyed by module type, by function and by method name.

A rule tells the compiler how one op treats the channel dimension:

* ``analyze(node, an)`` returns the student ``Layout`` of the node's output (or a tuple of them),
  coupling or pinning channel spaces on the way;
* ``expand(node, ex)`` emits the teacher node(s) and the teacher layout, and records how the
  student's parameters are read out of the teacher's (the ParamMap).

Users register rules for their own modules and functions; registration validates the rule. A node
whose inputs carry widened channels but which has no rule is probed (``gpdc.rules.probe``): accepted
if it acts on each channel alike, else an error; never a silent skip.
"""

from __future__ import annotations

from typing import Callable

import torch.fx as fx
from torch import nn

_MODULE_RULES: dict[type, "Rule"] = {}
_FUNCTION_RULES: dict[Callable, "Rule"] = {}
_METHOD_RULES: dict[str, "Rule"] = {}


class Rule:
    """Base class of channel rules (see the module docstring)."""

    #: whether the rule can take a tensor whose channel dim is split over several dims
    accepts_split = False
    #: whether the rule must run even when no input carries widened channels (it opens a space)
    opens_space = False

    def analyze(self, node: fx.Node, an):  # pragma: no cover - interface
        raise NotImplementedError

    def expand(self, node: fx.Node, ex) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def _check(rule: Rule) -> Rule:
    if not isinstance(rule, Rule) or type(rule).analyze is Rule.analyze or type(rule).expand is Rule.expand:
        raise TypeError(f"a channel rule must be a gpdc.rules.Rule instance defining analyze() and expand(), got {rule!r}")
    return rule


def register_module_rule(cls: type, rule: Rule) -> None:
    """Use ``rule`` for call_module nodes whose module is an instance of ``cls`` (most specific wins)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_module_rule expects an nn.Module subclass, got {cls!r}")
    _MODULE_RULES[cls] = _check(rule)


def register_function_rule(fn: Callable, rule: Rule) -> None:
    """Use ``rule`` for call_function nodes whose target is ``fn``."""
    if not callable(fn):
        raise TypeError(f"register_function_rule expects a callable, got {fn!r}")
    _FUNCTION_RULES[fn] = _check(rule)


def register_method_rule(name: str, rule: Rule) -> None:
    """Use ``rule`` for call_method nodes such as ``x.view(...)`` (name 'view')."""
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"register_method_rule expects a method name, got {name!r}")
    _METHOD_RULES[name] = _check(rule)


def find_rule(node: fx.Node, an) -> Rule | None:
    """The registered rule of ``node``; for an op without one that produces tensors (a function, a method,
    or a module without parameters and buffers), the rule that probes it (``gpdc.rules.probe``)."""
    if node.op == "call_module":
        m = an.module(node)
        for cls in type(m).__mro__:
            if cls in _MODULE_RULES:
                return _MODULE_RULES[cls]
        stateless = next(m.parameters(), None) is None and next(m.buffers(), None) is None
        return _probed(node) if stateless else None
    if node.op == "call_function":
        return _FUNCTION_RULES.get(node.target) or _probed(node)
    if node.op == "call_method":
        return _METHOD_RULES.get(node.target) or _probed(node)
    return None


def _probed(node: fx.Node) -> Rule | None:
    """The probing fallback, for ops whose output holds tensors (a size or a dtype needs no channel rule)."""
    if node.meta.get("gpdc.shape") is None:
        return None
    from .probe import PROBED  # noqa: PLC0415 (probe builds on the analysis, which imports this registry)

    return PROBED


def module_rule(cls: type) -> "Rule | None":
    """The rule registered for ``cls`` or its nearest base class."""
    return next((_MODULE_RULES[c] for c in cls.__mro__ if c in _MODULE_RULES), None)
