"""Concrete tracing: torch.fx proxies that also carry their value for an example input.

Code that turns a traced value into a Python value (``if h == 64:``, ``int(x.size(1) * r)``,
``range(n)``, ``len(x.shape)``) cannot be traced symbolically. With an example input the tracer
knows every value; when it depends only on the input's *metadata* (shapes, ranks, dtypes) it is
used as a constant and recorded as a specialisation, so the graph is right for inputs of that shape.
A value computed from tensor *data* stays an error: one graph cannot hold both branches.
Operations that need no Python value stay symbolic (``x.view(x.size(0), -1)`` keeps the batch free), and so do
torch's factory functions given traced sizes (``torch.ones(b, h * w)``), which torch's argument parser would
otherwise refuse.
"""

from __future__ import annotations

import dis
import functools
import inspect
import linecache
import operator
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from .errors import TraceError

META_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "layout", "is_cuda"})
META_METHODS = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "stride", "get_device", "element_size",
    "is_contiguous", "is_floating_point", "is_complex",
})
META_FUNCTIONS = (torch.numel, torch.is_floating_point, torch.is_complex)
FACTORIES = ("ones", "zeros", "empty", "full", "rand", "randn", "arange", "eye", "linspace")
_INTERNAL = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


class _Unknown:
    """The value of a proxy traced without an example input (or that failed on it)."""

    def __repr__(self) -> str:
        return "<unknown>"


UNKNOWN = _Unknown()


class ValueDependentError(TraceError):
    """A Python value (control flow, int()) needs tensor data, which one traced graph cannot branch on."""


class ConcreteProxy(fx.Proxy):
    """A Proxy that also holds its value for the example input and whether only metadata decided it."""

    gpdc_value: Any = UNKNOWN
    gpdc_meta_only: bool = False

    def __getattr__(self, k: str) -> ConcreteAttribute:
        return ConcreteAttribute(self, k)

    def __len__(self) -> int:
        return self.tracer.concretise(self, len)

    def __int__(self) -> int:
        return self.tracer.concretise(self, int)

    def __index__(self) -> int:
        return self.tracer.concretise(self, operator.index)

    def __float__(self) -> float:
        return self.tracer.concretise(self, float)

    def __iter__(self):
        """Symbolic items: as many as the names unpacked into, or the value's length (specialised for tensors)."""
        n = _unpacked_into(sys._getframe(1))
        if n is None:
            n = len(self.gpdc_value) if isinstance(self.gpdc_value, (tuple, list)) else len(self)
        return iter([self[i] for i in range(n)])


class ConcreteAttribute(fx.proxy.Attribute, ConcreteProxy):
    """``proxy.attr`` (a method call or an attribute read), with its value taken from the root's."""

    @property
    def gpdc_value(self) -> Any:
        return getattr(self.root.gpdc_value, self.attr, UNKNOWN)

    @property
    def gpdc_meta_only(self) -> bool:
        return self.root.gpdc_meta_only or self.attr in META_ATTRS


def _unpacked_into(frame) -> int | None:
    """How many names ``a, b = proxy`` unpacks into at ``frame``'s current instruction (None: not unpacking)."""
    offset = frame.f_lasti if sys.version_info >= (3, 11) else 2 * frame.f_lasti
    inst = next((i for i in dis.get_instructions(frame.f_code) if i.offset == offset), None)
    return inst.argval if inst is not None and inst.opname == "UNPACK_SEQUENCE" else None


def is_internal(filename: str) -> bool:
    """Whether a frame belongs to torch or gpdc rather than to the user's model code."""
    return filename.startswith(_INTERNAL)


