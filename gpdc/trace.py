"""Trace a model into a torch.fx GraphModule and record what later passes need.

* Leaf modules and leaf functions (``register_leaf_module`` / ``register_leaf_function``) are
  kept as single nodes; users extend the registry for code torch.fx cannot trace.
* Every node gets ``node.meta["gpdc.scope"]``: the qualified name of the module that owns it.
* With an example input the tracer is concrete (``concrete_trace``): Python control flow and ``int()``
  on the input's shape are evaluated and recorded in ``gm.meta["gpdc.specialised"]`` (dicts with
  ``where``, ``code``, ``value``, ``scope``), as are the defaults used for forward's other arguments.
* Shape propagation from the spec's ``input_shape`` stores ``node.meta["gpdc.shape"]`` for tensor
  values and ``node.meta["gpdc.value"]`` for small non-tensor values (sizes, ints), which the
  channel analysis reads to evaluate reshapes.
* A tensor an in-place op changed (``x.add_(pos)``, ``F.gelu(x).mul_(gamma)``, ``ReLU(inplace=True)``) is read
  after that op from the op's result, so the graph's edges carry the data flow: a rewrite that drops an op whose
  result nobody uses would otherwise drop its effect.

The user's module is never mutated: tracing works on a deep copy.
"""

from __future__ import annotations

import copy
import inspect
import linecache
import operator
import sys
import traceback
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from .concrete_trace import ConcreteTracer, ValueDependentError, forward_defaults, has_tensor, is_internal, shapes
from .errors import GpdcError, TraceError

_LEAF_MODULES: set[type] = set()
_LEAF_FUNCTIONS: set[Callable] = set()


def register_leaf_module(cls: type) -> type:
    """Keep instances of ``cls`` as single call_module nodes (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_leaf_module expects an nn.Module subclass, got {cls!r}")
    _LEAF_MODULES.add(cls)
    return cls


def register_leaf_function(fn: Callable) -> Callable:
    """Keep calls of the module-level function ``fn`` as single call_function nodes."""
    if not callable(fn) or not hasattr(fn, "__module__") or not hasattr(fn, "__name__"):
        raise TypeError(f"register_leaf_function expects a module-level function, got {fn!r}")
    _LEAF_FUNCTIONS.add(fn)
    return fn


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm's own registry of modules and functions torch.fx must not trace into (when timm is in use)."""
    fx_features = sys.modules.get("timm.models._features_fx")
    if fx_features is None:
        return (), ()
    return tuple(fx_features.get_notrace_modules()), tuple(fx_features.get_notrace_functions())


def find_module_rule(cls: type):
    from .rules.registry import module_rule  # noqa: PLC0415 (the rules import the tracer's registry)

    return module_rule(cls)


def _runs_by_mode(m: nn.Module) -> bool:
    """A BatchNorm or Dropout of a class of the user's (or a library's) that a rule covers: its forward reads
    ``self.training``, which tracing into it would fix at the traced (eval) mode for good — a BatchNorm subclass
    would then never use batch statistics in training — so it stays one node, run by its rule."""
    if not isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
        return False
    rule = find_module_rule(type(m))
    return rule is not None and rule.covers(m)


