"""The rule API and the pass contract: rules touch only the typed contexts (``gpdc/rules/context.py``), the analysis
and the expander provide every member of them, and passes run only when what they require holds, leave their input
alone unless they are in place, and name themselves in errors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import gpdc
from gpdc.analyze import ChannelAnalysis
from gpdc.exactness import check_expansion, randomize
from gpdc.pass_manager import Pass, PassError, PassResult, run_passes
from gpdc.rules.context import AnalysisContext, ExpansionContext
from passes.sink import SinkParameterChains

ROOT = Path(__file__).resolve().parent.parent
RULE_FILES = sorted((ROOT / "gpdc" / "rules").glob("*.py")) + [ROOT / "examples" / "custom_rule.py"]


def members(protocol) -> set[str]:
    own = {k for k in vars(protocol) if not k.startswith("_")}
    return own | set(protocol.__annotations__)


def context_uses(path: Path) -> list[tuple[str, str, int]]:
    """(context, attribute, line) for every ``an.x``, ``ex.x`` and ``ex.an.x`` in a file."""
    uses = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        v = node.value
        if isinstance(v, ast.Name) and v.id in ("an", "ex"):
            uses.append((v.id, node.attr, node.lineno))
        elif isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name) and (v.value.id, v.attr) == ("ex", "an"):
            uses.append(("an", node.attr, node.lineno))
    return uses


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rules_use_only_the_typed_contexts(path):
    allowed = {"an": members(AnalysisContext), "ex": members(ExpansionContext)}
    outside = [f"{path.name}:{line}: {ctx}.{attr}" for ctx, attr, line in context_uses(path) if attr not in allowed[ctx]]
    assert not outside, f"rules reach past AnalysisContext/ExpansionContext: {outside}"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)  # a layer scale read before the conv it scales
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        g = self.gamma.view(1, -1, 1, 1)
        return self.fc((self.stem(x) * g).mean((2, 3)))


def test_analysis_and_expander_provide_every_context_member():
    exp = gpdc.expand(Net(), {"input_shape": [2, 3, 8, 8]})
    an = ChannelAnalysis(exp.original)
    assert [m for m in members(AnalysisContext) if not hasattr(an, m)] == []
    from passes.expand import _Expander

    ex = _Expander(exp.original, an, exp.plan, exp.param_map)
    assert [m for m in members(ExpansionContext) if not hasattr(ex, m)] == []


def test_sink_pass_moves_a_parameter_chain_before_its_consumer_and_keeps_the_function():
    gm = gpdc.trace(Net(), [2, 3, 8, 8])
    x = torch.randn(2, 3, 8, 8)
    before = gm(x)
    order = [n.name for n in gm.graph.nodes]
    assert order.index("gamma") < order.index("stem")
    gm, (result,) = run_passes(gm, (SinkParameterChains(),))
    order = [n.name for n in gm.graph.nodes]
    assert order.index("stem") < order.index("gamma") < order.index("view") < order.index("mul")
    assert result.modified and "gamma: 2 node(s) moved before 'mul'" in result.log
    torch.testing.assert_close(gm(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["replicate", "grow"])
def test_a_parameter_read_before_its_partner_follows_it_exactly(strategy):
    exp = gpdc.expand(randomize(Net().eval()), {"input_shape": [2, 3, 8, 8], "expand": {"ratio": 1.5, "strategy": strategy}})
    assert exp.teacher.get_parameter("gamma").shape == (12,)
    assert all(c["ok"] for c in check_expansion(exp, torch.randn(2, 3, 8, 8)).values())


class _Touches(Pass):
    name = "touches"
    requires = frozenset({"traced"})

    def call(self, gm):
        next(iter(gm.graph.nodes)).name = "renamed"  # a pass that claims to build a new graph but edits its input
        return PassResult(gm, True)


class _NeedsTeacher(Pass):
    name = "needs-teacher"
    requires = frozenset({"teacher"})

    def call(self, gm):  # pragma: no cover - never runs
        return PassResult(gm, False)


def test_pass_contract_is_enforced_and_errors_name_the_pass():
    gm = gpdc.trace(Net(), [2, 3, 8, 8])
    with pytest.raises(PassError, match="pass 'needs-teacher' requires \\['teacher'\\]"):
        run_passes(gm, (_NeedsTeacher(),))
    with pytest.raises(PassError, match="pass 'touches' is not in_place but changed the graph"):
        run_passes(gm, (_Touches(),))
