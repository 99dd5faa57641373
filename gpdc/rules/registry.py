"""The channel-rule registry, keyed by module type, by function and by method name.

A rule tells the compiler how one op treats the channel dimension:

* ``analyze(node, an)`` returns the student ``Layout`` of the node's output (or a tuple of them),
  coupling or pinning channel spaces on the way;
* ``expand(node, ex)`` emits the teacher node(s) and the teacher layout, and records how the
  student's parameters are read out of the teacher's (the ParamMap).

Users register rules for their own modules and functions; registration validates the rule, and
replacing a target's rule by a different one warns (a silent override would change how every model
using the op is widened). ``scoped()`` undoes the registrations made inside it. A node whose inputs
carry widened channels but which has no rule is probed (``gpdc.rules.probe``): followed if it acts on
each channel alike, else run at the student's width (``gpdc.rules.student_width``); never a silent skip.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

import torch.fx as fx
from torch import nn

from ..trace import _LEAF_FUNCTIONS, _LEAF_MODULES

_MODULE_RULES: dict[type, "Rule"] = {}
_FUNCTION_RULES: dict[Callable, "Rule"] = {}
_METHOD_RULES: dict[str, "Rule"] = {}


class Rule:
    """Base class of channel rules (see the module docstring)."""

    #: whether the rule can take a tensor whose channel dim is split over several dims
    accepts_split = False
    #: whether the rule must run even when no input carries widened channels (it opens a space)
    opens_space = False
    #: as a module rule, whether it also covers subclasses that define a forward of their own: true where such
    #: subclasses keep the math (an activation after a BatchNorm, Swin V2's window attention); others are traced
    #: through (a conv subclass's forward often makes its kernel: standardised, masked, scaled)
    covers_own_forward = False

    def covers(self, module) -> bool:
        """As a module rule, whether it can widen this instance (one with parameters it does not know cannot)."""
        return True

    def analyze(self, node: fx.Node, an):  # pragma: no cover - interface
        raise NotImplementedError

    def expand(self, node: fx.Node, ex) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        """The class and its settings (``SpaceToChannelsRule(k=4)``), for warnings and ``gpdc rules``."""
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def _store(table: dict, key, rule: Rule, what: str) -> None:
    """Validate ``rule`` and file it under ``key``; replacing a different rule warns, naming both."""
    if not isinstance(rule, Rule) or type(rule).analyze is Rule.analyze or type(rule).expand is Rule.expand:
        raise TypeError(f"a channel rule must be a gpdc.rules.Rule instance defining analyze() and expand(), got {rule!r}")
    old = table.get(key)
    if old is not None and old is not rule:
        warnings.warn(f"{what}: its channel rule {old!r} is replaced by {rule!r}", UserWarning, stacklevel=3)
    table[key] = rule


def register_module_rule(cls: type, rule: Rule) -> None:
    """Use ``rule`` for call_module nodes whose module is an instance of ``cls`` (most specific wins)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_module_rule expects an nn.Module subclass, got {cls!r}")
    _store(_MODULE_RULES, cls, rule, f"module {qualified_name(cls)}")


def register_function_rule(fn: Callable, rule: Rule) -> None:
    """Use ``rule`` for call_function nodes whose target is ``fn``."""
    if not callable(fn):
        raise TypeError(f"register_function_rule expects a callable, got {fn!r}")
    _store(_FUNCTION_RULES, fn, rule, f"function {qualified_name(fn)}")


def register_method_rule(name: str, rule: Rule) -> None:
    """Use ``rule`` for call_method nodes such as ``x.view(...)`` (name 'view')."""
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"register_method_rule expects a method name, got {name!r}")
    _store(_METHOD_RULES, name, rule, f"method '.{name}()'")


def find_rule(node: fx.Node, an) -> Rule | None:
    """The registered rule of ``node``; for an op without one that produces tensors (a function, a method,
    or a module without parameters and buffers), the rule that probes it (``gpdc.rules.probe``), and for a leaf
    module with parameters, the rule that runs it at the student's width (``gpdc.rules.student_width``)."""
    if node.op == "call_module":
        m = an.module(node)
        rule = module_rule(type(m))
        if rule is not None and rule.covers(m):
            return rule
        stateless = next(m.parameters(), None) is None and next(m.buffers(), None) is None
        if stateless:
            return _probed(node)
        from .student_width import STUDENT_WIDTH  # noqa: PLC0415 (builds on this registry)

        return STUDENT_WIDTH
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
    """The rule registered for ``cls``, or for its nearest base class with one, unless ``cls`` defines a forward of
    its own that the rule does not cover (``Rule.covers_own_forward``): a conv subclass with its own forward often
    computes its kernel (timm's ``ScaledStdConv2dSame`` standardises it over the fan-in, with a gain of its own), so
    it is traced through, or run at the student's width, rather than widened as a plain conv."""
    ruled = next((c for c in cls.__mro__ if c in _MODULE_RULES), None)
    if ruled is None:
        return None
    rule = _MODULE_RULES[ruled]
    return rule if cls.forward is ruled.forward or rule.covers_own_forward else None


@contextmanager
def scoped() -> Iterator[None]:
    """Undo, on leaving the block, every rule and leaf registered inside it (the rule tables here and the
    leaf registries of ``gpdc.trace``): a test or a notebook cell that registers its own rules leaves the
    registries as it found them, so one test's rule cannot change how another's model is widened."""
    tables = (_MODULE_RULES, _FUNCTION_RULES, _METHOD_RULES, _LEAF_MODULES, _LEAF_FUNCTIONS)
    saved = [t.copy() for t in tables]
    try:
        yield
    finally:
        for table, copy in zip(tables, saved):
            table.clear()
            table.update(copy)


def qualified_name(target) -> str:
    """``module.name`` of a class or function (``torch.nn.modules.conv.Conv2d``, ``operator.add``)."""
    module = getattr(target, "__module__", None) or ""
    name = target.__qualname__ if isinstance(target, type) else getattr(target, "__name__", None) or repr(target)
    module = {"_operator": "operator"}.get(module, module)
    return f"{module}.{name}" if module else name


def _by_rule(table: dict) -> dict[str, list[str]]:
    """The targets of a rule table grouped by rule class, both sorted."""
    groups: dict[str, list[str]] = {}
    for target, rule in table.items():
        groups.setdefault(type(rule).__name__, []).append(target if isinstance(target, str) else qualified_name(target))
    return {k: sorted(v) for k, v in sorted(groups.items())}


def catalogue() -> dict:
    """What is registered (``gpdc rules``): rule targets by rule class, per kind of node, and the leaf registries."""
    from .integrations import register_integrations  # noqa: PLC0415 (builds on this registry)

    register_integrations(imported_only=False)
    return {
        "module_rules": _by_rule(_MODULE_RULES),
        "function_rules": _by_rule(_FUNCTION_RULES),
        "method_rules": _by_rule(_METHOD_RULES),
        "leaf_modules": sorted(qualified_name(c) for c in _LEAF_MODULES),
        "leaf_functions": sorted(qualified_name(f) for f in _LEAF_FUNCTIONS),
    }