class GpdcTracer(ConcreteTracer):
    """A Tracer that honours the leaf registry, records the owning module of each node and the innermost
    module being traced when tracing fails."""

    def __init__(self, leaf_modules: tuple[type, ...] = (), leaf_functions: tuple[Callable, ...] = (),
                 example: torch.Tensor | None = None):
        timm_modules, timm_functions = _timm_notrace()
        fns = tuple(_LEAF_FUNCTIONS) + tuple(leaf_functions) + timm_functions
        super().__init__(example, autowrap_functions=tuple(f for f in fns if callable(f) and hasattr(f, "__name__")))
        self.leaf_types = tuple(_LEAF_MODULES) + tuple(leaf_modules)
        self.timm_leaf_types = timm_modules  # leaves for timm's feature extraction only: traced into if possible
        self._kept_leaf: set[int] = set()
        self._trying: set[int] = set()
        self._owner: list[str] = [""]
        self._failure: tuple[BaseException, str] | None = None
        self.record_stack_traces = True
        self.proxy_buffer_attributes = True  # buffers are graph values (FrozenBatchNorm2d), not folded constants

    def create_arg(self, a: Any):
        """Dict subclasses (an OrderedDict output) keep their type; fx would emit a plain dict."""
        if isinstance(a, dict) and type(a) not in (dict, fx.immutable_collections.immutable_dict):
            return self.create_node("call_function", type(a), (super().create_arg(dict(a)),), {})
        return super().create_arg(a)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.timm_leaf_types) and not isinstance(m, self.leaf_types):
            return id(m) in self._kept_leaf or find_module_rule(type(m)) is not None
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname) or _runs_by_mode(m)

    def call_module(self, m, forward, args, kwargs):
        if self.evaluating:  # a leaf module running on example values, not traced
            return super().call_module(m, forward, args, kwargs)
        name = self.path_of_module(m)
        if isinstance(m, self.timm_leaf_types) and id(m) not in self._trying and not self.is_leaf_module(m, name):
            return self._trace_into_or_keep(m, forward, args, kwargs)
        self._owner.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            if self._failure is None or self._failure[0] is not e:  # the first module to see it is the innermost
                self._failure = (e, name)
            raise
        finally:
            self._owner.pop()

    def _trace_into_or_keep(self, m, forward, args, kwargs):
        """A timm module that timm keeps out of fx graphs for feature extraction, without a gpdc rule: its
        body is traced when it can be (so the ops inside are followed), else it stays one node."""
        mark = self.graph._root.prev  # the last node so far
        stack = self.module_stack.copy()  # fx leaves the failed modules on it
        self._trying.add(id(m))
        try:
            return self.call_module(m, forward, args, kwargs)
        except Exception:
            added = []
            node = mark.next
            while node is not self.graph._root:
                added.append(node)
                node = node.next
            for node in reversed(added):
                self.graph.erase_node(node)
            self.module_stack.clear()
            self.module_stack.update(stack)
            self._kept_leaf.add(id(m))
            return self.call_module(m, forward, args, kwargs)
        finally:
            self._trying.discard(id(m))

    def failed_in(self, e: BaseException) -> str:
        """The qualified name of the innermost module being traced when ``e`` was raised ('' for the root)."""
        return self._failure[1] if self._failure is not None and self._failure[0] is e else ""

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["gpdc.scope"] = self._owner[-1]
        return node


def _user_frame(tb) -> str:
    """The innermost traceback frame outside torch and gpdc: where the user's code failed."""
    frames = [f for f in traceback.extract_tb(tb) if not is_internal(f.filename)]
    if not frames:
        return "an unknown line"
    f = frames[-1]
    line = f.line or linecache.getline(f.filename, f.lineno).strip()
    return f"{f.filename}:{f.lineno} (`{line}`)"


def _defined_at(cls: type) -> str:
    """``file:line`` of a class definition, for pointing users at the module that failed."""
    try:
        return f"{inspect.getsourcefile(cls)}:{inspect.getsourcelines(cls)[1]}"
    except (OSError, TypeError):
        return f"module {cls.__module__}"


def _trace_error(model: nn.Module, tracer: GpdcTracer, e: Exception, tb) -> TraceError:
    """One paragraph: the innermost module being traced, the user's line that failed, and advice that can work."""
    name = tracer.failed_in(e)
    cls = type(model.get_submodule(name))
    scope = f"in module '{name}'" if name else "in the top-level module"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    problem = first if isinstance(e, GpdcError) else f"{type(e).__name__}: {first}"
    if name:
        hide = (f"keep the module out of the graph with gpdc.register_leaf_module({cls.__name__}) (or "
                "leaf_modules=...); if widened channels reach it, gpdc then also needs a channel rule for it: "
                f"gpdc.register_module_rule({cls.__name__}, rule)")
    else:
        hide = ("move that part into a submodule registered with gpdc.register_leaf_module, or into a module-level "
                "function registered with gpdc.register_leaf_function")
    if isinstance(e, ValueDependentError):
        advice = f"Compute that value from shapes only (x.shape, x.size()), or {hide}."
    else:
        advice = f"Code torch.fx cannot trace must be hidden from it: {hide}."
    return TraceError(
        f"torch.fx cannot trace {type(model).__name__}: {scope} ({cls.__name__}, defined at {_defined_at(cls)}), "
        f"at {_user_frame(tb)}: {problem}. {advice}"
    )


