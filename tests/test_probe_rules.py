"""No rule needed for plain math (issue 11, item 4): ops without a registered rule are probed, and functional
convolutions and linears follow their modules' rules whatever holds the weight.

Every accepted model expands exactly by DESIGN.md §4 (float32 error against a float64 reference at most
``max(1e-5 · max(1, max|ref|), 10 · the original's own float32 error)``, teacher and shared student, norms in eval
and train mode) at r = 2 and 1.5 under both strategies, and its folded student equals the shared student
(≤ 1e-5 relative). Ops that mix, sort, reduce or randomise channels are refused with one paragraph naming the op,
the node, what the probe found and the registration call; the CLI exits 2.
"""

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gpdc
from gpdc.cli import main
from gpdc.exactness import check_expansion, max_rel_difference, randomize
from gpdc.rules import probe

STRATEGIES = ("replicate", "grow")
CASES = [(r, s) for r in (2.0, 1.5) for s in STRATEGIES]
SIZE = 8


@gpdc.register_leaf_function
def swishish(x):
    return x * torch.sigmoid(1.7 * x)


@gpdc.register_leaf_module
class Swishish(nn.Module):
    """A custom activation module without parameters, kept as one node."""

    def forward(self, x):
        return x * torch.sigmoid(1.7 * x)


@gpdc.register_leaf_module
class ChannelCentre(nn.Module):
    """A parameter-free module that reads across channels."""

    def forward(self, x):
        return x - x.mean(1, keepdim=True)


