"""Channel analysis: channel spaces, layouts and coupled groups over the student graph.

One walk over the traced graph applies each node's channel rule (``gpdc.rules``). Producers (conv,
linear) open new spaces; ops that force equal channels (residual add, SE gating, depthwise conv)
couple spaces into one group that must widen with one channel map. Couplings are kept as a
networkx graph so an error can name the nodes that tie two layers together. Spaces that reach the
model output (the logits) or that meet an unwidened tensor channel-for-channel are pinned.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import networkx as nx
import numpy as np
import torch.fx as fx

from .errors import CouplingError, GpdcError, InternalError, RuleError, UnmatchableError
from .coupling import Coupling
from .layout import Layout, SplitLayout
from .outputs import LeafPath, graph_leaves, is_structure_node
from .rules.context import FACTS, check_facts
from .rules.registry import find_rule


@dataclass
class Group:
    """A coupled channel group: spaces that widen together with one channel map."""

    id: int
    spaces: list[int]
    width: int
    layers: list[str]  # modules whose output channels are exactly this group's
    pinned: str | None
    quantum: int  # channels per block that widens as a whole (1, or mixed blocks: 0)
    couplings: list[str] = field(default_factory=list)  # node names that coupled its spaces
    space_widths: list[int] = field(default_factory=list)  # widths of its spaces (equal unless coupled per channel)
    units: list = field(default_factory=list, repr=False)  # global channel ids of each block that widens whole
    unit_sizes: list[int] = field(default_factory=list, repr=False)  # distinct channels per block
    # filled by the plan:
    teacher_width: int | None = None
    ratio: float | None = None
    rule: str | None = None

    def summary(self) -> dict:
        return {
            "group": self.id,
            "layers": self.layers,
            "C": self.width,
            "C_teacher": self.teacher_width,
            "ratio": self.ratio,
            "rule": self.rule,
            "pinned": self.pinned,
            "quantum": self.quantum,
            "coupled_by": self.couplings,
            "per_channel": len(set(self.space_widths)) > 1,
        }


def node_label(node: fx.Node) -> str:
    scope = node.meta.get("gpdc.scope", "")
    return f"'{node.name}'" + (f" (in '{scope}')" if scope and scope != node.target else "")


class ChannelAnalysis:
    """Layouts of every node's output and the coupled channel groups of the student graph."""

    def __init__(self, gm: fx.GraphModule, free_outputs: list[str] = (), unwidenable: str = "student_width"):
        self.gm = gm
        self.free_patterns = list(free_outputs)
        self.unwidenable = unwidenable  # expand.unwidenable: run such ops at the student's width, or stop
        from .rules.integrations import register_integrations  # noqa: PLC0415 (the rules build on this module)

        register_integrations()
        self.modules = dict(gm.named_modules())
        self.at_student_width: dict[fx.Node, str] = {}  # reshapes whose split channels no consumer can take
        for _ in range(len(gm.graph.nodes)):
            self._reset()
            try:
                self._run()
                return
            except _SplitUnfollowed as e:  # run again with the reshape that split the channels unwidened
                self.at_student_width[e.origin] = e.reason

    def _reset(self) -> None:
        for node in self.gm.graph.nodes:
            node.meta.pop(FACTS, None)
        self.free_outputs: dict[LeafPath, fx.Node] = {}  # output leaves that widen (expand.free_outputs)
        self.pinned_outputs: dict[LeafPath, fx.Node] = {}  # output leaves that carry channels and stay put
        self.coupling = Coupling()
        self.layouts: dict[fx.Node, object] = {}
        self.rules: dict[fx.Node, object] = {}
        self._input_dependent: dict[fx.Node, bool] = {}

    # -- spaces and coupling (gpdc.coupling) -------------------------------------------------
    @property
    def spaces(self):
        return self.coupling.spaces

    def record(self, node: fx.Node, facts) -> None:
        """Hand ``facts`` (a frozen dataclass) from the node's rule to its expansion (``node.meta``)."""
        check_facts(node, facts)
        node.meta[FACTS] = facts

    def facts(self, node: fx.Node):
        """What the node's rule recorded (None if nothing)."""
        return node.meta.get(FACTS)

    def assign(self, node: fx.Node, layout: Layout, rule) -> None:
        """Give an earlier node (a parameter's chain of shape ops) its layout and the rule that expands it."""
        self.layouts[node] = layout
        self.rules[node] = rule

    def new_space(self, width: int, origin: fx.Node, pinned: str | None = None) -> int:
        return self.coupling.new_space(width, origin.name, pinned)

    def find(self, s: int) -> int:
        """The representative space of the group of space ``s``."""
        return self.coupling.space_sets.find(s)

    def channel_keys(self, L: Layout) -> np.ndarray:
        return self.coupling.keys(L)

    def pinned_layout(self, node: fx.Node, dim: int, width: int, reason: str) -> Layout:
        return Layout.of_space(dim, self.new_space(width, node, reason), width)

    def pin(self, layout: Layout, reason: str) -> None:
        for s in layout.spaces():
            sp = self.spaces[s]
            sp.pinned = sp.pinned or reason

    def set_quantum(self, layout: Layout, q: int, node: fx.Node) -> None:
        """Runs of ``q`` consecutive channels of ``layout`` widen as whole blocks (grouped convs, heads)."""
        if q > 1:
            self.coupling.same_multiplicity(layout, q, node.name)

    def align(self, a: Layout, b: Layout, node: fx.Node) -> None:
        """Channels at equal positions of ``a`` and ``b`` widen alike (same multiplicity) but stay distinct."""
        self.coupling.align(a, b, node.name)

    def aligned_space(self, L: Layout, node: fx.Node) -> Layout:
        """A new space of ``L.width`` channels, one per position of ``L``, that widens like them: how a
        concat tells apart two tensors holding the same channels."""
        fresh = Layout.of_space(L.dim, self.new_space(L.width, node), L.width)
        self.align(L, fresh, node)
        return fresh

    def couple(self, a: Layout, b: Layout, node: fx.Node) -> None:
        """Channels at equal positions of ``a`` and ``b`` must be the same channel (one per position, so
        residual adds onto slices, concats and shuffles couple exactly the channels they meet)."""
        if a.width != b.width or not np.array_equal(a.sub, b.sub):
            raise CouplingError(
                f"node {node_label(node)} combines two tensors channel by channel whose channel dims do not line "
                f"up ({a.width} vs {b.width} channels, or flattened spatial positions in a different order), so no "
                "channel map can widen both. Register a channel rule for this op (gpdc.register_function_rule) or "
                "keep these layers at ratio 1."
            )
        self.coupling.tie(a, b, node.name)

    # -- walk -------------------------------------------------------------------------------
    def layout_of(self, arg):
        if isinstance(arg, fx.Node):
            return self.layouts.get(arg)
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.layout_of(a) for a in arg)
        if isinstance(arg, dict):
            return {k: self.layout_of(a) for k, a in arg.items()}
        return None

    def depends_on_input(self, node: fx.Node) -> bool:
        """Whether ``node``'s value depends on the model's input (else it is computed from parameters,
        buffers and constants alone)."""
        return self._input_dependent[node]

    def module(self, node: fx.Node):
        return self.modules[node.target] if node.op == "call_module" else None

    def _run(self) -> None:
        for node in self.gm.graph.nodes:
            self._input_dependent[node] = node.op == "placeholder" or any(
                self._input_dependent[a] for a in node.all_input_nodes)
            if node.op == "placeholder":
                self.layouts[node] = None
                continue
            if node.op == "output":
                self._pin_outputs(node)
                continue
            if is_structure_node(node) and all(u.op == "output" for u in node.users):
                self.layouts[node] = None  # a namedtuple/dataclass/OrderedDict output: its leaves are pinned one by one
                continue
            rule = find_rule(node, self)
            inputs = [a for a in flatten_layouts(self.layout_of((node.args, node.kwargs))) if a is not None]
            produces_tensor = node.meta.get("gpdc.shape") is not None
            if rule is None or not (inputs or rule.opens_space):
                if rule is None and inputs and produces_tensor:
                    raise RuleError(_no_rule_message(node, self))
                self.layouts[node] = None
                continue
            self.rules[node] = rule
            with rule_errors("analyze", node, rule):
                self.layouts[node] = self._analyze(node, rule)
        self._check_splits_consumed()
        self._check_channels_distinct()

    def _analyze(self, node: fx.Node, rule):
        """The layout the rule gives the node's output. An op its rule cannot widen (channels moved into the batch
        dim, a split it cannot follow) runs at the student's width instead, with the rule's finding as the reason
        (``gpdc.rules.student_width``): exact, and reported."""
        from .rules.student_width import STUDENT_WIDTH, gatherable, run_at_student_width  # noqa: PLC0415

        if node in self.at_student_width:
            self.rules[node] = STUDENT_WIDTH
            return run_at_student_width(node, self, self.at_student_width[node])
        try:
            return rule.analyze(node, self)
        except (RuleError, CouplingError) as e:
            if isinstance(e, UnmatchableError) or self.unwidenable == "error":
                raise
            if not gatherable(node, self):
                self._unsplit(node, str(e))
                raise
            self.rules[node] = STUDENT_WIDTH
            return run_at_student_width(node, self, f"{type(rule).__name__} cannot widen it ({e})")

    def _unsplit(self, consumer: fx.Node, why: str) -> None:
        """A consumer that cannot take a channel dim split across dims: if the reshape that split it can run at
        the student's width instead, start the analysis again with it there."""
        node = next((a for a in consumer.all_input_nodes if isinstance(self.layouts.get(a), SplitLayout)), None)
        if node is None:
            return
        while (up := next((a for a in node.all_input_nodes if isinstance(self.layouts.get(a), SplitLayout)), None)):
            node = up
        if node not in self.at_student_width:
            raise _SplitUnfollowed(node, f"it splits the channel dim across dims, and {node_label(consumer)} cannot "
                                         f"take that ({why})")

    def _pin_outputs(self, node: fx.Node) -> None:
        """Output leaves keep their width unless ``expand.free_outputs`` frees them."""
        for path, leaf in graph_leaves(node.args[0]):
            lay = self.layouts.get(leaf) if isinstance(leaf, fx.Node) else None
            if lay is None:
                continue
            if isinstance(lay, SplitLayout):
                raise RuleError(f"the model output {path} is a tensor whose channel dim is split by a reshape; gpdc "
                                "cannot widen it.")
            if path.matches(self.free_patterns):
                self.free_outputs[path] = leaf
                continue
            self.pinned_outputs[path] = leaf
            hint = (f"free it with expand.free_outputs: ['{path.key}']" if path.key
                    else "the logits never widen")
            self.pin(lay, f"reaches the model output {path} ({hint})")

    def _check_splits_consumed(self) -> None:
        for node, lay in self.layouts.items():
            if isinstance(lay, SplitLayout):
                for user in node.users:
                    if not getattr(self.rules.get(user), "accepts_split", False):
                        if self.unwidenable != "error":
                            self._unsplit(user, "it is consumed before the channels are merged back")
                        raise RuleError(
                            f"node {node_label(node)} spreads the channel dim over several dims "
                            f"(a reshape such as a channel shuffle) and {node_label(user)} consumes it before it is "
                            "merged back; gpdc only follows such reshapes through other reshapes/transposes."
                        )

    def _check_channels_distinct(self) -> None:
        """No tensor holds one channel twice. A concat of two tensors of one coupled space tells its parts
        apart when it sees them; spaces coupled only *after* the concat would collide here."""
        for node, lay in self.layouts.items():
            if isinstance(lay, Layout) and lay.width > 1:
                if len(np.unique(self.channel_keys(lay))) < lay.width:
                    raise CouplingError(
                        f"node {node_label(node)} holds channels that residual adds or gates tie to each other (e.g. "
                        "`x + x.flip(1)`, or a concat of two branches whose outputs are added further on); gpdc "
                        "cannot tell their copies apart. Keep these layers at ratio 1 or register a rule for the block.")

    def channel_dims(self) -> dict[str, int]:
        """Each node's channel dimension (node name → dim, non-negative), where its value carries one tensor's
        channels: what feature taps read channels from (an NHWC tensor inside a ConvNeXt block has them at 3)."""
        return {n.name: L.dim % len(n.meta["gpdc.shape"]) for n, L in self.layouts.items()
                if isinstance(L, Layout) and isinstance(n.meta.get("gpdc.shape"), tuple) and n.meta["gpdc.shape"]}

    # -- groups -----------------------------------------------------------------------------
    def groups(self) -> list[Group]:
        """One group per set of spaces connected by couplings; its width counts distinct channels."""
        by_root: dict[int, list[int]] = {}
        for s in range(len(self.spaces)):
            by_root.setdefault(self.find(s), []).append(s)
        layer_of: dict[int, list[str]] = {}
        for node, lay in self.layouts.items():
            if node.op == "call_module" and isinstance(lay, Layout) and lay.width:
                roots = {self.find(s) for s in lay.spaces()}
                if len(roots) == 1:
                    layer_of.setdefault(roots.pop(), []).append(node.target)
        groups = []
        for root, members in sorted(by_root.items()):
            sp = [self.spaces[s] for s in members]
            units, sizes = self._units(members)
            edges = self.coupling.graph.subgraph(members).edges(data="node")
            groups.append(Group(
                id=len(groups), spaces=members, width=sum(sizes), layers=layer_of.get(root, []),
                pinned=next((s.pinned for s in sp if s.pinned), None),
                quantum=sizes[0] if len(set(sizes)) == 1 else 0, couplings=sorted({n for _, _, n in edges}),
                space_widths=[s.width for s in sp], units=units, unit_sizes=sizes))
        return groups

    def _units(self, spaces: list[int]) -> tuple[list[np.ndarray], list[int]]:
        """The blocks of channels that widen as a whole, in order of their first channel: their global
        channel ids and how many distinct (coupled) channels each holds."""
        c = self.coupling
        ids = np.concatenate([c.space_ids(s) for s in spaces])
        block, chan = c.blocks.roots(ids), c.channels.roots(ids)
        order = np.argsort(block, kind="stable")
        cuts = np.flatnonzero(np.diff(block[order])) + 1
        units = np.split(ids[order], cuts)
        sizes = [len(np.unique(part)) for part in np.split(chan[order], cuts)]
        return units, sizes

    def coupling_path(self, a: int, b: int) -> list[str]:
        """Names of the nodes that couple spaces ``a`` and ``b``."""
        g = self.coupling.graph
        path = nx.shortest_path(g, a, b)
        return [g.edges[u, v]["node"] for u, v in zip(path, path[1:])]