def symbolic_trace(
    model: nn.Module,
    leaf_modules: tuple[type, ...] = (),
    leaf_functions: tuple[Callable, ...] = (),
    example: torch.Tensor | None = None,
) -> fx.GraphModule:
    """Trace ``model`` (a copy of it, in eval mode) into a GraphModule; GraphModules pass through.

    With an ``example`` input, Python values computed from its shape are specialised (see the module docs)."""
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
        for node in gm.graph.nodes:
            node.meta.setdefault("gpdc.scope", node.target if node.op == "call_module" else "")
        gm.meta.setdefault("gpdc.specialised", [])
        return gm
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module or torch.fx.GraphModule, got {type(model).__name__}.")
    defaults = forward_defaults(type(model))
    model = copy.deepcopy(model).eval()
    tracer = GpdcTracer(leaf_modules, leaf_functions, example)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # torch.fx raises many types here; all mean "not traceable"
        raise _trace_error(model, tracer, e, sys.exc_info()[2]) from None
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.meta["gpdc.specialised"] = defaults + tracer.specialised
    return gm


class _Recorder(fx.Interpreter):
    """Runs the graph once and stores shapes and small values in node.meta."""

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        n.meta["gpdc.shape"] = shapes(out)
        if not has_tensor(out):
            n.meta["gpdc.value"] = out
        return out


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor | tuple) -> None:
    """Record shapes (and non-tensor values) of every node for ``example`` inputs."""
    args = example if isinstance(example, tuple) else (example,)
    with torch.no_grad():
        try:
            _Recorder(gm).run(*args)
        except Exception as e:
            raise TraceError(
                f"running the traced model on an input of shape {[tuple(a.shape) for a in args]} failed: "
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}. "
                "Check `input_shape` in the spec (batch first, e.g. [2, 3, 64, 64])."
            ) from None


def trace(model: nn.Module, input_shape, leaf_modules=(), leaf_functions=()) -> fx.GraphModule:
    """Trace ``model`` concretely on a random input of ``input_shape`` and propagate shapes for it."""
    from .rules import register_integrations  # noqa: PLC0415 (the rules build on this module)

    register_integrations()
    params = model.parameters() if isinstance(model, nn.Module) else iter(())
    example = torch.randn(*input_shape, dtype=next((p.dtype for p in params), torch.float32))
    gm = symbolic_trace(model, leaf_modules, leaf_functions, example)
    propagate_shapes(gm, example)
    read_in_place_results(gm)
    return gm


_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.imatmul}


def read_in_place_results(gm: fx.GraphModule) -> None:
    """Point every later reader of a tensor an op changed in place at that op's result (the same tensor)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    modules = dict(gm.named_modules())
    changed = False
    for node in gm.graph.nodes:
        target = node.args[0] if node.args else None
        if not (isinstance(target, fx.Node) and holds_tensor(target) and _changes_first_arg(node, modules)):
            continue
        for user in list(target.users):
            if order[user] > order[node]:
                user.replace_input_with(target, node)
                changed = True
    if changed:
        gm.recompile()


def _changes_first_arg(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.target in _IN_PLACE_OPERATORS or node.kwargs.get("inplace") is True
                or (name.endswith("_") and not name.startswith("_")))
    return node.op == "call_module" and getattr(modules.get(node.target), "inplace", False) is True


def holds_tensor(node: fx.Node) -> bool:
    """Whether the node's recorded value is one tensor (its shape a tuple of sizes)."""
    shape = node.meta.get("gpdc.shape")
    return isinstance(shape, tuple) and all(isinstance(d, int) for d in shape)