@gpdc.register_leaf_module
class Scale(nn.Module):
    """A leaf module with a parameter and no rule: not probed (its parameter would have to widen)."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.full((8, 1, 1), 2.0))

    def forward(self, x):
        return x * self.s


class Block(nn.Module):
    """conv → BN → op → conv → global mean → linear: the op sees widened channels and feeds a widened layer."""

    def __init__(self, op):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.op = op
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.conv(self.op(self.bn(self.stem(x)))).mean((2, 3)))


def expand(model, ratio=1.5, strategy="replicate"):
    spec = {"input_shape": [2, 3, SIZE, SIZE], "expand": {"ratio": ratio, "strategy": strategy}}
    return gpdc.expand(model, spec)


def expand_exactly(model, ratio, strategy):
    """Expand a randomised ``model``; teacher and shared student exact, the folded student equal to the shared one."""
    exp = expand(randomize(model.eval()), ratio, strategy)
    checks = check_expansion(exp, torch.randn(2, 3, SIZE, SIZE))
    assert all(c["ok"] for c in checks.values()), checks
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert max_rel_difference(exp.student(x), exp.fold()(x))[0] <= 1e-5
    assert sum(g.teacher_width > g.width for g in exp.groups) >= 1
    return exp


# --------------------------------------------------------------------- plain math, probed and accepted

ACCEPTED = {
    "pow": lambda x: x.pow(2),
    "square": torch.square,
    "rsqrt": lambda x: torch.rsqrt(x.abs() + 1),
    "spatial_softmax": lambda x: F.softmax(x.flatten(2), dim=-1).view_as(x),
    "unbind_spatial_then_stack": lambda x: torch.stack(torch.unbind(x, dim=2), dim=2),
    "where": lambda x: torch.where(x > 0, x, 0.1 * x),
    "erf": torch.erf,
    "logsigmoid": F.logsigmoid,
    "leaf_function": lambda x: swishish(x),
    "leaf_module": Swishish(),
    "nn_softmax_spatial": nn.Softmax(dim=-1),
    "max_values": lambda x: x - x.max(dim=-1).values.unsqueeze(-1),
    "sort_spatial": lambda x: torch.sort(x, dim=2).values,
    "in_place": lambda x: x.erf_(),
}


@pytest.mark.parametrize("ratio,strategy", CASES)
@pytest.mark.parametrize("name", ACCEPTED)
def test_channelwise_op_without_rule_expands_exactly(name, ratio, strategy):
    exp = expand_exactly(Block(ACCEPTED[name]), ratio, strategy)
    assert any("followed by probing" in line for line in exp.log), exp.log
    assert exp.groups[1].teacher_width == int(8 * ratio)  # the op's channels widened


class LerpGate(nn.Module):
    """A one-channel spatial gate broadcast onto the channels inside a probed op (``torch.lerp``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = nn.Conv2d(8, 1, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(torch.lerp(x, -x, torch.sigmoid(self.gate(x))).mean((2, 3)))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_channel_gate_broadcast_in_a_probed_op_keeps_its_channel(strategy):
    exp = expand_exactly(LerpGate(), 2.0, strategy)
    assert {g.layers[0]: g.teacher_width for g in exp.groups if g.layers} == {"stem": 16, "gate": 1, "fc": 5}


def test_leaf_function_is_one_probed_node():
    exp = expand(Block(ACCEPTED["leaf_function"]))
    assert any(n.target is swishish for n in exp.original.graph.nodes)
    assert any("swishish" in line and "followed by probing" in line for line in exp.log), exp.log


def test_verdicts_are_cached_per_op(monkeypatch):
    """Three erf nodes: one probe."""
    calls = []
    real = probe._Probe.verdict
    monkeypatch.setattr(probe.PROBED, "verdicts", {})
    monkeypatch.setattr(probe._Probe, "verdict", lambda self: calls.append(self.node.name) or real(self))
    expand_exactly(Block(lambda x: torch.erf(torch.erf(torch.erf(x)))), 1.5, "replicate")
    assert calls == ["erf"]


# --------------------------------------------------------------------- plain math that mixes channels

def expand_at_student_width(model, ratio=1.5, strategy="replicate", name=None):
    """Expand exactly; the node ``name`` (default: the Block's op) and only it runs at the student's width
    (gpdc.rules.student_width): its inputs are gathered to the student's channels and it keeps its own width."""
    exp = expand_exactly(model, ratio, strategy)
    assert list(exp.report()["student_width_ops"]) == [name or op_node(exp).name], exp.report()["student_width_ops"]
    return exp


def op_node(exp):
    """The node of the Block's op (the one between BN and conv)."""
    bn = next(n for n in exp.original.graph.nodes if n.target == "bn")
    return next(iter(bn.users))


MIXING = {  # op, (node label, op name, finding), whether its output keeps the input's (widened) channels
    "cumsum_channels": (lambda x: torch.cumsum(x, 1), ("cumsum", "torch.cumsum", "mixes channels"), True),
    "flip_channels": (lambda x: x.flip(1), ("flip", "method '.flip()'", "mixes channels"), True),
    "softmax_channels": (lambda x: F.softmax(x, dim=1),
                         ("softmax", "torch.nn.functional.softmax", "changes when channels are duplicated"), True),
    "l2_normalize_channels": (lambda x: F.normalize(x, dim=1),
                              ("normalize", "torch.nn.functional.normalize", "changes when channels are duplicated"),
                              True),
    "sort_channels": (lambda x: torch.sort(x, dim=1).values, ("sort", "torch.sort", "mixes channels"), False),
    "channel_max": (lambda x: x.amax(1, keepdim=True).expand(-1, 8, -1, -1).contiguous(),
                    ("amax", "method '.amax()'", "reduces over the channel dim"), False),
    "module_reading_across_channels": (ChannelCentre(), ("op", "module 'op' of type ChannelCentre",
                                                         "gpdc.register_module_rule(ChannelCentre, rule)"), True),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", MIXING)
def test_op_that_is_not_channelwise_runs_at_the_student_width_naming_why_and_the_fix(name, strategy):
    op, (label, what, finding), keeps = MIXING[name]
    exp = expand_at_student_width(Block(op), 2.0, strategy)
    reason = exp.report()["student_width_ops"][op_node(exp).name]
    assert op_node(exp).name.startswith(label) and what in reason and finding in reason and "register_" in reason
    explained = next(line for line in exp.log if "runs at the student's width" in line)
    assert ("copied to the teacher's 16 channels" in explained) == keeps, explained
    conv_in = exp.teacher.get_submodule("conv").in_channels
    assert conv_in == (16 if keeps else 8), "what follows widens only if the op's output keeps the channels"


def test_random_op_is_refused_naming_op_node_and_fix():
    with pytest.raises(gpdc.RuleError) as e:
        expand(Block(lambda x: x + torch.rand_like(x)))
    msg = str(e.value)
    assert "probing it on random tensors" in msg and "Source:" in msg and "test_probe_rules.py" in msg, msg
    assert "it is random" in msg and "torch.rand_like" in msg and "register_function_rule" in msg, msg
    assert "\n" not in msg, msg


@gpdc.register_leaf_function
def tanh_of_eight(x):
    b, _, h, w = x.shape
    return torch.tanh(x.reshape(b, 8, h, w))  # hard-codes the student's 8 channels


@gpdc.register_leaf_function
def checked_log(x):
    assert bool((x > 0).all()), "expects positive values"
    return torch.log(x)


def test_op_that_fails_once_widened_runs_at_the_student_width():
    exp = expand_at_student_width(Block(lambda x: tanh_of_eight(x)))
    reason = exp.report()["student_width_ops"]["tanh_of_eight"]
    assert "fails once its channel dim widens (with more channels: RuntimeError" in reason, reason
    assert "register_elementwise" not in reason, reason


def test_op_the_probe_cannot_run_runs_at_the_student_width_with_the_one_line_fix():
    exp = expand_at_student_width(Block(lambda x: checked_log(x.abs() + 1)), name="checked_log")
    reason = exp.report()["student_width_ops"]["checked_log"]
    assert "fails on probe tensors (on probe tensors: AssertionError: expects positive values)" in reason, reason
    assert "gpdc.register_elementwise(" in reason and "checked_log) if it acts on each channel alike" in reason, reason
    gpdc.register_elementwise(checked_log)  # it does: log of each value
    exp = expand_exactly(Block(lambda x: checked_log(x.abs() + 1)), 1.5, "grow")
    assert exp.report()["student_width_ops"] == {}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_leaf_module_with_parameters_and_no_rule_runs_at_the_student_width(strategy):
    exp = expand_at_student_width(Block(Scale()), 2.0, strategy)
    assert exp.report()["student_width_ops"] == {"op": "module of type Scale has parameters and no channel rule"}
    assert exp.teacher.get_parameter("op.s").shape == (8, 1, 1)
    assert exp.param_map.sources["op.s"] is not None  # shared with the student, unchanged


class Recurrent(nn.Module):
    """conv → tokens → bidirectional LSTM (a leaf module with parameters) → linear back onto the tokens."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.lstm = nn.LSTM(8, 6, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(12, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        out, _ = self.lstm(t)
        return self.fc((t + self.proj(out)).mean(1))


@pytest.mark.parametrize("ratio,strategy", [(2.0, "replicate"), (1.5, "grow")])
def test_lstm_over_channels_runs_at_the_student_width_and_the_rest_widens(ratio, strategy):
    exp = expand(randomize(Recurrent().eval()), ratio, strategy)
    assert all(c["ok"] for c in check_expansion(exp, torch.randn(2, 3, SIZE, SIZE)).values())
    assert list(exp.report()["student_width_ops"]) == ["lstm"]
    assert exp.teacher.get_submodule("stem").out_channels == exp.teacher.get_submodule("proj").out_features > 8


# --------------------------------------------------------------------- the property, over unary functions

UNARY = [  # (name, function, acts on each channel alike)
    ("erf", torch.erf, True), ("expm1", torch.expm1, True), ("atan", torch.atan, True), ("sinc", torch.sinc, True),
    ("logcumsumexp_w", lambda x: torch.logcumsumexp(x, 3), True),
    ("cummax_h", lambda x: torch.cummax(x, 2).values, True),
    ("softmax_w", lambda x: torch.softmax(x, -1), True),
    ("normalize_w", lambda x: F.normalize(x, dim=-1), True),
    ("cumsum_c", lambda x: torch.cumsum(x, 1), False),
    ("flip_c", lambda x: torch.flip(x, (1,)), False),
    ("softmax_c", lambda x: torch.softmax(x, 1), False),
    ("normalize_c", lambda x: F.normalize(x, dim=1), False),
    ("cummax_c", lambda x: torch.cummax(x, 1).values, False),
    ("logsumexp_c", lambda x: x - torch.logsumexp(x, 1, keepdim=True), False),
    ("amax_c", lambda x: x / x.abs().amax(1, keepdim=True), False),
]


@settings(max_examples=16, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(UNARY), ratio=st.sampled_from([1.25, 1.5, 2.0, 3.0]), strategy=st.sampled_from(STRATEGIES))
def test_probe_accepts_exactly_the_channelwise_functions_and_they_expand_exactly(op, ratio, strategy):
    _, fn, channelwise = op
    exp = expand_exactly(Block(fn), ratio, strategy)
    assert bool(exp.report()["student_width_ops"]) != channelwise, exp.report()["student_width_ops"]


# --------------------------------------------------------------------- functional convolutions and linears

class FunctionalConv(nn.Module):
    """A conv whose module holds the weight itself and calls F.conv2d: dense, grouped or depthwise."""

    def __init__(self, groups=1, buffer=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        weight = torch.randn(8, 8 // groups, 3, 3) * 0.3
        if buffer:
            self.register_buffer("weight", weight)
        else:
            self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.randn(8) * 0.1)
        self.groups = groups
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = F.conv2d(x, self.weight, self.bias, padding=1, groups=self.groups)
        return self.fc(x.mean((2, 3)))


class FunctionalMLP(nn.Module):
    """F.linear with a parameter reshaped and cast on the way, then one with a bias."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(1, 12, 8) * 0.3)
        self.w2 = nn.Parameter(torch.randn(5, 12) * 0.3)
        self.b2 = nn.Parameter(torch.randn(5) * 0.1)

    def forward(self, x):
        h = self.stem(x).mean((2, 3))
        h = F.gelu(F.linear(h, self.w.view(12, 8).to(h.dtype)))
        return F.linear(h, self.w2, self.b2)


class UnfoldConv(nn.Module):
    """A 3x3 conv as F.unfold (channel-major blocks) and a functional 1-d conv over the unfolded channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(6, 72, 1) * 0.1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(F.conv1d(F.unfold(self.stem(x), 3, padding=1), self.w).mean(-1))


class Repeated(nn.Module):
    """``x.repeat`` over channels (block-major copies) into a conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(16, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.conv(self.stem(x).repeat(1, 2, 1, 1)).mean((2, 3)))


FUNCTIONAL = {
    "conv_dense": lambda: FunctionalConv(),
    "conv_grouped": lambda: FunctionalConv(groups=2),
    "conv_depthwise": lambda: FunctionalConv(groups=8),
    "conv_weight_buffer": lambda: FunctionalConv(buffer=True),
    "conv_depthwise_weight_buffer": lambda: FunctionalConv(groups=8, buffer=True),
    "linear": FunctionalMLP,
    "unfold_conv1d": UnfoldConv,
    "repeat_channels": Repeated,
}


@pytest.mark.parametrize("ratio,strategy", CASES)
@pytest.mark.parametrize("name", FUNCTIONAL)
def test_functional_layer_expands_exactly(name, ratio, strategy):
    model = FUNCTIONAL[name]()
    exp = expand_exactly(model, ratio, strategy)
    assert sum(p.numel() for p in exp.teacher.parameters()) > sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_functional_conv_parameter_is_widened_and_shared(groups):
    model = randomize(FunctionalConv(groups).eval())
    exp = expand(model, 2.0)
    teacher_w = exp.teacher.get_parameter("weight")
    assert teacher_w.shape[0] == 16 and teacher_w.shape[1] == (16 if groups == 1 else 8 // groups)
    assert set(exp.param_map.sources["weight"].index) == ({0, 1} if groups == 1 else {0})
    shared = exp.student.shared_parameters()
    torch.testing.assert_close(shared["weight"], model.weight.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(shared["bias"], model.bias.detach(), rtol=0, atol=0)


class WeightStandardised(nn.Module):
    def __init__(self, on_data=False):
        super().__init__()
        self.on_data = on_data
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(8, 3 if on_data else 8, 3, 3))
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        x = F.conv2d(x if self.on_data else self.stem(x), w, padding=1)
        return self.fc(self.conv(torch.relu(x)).mean((2, 3)))


class SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(8, 8, 1, 1) * 0.3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.conv2d(F.conv2d(self.stem(x), self.w), self.w).mean((2, 3)))


class DynamicWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.base = nn.Parameter(torch.randn(8, 8, 1, 1) * 0.3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = self.stem(x)
        return self.fc(F.conv2d(h, self.base * torch.sigmoid(h.mean())).mean((2, 3)))


def test_input_dependent_functional_weight_runs_at_the_student_width():
    exp = expand(randomize(DynamicWeight().eval()), 2.0)
    assert all(c["ok"] for c in check_expansion(exp, torch.randn(2, 3, SIZE, SIZE)).values())
    (name, why), = exp.report()["student_width_ops"].items()
    assert name == "conv2d" and "depends on the model's input" in why, why
    with pytest.raises(gpdc.RuleError) as e:
        gpdc.expand(DynamicWeight(), {"input_shape": [2, 3, SIZE, SIZE], "expand": {"unwidenable": "error"}})
    msg = str(e.value)
    assert "Source:" in msg and "register_function_rule" in msg and "\n" not in msg, msg
    assert "depends on the model's input" in msg, msg


@pytest.mark.parametrize("model,why", [
    (WeightStandardised, "computed from parameter 'weight' by '.mean()'"),
    (SharedWeight, "parameter 'w', which other nodes use as well"),
], ids=["weight_standardisation", "shared_parameter"])
@pytest.mark.parametrize("ratio,strategy", [(2.0, "replicate"), (1.5, "grow")])
def test_weight_computed_from_parameters_is_gathered_exactly(model, why, ratio, strategy):
    """Widening such a parameter would change what the ops compute over its fan-in: the teacher computes the
    weight at the student's size and gathers it (exact, no extra weights there), and says so."""
    exp = expand_exactly(model(), ratio, strategy)
    line = next(line for line in exp.log if "gathered at the student's size" in line)
    assert why in line, line
    student_shapes = {n: p.shape for n, p in model().named_parameters()}
    assert all(exp.teacher.get_parameter(n).shape == shape for n, shape in student_shapes.items()
               if n in ("weight", "w")), "a gathered parameter must keep the student's size"


def test_weight_standardised_conv_on_the_data_input_keeps_its_width():
    exp = expand_exactly(WeightStandardised(on_data=True), 2.0, "replicate")
    assert exp.teacher.get_parameter("weight").shape == (8, 3, 3, 3)
    assert [g.teacher_width for g in exp.groups if g.layers == ["conv"]] == [16]


# --------------------------------------------------------------------- the command line

CLI_MODEL = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(({op}).mean((2, 3)))

def build_model():
    return Net()
"""


def cli_expand(tmp_path, op, *flags):
    (tmp_path / "model.py").write_text(CLI_MODEL.format(op=op))
    (tmp_path / "spec.yaml").write_text(f"input_shape: [2, 3, {SIZE}, {SIZE}]\n")
    return CliRunner().invoke(main, ["expand", str(tmp_path / "model.py"), "--spec", str(tmp_path / "spec.yaml"),
                                     *flags])


def test_cli_notes_an_op_run_at_the_student_width_and_explains_it(tmp_path):
    r = cli_expand(tmp_path, "torch.cumsum(self.conv(x), 1)", "--explain")
    assert r.exit_code == 0, r.output
    out = " ".join(r.stdout.split())
    assert "note: the teacher runs 1 op(s) at the student's width, exactly but not widened ('cumsum'" in out, out
    assert "cumsum: runs at the student's width, its output copied to the teacher's" in out, out


def test_cli_refuses_a_random_op_with_exit_2(tmp_path):
    r = cli_expand(tmp_path, "self.conv(x) + torch.rand_like(self.conv(x))")
    assert r.exit_code == 2, r.output
    msg = " ".join(r.stderr.split())
    assert "function 'torch.rand_like' receives widened channels" in msg and "it is random" in msg, msg
    assert "Traceback" not in r.output


def test_cli_explains_an_op_followed_by_probing(tmp_path):
    r = cli_expand(tmp_path, "self.conv(x).pow(2)", "--explain")
    assert r.exit_code == 0, r.output
    assert "followed by probing: method '.pow()' acts on each channel alike" in r.stdout
