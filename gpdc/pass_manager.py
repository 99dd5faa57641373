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
    name = "pass"

    def call(self, gm: fx.GraphModule) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        try:
            result = self.call(gm)
        except GpdcError:
            raise
        except Exception as e:
            raise PassError(f"internal error in pass '{self.name}': {type(e).__name__}: {e}. This is a gpdc bug; "
                            "please report it with the model and spec.") from e
        try:
            result.graph_module.graph.lint()
            result.graph_module.recompile()
        except Exception as e:
            raise PassError(f"internal error: pass '{self.name}' produced an invalid graph: {e}. This is a gpdc bug; "
                            "please report it with the model and spec.") from e
        return result


def run_passes(gm: fx.GraphModule, passes: tuple[Pass, ...]) -> tuple[fx.GraphModule, list[PassResult]]:
    results = []
    for p in passes:
        r = p(gm)
        results.append(r)
        gm = r.graph_module
    return gm, results