class _SplitUnfollowed(Exception):
    """The analysis must run again with ``origin`` (a reshape splitting the channel dim) at the student's width."""

    def __init__(self, origin: fx.Node, reason: str):
        super().__init__(reason)
        self.origin, self.reason = origin, reason


@contextmanager
def rule_errors(stage: str, node: fx.Node, rule) -> Iterator[None]:
    """Turn an unexpected exception inside a rule into a gpdc error naming the stage, node and rule."""
    try:
        yield
    except (GpdcError, _SplitUnfollowed):
        raise
    except Exception as e:
        src = f" ({source_line(node)})" if source_line(node) else ""
        raise InternalError(
            f"internal error in the {stage} stage at node {node_label(node)}{src} (rule {type(rule).__name__}): "
            f"{type(e).__name__}: {str(e).strip()[:400]}. This is a gpdc bug; please report it with the model and "
            "spec. To go on meanwhile, keep the layers around this node at ratio 1 (expand.layers) or register your "
            "own rule for the op (gpdc.register_module_rule / register_function_rule)."
        ) from e


def source_line(node: fx.Node) -> str:
    """``File "...", line N, in f: `code``` for the user's source line that created ``node``, or ''."""
    src = (node.stack_trace or "").strip().splitlines()
    for where, code in reversed(list(zip(src, src[1:]))):
        if where.strip().startswith("File") and "/torch/" not in where and "/gpdc/" not in where:
            return f"{where.strip()}: `{code.strip()}`"
    return ""


def flatten_layouts(v):
    if isinstance(v, (list, tuple)):
        for x in v:
            yield from flatten_layouts(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from flatten_layouts(x)
    else:
        yield v


def _no_rule_message(node: fx.Node, an: ChannelAnalysis) -> str:
    if node.op == "call_module":
        what = f"module '{node.target}' of type {type(an.module(node)).__name__}"
        how = f"gpdc.register_module_rule({type(an.module(node)).__name__}, rule)"
    elif node.op == "call_method":
        what = f"method call '.{node.target}()'"
        how = f"gpdc.register_method_rule('{node.target}', rule)"
    else:
        what = f"{node.op} '{getattr(node.target, '__name__', node.target)}'"
        how = "gpdc.register_function_rule(fn, rule)"
    line = f" Source: {source_line(node)}." if source_line(node) else ""
    return (
        f"no channel rule for node {node_label(node)}: {what} receives widened channels and gpdc does not "
        f"know how it treats the channel dimension.{line} Register a rule with {how}, or, if the op "
        "does not touch channels, register it as elementwise with gpdc.rules.register_elementwise(...)."
    )