def _user_line() -> tuple[str, str]:
    """``file:line`` and source text of the innermost user frame on the current stack."""
    frame = sys._getframe(1)
    while frame is not None and is_internal(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return "an unknown line", ""
    file, line = frame.f_code.co_filename, frame.f_lineno
    return f"{file}:{line}", linecache.getline(file, line).strip()


def shapes(v: Any) -> Any:
    """Tensor shapes in ``v`` (nested like ``v``), None when it holds no tensor."""
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if isinstance(v, (list, tuple)) and has_tensor(v):
        return tuple(shapes(x) for x in v)
    return None


def has_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (list, tuple)):
        return any(has_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(has_tensor(x) for x in v.values())
    return False


def forward_defaults(cls: type) -> list[dict]:
    """Specialisations for ``cls.forward``'s arguments after the input (their defaults); refuses any without one."""
    fn = inspect.unwrap(cls.forward)
    named = [p for p in list(inspect.signature(fn).parameters.values())[1:]
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    sig = f"{cls.__name__}.forward{inspect.signature(fn)}"
    if not named or named[0].kind is named[0].KEYWORD_ONLY:
        raise TraceError(f"cannot trace {sig}: gpdc traces forward(self, x, ...) with one input tensor, and this "
                         "forward names none. Give it an explicit first argument for the input.")
    missing = [p.name for p in named[1:] if p.default is p.empty]
    if missing:
        raise TraceError(f"cannot trace {sig}: gpdc traces one input tensor and uses the defaults of the other "
                         f"arguments, but {', '.join(missing)} has none. Give it a default (e.g. `{missing[0]}=None`) "
                         "or trace a wrapper module whose forward(self, x) supplies it.")
    where = f"{inspect.getsourcefile(fn) or fn.__code__.co_filename}:{fn.__code__.co_firstlineno}"
    return [{"where": where, "code": f"{p.name}={p.default!r}", "value": p.default, "scope": ""} for p in named[1:]]


class ConcreteTracer(fx.Tracer):
    """A Tracer of ``forward(self, x, ...)`` whose proxies carry their value for ``example`` (None: plain symbolic)."""

    def __init__(self, example: torch.Tensor | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.example = example
        self.specialised: list[dict] = []
        self.failed_eval = ""  # the first op that failed on the example
        self._sizes: set[fx.Node] = set()  # nodes computing Python values (sizes, conditions) from metadata
        self._probed: list[tuple[dict, ConcreteProxy]] = []  # index() conversions not yet known to be used
        self.evaluating = False  # running an op on example values: fx's module patches pass through

    def trace(self, root: torch.nn.Module, concrete_args: Any = None) -> fx.Graph:
        """Trace, then erase the size computations whose values were consumed as Python constants."""
        with self._traced_factories():
            graph = super().trace(root, concrete_args)
        self._settle_probes([])
        for node in reversed(graph.nodes):
            if node in self._sizes and not node.users:
                graph.erase_node(node)
        return graph

    @contextmanager
    def _traced_factories(self) -> Iterator[None]:
        """While tracing, ``torch.ones(b, h * w)`` with a traced size records a node: torch's argument parser takes
        no proxy inside a list of sizes (it fails with "ones() takes 1 positional argument but 2 were given")."""
        originals = {name: getattr(torch, name) for name in FACTORIES}

        def traced(fn: Callable) -> Callable:
            @functools.wraps(fn)
            def factory(*args, **kwargs):
                if self.evaluating or not _proxies_in((args, kwargs)):
                    return fn(*args, **kwargs)
                return self.create_proxy("call_function", fn, args, kwargs)
            return factory

        for name, fn in originals.items():
            setattr(torch, name, traced(fn))
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(torch, name, fn)

    def create_args_for_root(self, root_fn: Callable, is_module: bool, concrete_args: Any = None):
        """One placeholder, for the input: Python fills in the other arguments' defaults (no asserts, no pytree)."""
        fn = inspect.unwrap(root_fn)
        x = list(inspect.signature(fn).parameters.values())[1]
        default = () if x.default is x.empty else (x.default,)
        return root_fn, [self.root, self.create_proxy("placeholder", x.name, default, {},
                                                      type_expr=fn.__annotations__.get(x.name))]

    def call_module(self, m: torch.nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        return forward(*args, **kwargs) if self.evaluating else super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        return attr_val if self.evaluating else super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> ConcreteProxy:
        return ConcreteProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        inputs = _proxies_in((args, kwargs))
        if self._probed:
            self._settle_probes(inputs)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.example is not None and isinstance(proxy, ConcreteProxy):
            proxy.gpdc_value, proxy.gpdc_meta_only = self._evaluate(kind, target, args, kwargs, inputs)
            value = proxy.gpdc_value
            if value is not UNKNOWN:
                proxy.node.meta["gpdc.shape"] = shapes(value)
            if proxy.gpdc_meta_only and value is not None and not has_tensor(value):
                self._sizes.add(proxy.node)
        return proxy

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict, proxies: list) -> tuple[Any, bool]:
        """The node's value on the example and whether it depends on metadata only (UNKNOWN if it cannot run)."""
        if not all(isinstance(p, ConcreteProxy) and p.gpdc_value is not UNKNOWN for p in proxies):
            return UNKNOWN, False
        args, kwargs = map_aggregate((args, kwargs), lambda a: a.gpdc_value if isinstance(a, fx.Proxy) else a)
        derived = kind != "call_module" and bool(proxies) and all(p.gpdc_meta_only for p in proxies)  # modules: weights
        meta_only = derived or _reads_metadata(kind, target, args)
        self.evaluating = True
        try:
            with torch.no_grad():
                return self._run(kind, target, args, kwargs), meta_only
        except Exception as e:  # tracing goes on symbolically; a value forced later reports this failure
            self.failed_eval = self.failed_eval or f"{type(e).__name__}: {str(e).strip()[:200]}"
            return UNKNOWN, False
        finally:
            self.evaluating = False

    def _run(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self.example.clone()  # in-place ops must not touch the caller's tensor
        if kind == "get_attr":
            return functools.reduce(getattr, target.split("."), self.root)
        if kind == "call_module":
            return self.root.get_submodule(target)(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        return target(*args, **kwargs)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self.concretise(obj, bool)

    def concretise(self, proxy: fx.Proxy, convert: Callable) -> Any:
        """``convert(value)`` of ``proxy`` as a Python value, recorded as a specialisation; refused for tensor data."""
        value = proxy.gpdc_value if isinstance(proxy, ConcreteProxy) else UNKNOWN
        name = convert.__name__
        if value is UNKNOWN:
            known = (f"its value could not be computed for the example input ({self.failed_eval})"
                     if self.example is not None else
                     "it is only known when tracing with an example input: gpdc.trace(model, input_shape) or "
                     "gpdc.symbolic_trace(model, example=x)")
            raise TraceError(f"{name}() needs the Python value of a traced expression, and {known}")
        is_length = convert is len and isinstance(value, (torch.Tensor, tuple, list))
        if not (is_length or proxy.gpdc_meta_only):
            raise ValueDependentError(
                f"{name}() needs a value computed from tensor data, not only from shapes (value-dependent control flow); "
                "one traced graph cannot take different paths for different data")
        out = convert(value)
        where, code = _user_line()
        entry = {"where": where, "code": code, "value": tuple(out) if isinstance(out, torch.Size) else out,
                 "scope": self.scope.module_path}
        if convert is operator.index:  # torch's argument parser probes index() and may then trace the op anyway
            self._probed.append((entry, proxy))
        else:
            self._settle_probes([])
            self._record(entry)
        return out

    def _settle_probes(self, inputs: list) -> None:
        """Record the index() conversions, except probes by the op now traced on that line with the proxy itself."""
        here = _user_line()[0] if inputs else None
        for entry, proxy in self._probed:
            if not (entry["where"] == here and any(p is proxy for p in inputs)):
                self._record(entry)
        self._probed.clear()

    def _record(self, entry: dict) -> None:
        if entry not in self.specialised:
            self.specialised.append(entry)


def _proxies_in(a: Any) -> list[fx.Proxy]:
    found: list[fx.Proxy] = []
    map_aggregate(a, lambda x: found.append(x) if isinstance(x, fx.Proxy) else None)
    return found


def _reads_metadata(kind: str, target: Any, args: tuple) -> bool:
    """Whether the op reads only shapes/dtypes of its tensor arguments, never their data."""
    if kind == "call_method":
        return target in META_METHODS
    if kind == "call_function":
        return any(target is f for f in META_FUNCTIONS) or target is getattr and args[1] in META_ATTRS
    return False
