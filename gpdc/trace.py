"""Trace a model into a torch.fx GraphModule and record what later passes need.

* Leaf modules and leaf functions (``register_leaf_module`` / ``register_leaf_function``) are
  kept as single nodes; users extend the registry for code torch.fx cannot trace.
* Every node gets ``node.meta["gpdc.scope"]``: the qualified name of the module that owns it.
* Shape propagation from the spec's ``input_shape`` stores ``node.meta["gpdc.shape"]`` for tensor
  values and ``node.meta["gpdc.value"]`` for small non-tensor values (sizes, ints), which the
  channel analysis reads to evaluate reshapes.

The user's module is never mutated: tracing works on a deep copy.
"""

from __future__ import annotations

import copy
import linecache
import sys
import traceback
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from .errors import TraceError

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


class GpdcTracer(fx.Tracer):
    """A Tracer that honours the leaf registry and records the owning module of each node."""

    def __init__(self, leaf_modules: tuple[type, ...] = (), leaf_functions: tuple[Callable, ...] = ()):
        timm_modules, timm_functions = _timm_notrace()
        fns = tuple(_LEAF_FUNCTIONS) + tuple(leaf_functions) + timm_functions
        super().__init__(autowrap_functions=tuple(f for f in fns if callable(f) and hasattr(f, "__name__")))
        self.leaf_types = tuple(_LEAF_MODULES) + tuple(leaf_modules) + timm_modules
        self._owner: list[str] = [""]
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self._owner.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._owner.pop()

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["gpdc.scope"] = self._owner[-1]
        return node


def _user_frame(tb) -> str:
    """The innermost traceback frame outside torch: where the user's code failed."""
    frames = [f for f in traceback.extract_tb(tb) if "/torch/" not in f.filename and "/gpdc/" not in f.filename]
    if not frames:
        return "an unknown line"
    f = frames[-1]
    line = f.line or linecache.getline(f.filename, f.lineno).strip()
    return f"{f.filename}:{f.lineno} (`{line}`)"


def symbolic_trace(
    model: nn.Module,
    leaf_modules: tuple[type, ...] = (),
    leaf_functions: tuple[Callable, ...] = (),
) -> fx.GraphModule:
    """Trace ``model`` (a copy of it, in eval mode) into a GraphModule; GraphModules pass through."""
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
        for node in gm.graph.nodes:
            node.meta.setdefault("gpdc.scope", node.target if node.op == "call_module" else "")
        return gm
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module or torch.fx.GraphModule, got {type(model).__name__}.")
    model = copy.deepcopy(model).eval()
    tracer = GpdcTracer(leaf_modules, leaf_functions)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # torch.fx raises many types here; all mean "not traceable"
        scope = tracer._owner[-1] or "(the top-level module)"
        owner = type(model.get_submodule(tracer._owner[-1])).__name__ if tracer._owner[-1] else type(model).__name__
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}: inside module '{scope}' ({owner}) at "
            f"{_user_frame(sys.exc_info()[2])}: {type(e).__name__}: {first}. Data-dependent control flow "
            f"or untraceable ops must be hidden from the tracer: register the module with "
            f"gpdc.register_leaf_module({owner}) (or pass leaf_modules=...), or a function with "
            f"gpdc.register_leaf_function(fn)."
        ) from None
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    return gm


class _Recorder(fx.Interpreter):
    """Runs the graph once and stores shapes and small values in node.meta."""

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        n.meta["gpdc.shape"] = _shapes(out)
        if not _has_tensor(out):
            n.meta["gpdc.value"] = out
        return out


def _has_tensor(v) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (list, tuple)):
        return any(_has_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(_has_tensor(x) for x in v.values())
    return False


def _shapes(v):
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if isinstance(v, (list, tuple)) and _has_tensor(v):
        return tuple(_shapes(x) for x in v)
    return None


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
    """Trace ``model`` and propagate shapes for a random input of ``input_shape``."""
    gm = symbolic_trace(model, leaf_modules, leaf_functions)
    dtype = next((p.dtype for p in gm.parameters()), torch.float32)
    propagate_shapes(gm, torch.randn(*input_shape, dtype=dtype))
    return gm
