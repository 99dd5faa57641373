"""Pass infrastructure: the pass contract and a manager that lints after every pass.

A pass is called with a GraphModule and returns a ``PassResult``; the manager lints and recompiles
the result and names the failing pass (and node, where known) when something breaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from .errors import GpdcError, InternalError


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    artifacts: dict[str, Any] = field(default_factory=dict)  # what the pass produced besides the graph
    log: list[str] = field(default_factory=list)  # one line per rewrite, printed by --explain


class PassError(InternalError):
    """A pass failed or produced an invalid graph (a gpdc bug, not bad input)."""


class Pass:
    """A rewrite of a GraphModule. Its contract: the graph properties it ``requires`` (established by earlier
    passes or by tracing: ``traced``), those it ``ensures``, and whether it rewrites the graph it is given
    (``in_place``) or builds a new one and leaves its input untouched."""

    name = "pass"
    requires: frozenset[str] = frozenset()
    ensures: frozenset[str] = frozenset()
    in_place = False

    def call(self, gm: fx.GraphModule) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        before = None if self.in_place else _fingerprint(gm)
        try:
            result = self.call(gm)
        except GpdcError as e:
            if isinstance(e, InternalError) and not str(e).startswith("pass '"):
                raise type(e)(f"pass '{self.name}': {e}") from e
            raise
        except Exception as e:
            raise PassError(f"internal error in pass '{self.name}': {type(e).__name__}: {e}. This is a gpdc bug; "
                            "please report it with the model and spec.") from e
        if self.in_place and result.graph_module is not gm:
            raise PassError(f"internal error: pass '{self.name}' declares in_place but returned a new graph module")
        if before is not None and _fingerprint(gm) != before:
            raise PassError(f"internal error: pass '{self.name}' is not in_place but changed the graph it was given")
        try:
            result.graph_module.graph.lint()
            result.graph_module.recompile()
        except Exception as e:
            raise PassError(f"internal error: pass '{self.name}' produced an invalid graph: {e}. This is a gpdc bug; "
                            "please report it with the model and spec.") from e
        return result


def _fingerprint(gm: fx.GraphModule) -> tuple:
    return tuple((n.name, n.op, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes)


def run_passes(gm: fx.GraphModule, passes: tuple[Pass, ...], have: frozenset[str] = frozenset({"traced"})
               ) -> tuple[fx.GraphModule, list[PassResult]]:
    """Run ``passes`` in order, each only if what it requires holds (``have``: what holds before the first)."""
    results = []
    for p in passes:
        missing = p.requires - have
        if missing:
            raise PassError(f"internal error: pass '{p.name}' requires {sorted(missing)}, which no earlier pass "
                            f"ensures (have {sorted(have)})")
        have = have | p.ensures
        r = p(gm)
        results.append(r)
        gm = r.graph_module
    return gm, results
