"""SinkParameterChains: move each parameter's chain of shape-only ops to just before the op that uses it.

A parameter that meets widened channels (a layer scale, a position embedding, a functional norm's weight) takes
the layout of the tensor it meets (``gpdc.rules.params.follow``), and its teacher copy follows that tensor's
teacher layout, so the chain must come after that tensor in graph order; torch.fx puts ``get_attr`` nodes where
the attribute is first read, often before. Moving ``get_attr → view → expand ...`` (each with one user) to just
before its consumer keeps the program's meaning and gives the analysis that order.
"""

from __future__ import annotations

import torch.fx as fx

from gpdc.pass_manager import Pass, PassResult
from gpdc.rules.params import is_shape_only


def parameter_chain(attr: fx.Node) -> tuple[list[fx.Node], fx.Node] | None:
    """([get_attr, op, ...], consumer) for a get_attr followed by single-use shape-only ops, or None."""
    chain = [attr]
    while len(chain[-1].users) == 1:
        user = next(iter(chain[-1].users))
        tensor_args = [a for a in user.all_input_nodes if a.meta.get("gpdc.shape") is not None]
        if not (is_shape_only(user) and tensor_args == [chain[-1]]):
            return chain, user
        chain.append(user)
    return None


class SinkParameterChains(Pass):
    name = "sink-parameter-chains"
    requires = frozenset({"traced"})
    ensures = frozenset({"parameter-chains-sunk"})
    in_place = True

    def call(self, gm: fx.GraphModule) -> PassResult:
        moved = []
        for attr in [n for n in gm.graph.nodes if n.op == "get_attr"]:
            found = parameter_chain(attr)
            if found is None or found[0][-1].next is found[1]:
                continue
            chain, consumer = found
            for n in chain:
                consumer.prepend(n)
            moved.append(f"{attr.target}: {len(chain)} node(s) moved before '{consumer.name}'")
        return PassResult(gm, bool(moved), log=moved)
