"""The tracer on code people write: extra forward flags, Python control flow and int() on shapes.

Shape-only values are specialised (and recorded), ops that need no Python value stay symbolic in the
batch, and value-dependent control flow is an error naming the innermost module and the line.
"""

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpdc
from gpdc.exactness import check_expansion


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """The knowledge-distillation zoo signature: features on request."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, 2)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x, is_feat=False, preact=False):
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        out = F.avg_pool2d(f2, f2.size(3))
        f3 = out.view(out.size(0), -1)
        logits = self.fc(f3)
        if is_feat:
            return [f0, f1, f2, f3], logits
        return logits


class SizeVGG(nn.Module):
    """Pools once more for larger inputs, decided on the input's height."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.pool = nn.MaxPool2d(2)
        self.classifier = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x):
        h = x.shape[2]
        if h == 64:
            x = self.pool(x)
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))


class ShuffleBlock(nn.Module):
    """ShuffleNetV2-style: split channels by a ratio, transform one half, concatenate, shuffle."""

    def __init__(self, channels: int, split_ratio: float = 0.5, groups: int = 2):
        super().__init__()
        self.split_ratio, self.groups = split_ratio, groups
        c = int(channels * split_ratio)
        self.branch = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU(),
                                    nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c))

    def forward(self, x):
        c = int(x.size(1) * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = torch.cat([x1, F.relu(self.branch(x2))], 1)
        b, c, h, w = out.size()
        g = self.groups
        return out.view(b, g, c // g, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(ShuffleBlock(16), ShuffleBlock(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(x.mean((2, 3)))


class SE(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c, c // 2), nn.ReLU(), nn.Linear(c // 2, c), nn.Sigmoid())

    def forward(self, x):
        b, c, h, w = x.size()
        y = F.adaptive_avg_pool2d(x, 1).view(b, c)
        return x * self.fc(y).view(b, c, 1, 1)


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.se = SE(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.se(self.conv(x)), 4)
        return self.fc(x.view(x.size(0), -1))


class ShapeChecks(nn.Module):
    """Rank checks, loops over sizes and len() on shapes, all decided by the input's shape."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        assert x.dim() == 4 and len(x.shape) == 4
        n = 1
        for s in x.shape[1:]:
            n = n * s
        y = self.conv(x)
        for _ in range(x.size(1) - 2):
            y = y + 1
        return y.reshape(y.size(0), -1)[:, : n // 3]


def line_of(cls: type, text: str) -> int:
    """The source line in ``cls`` that contains ``text``."""
    lines, start = inspect.getsourcelines(cls)
    return start + next(i for i, line in enumerate(lines) if text in line)


CASES = [(CifarResNet, 32), (SizeVGG, 64), (ShuffleNet, 16), (SENet, 16), (ShapeChecks, 8)]


@pytest.mark.parametrize("cls,size", CASES, ids=[c.__name__ for c, _ in CASES])
def test_traced_graph_equals_the_model_at_its_size_and_other_batches(cls, size):
    model = cls().eval()
    gm = gpdc.trace(model, [2, 3, size, size])
    assert list(gm.state_dict()) == list(model.state_dict())
    for batch in (2, 5):
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)
    assert all({"where", "code", "value", "scope"} <= set(s) for s in gm.meta["gpdc.specialised"])


def test_forward_flags_are_specialised_to_their_defaults():
    gm = gpdc.trace(CifarResNet(), [2, 3, 32, 32])
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x"]
    assert [s["code"] for s in gm.meta["gpdc.specialised"]] == ["is_feat=False", "preact=False"]
    assert gm.meta["gpdc.specialised"][0]["where"].endswith(f":{line_of(CifarResNet, 'def forward')}")


def test_shape_condition_is_recorded_with_its_line():
    gm = gpdc.trace(SizeVGG(), [2, 3, 64, 64])
    (spec,) = gm.meta["gpdc.specialised"]
    assert spec["code"] == "if h == 64:" and spec["value"] is True
    assert spec["where"] == f"{inspect.getsourcefile(SizeVGG)}:{line_of(SizeVGG, 'if h == 64:')}"
    assert not any(n.op == "call_function" and n.target.__name__ == "eq" for n in gm.graph.nodes)


def test_split_ratio_is_specialised_per_block_and_batch_stays_symbolic():
    gm = gpdc.trace(ShuffleNet(), [2, 3, 16, 16])
    splits = [s for s in gm.meta["gpdc.specialised"] if "split_ratio" in s["code"]]
    assert [(s["scope"], s["value"]) for s in splits] == [("blocks.0", 8), ("blocks.1", 8)]
    assert gm.graph.find_nodes(op="call_method", target="size")  # view(b, ...) reads the batch at run time


def test_rank_checks_and_loop_counts_are_recorded_but_iterating_a_shape_is_not():
    gm = gpdc.trace(ShapeChecks(), [2, 3, 8, 8])
    codes = {s["code"] for s in gm.meta["gpdc.specialised"]}
    assert codes == {"assert x.dim() == 4 and len(x.shape) == 4", "for _ in range(x.size(1) - 2):"}


def test_node_shapes_are_recorded_while_tracing():
    gm = gpdc.symbolic_trace(SENet(), example=torch.randn(2, 3, 16, 16))
    shapes = {n.name: n.meta.get("gpdc.shape") for n in gm.graph.nodes}
    assert shapes["conv"] == (2, 8, 16, 16) and shapes["fc"] == (2, 10)


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            return x
        return -x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), Gate())

    def forward(self, x):
        y = self.body(x)
        return y if y.size(1) == 4 else 2 * y


class DataInt(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        n = int(x.max())
        return self.conv(x) * n


def test_value_dependent_control_flow_names_the_innermost_module_and_line():
    with pytest.raises(gpdc.TraceError) as err:
        gpdc.trace(GatedNet(), [2, 3, 8, 8])
    msg = str(err.value)
    assert f"'body.1' (Gate, defined at {inspect.getsourcefile(Gate)}:{line_of(Gate, 'class Gate')})" in msg
    assert f":{line_of(Gate, 'if x.sum() > 0:')} (`if x.sum() > 0:`)" in msg
    assert "value-dependent" in msg and "register_leaf_module(Gate)" in msg and "register_module_rule" in msg
    assert "Traceback" not in msg and "\n" not in msg


def test_data_dependent_int_at_the_top_level_does_not_suggest_a_leaf_model():
    with pytest.raises(gpdc.TraceError) as err:
        gpdc.trace(DataInt(), [2, 3, 8, 8])
    msg = str(err.value)
    assert "top-level module (DataInt" in msg and "int(x.max())" in msg and "value-dependent" in msg
    assert "register_leaf_module(DataInt)" not in msg and "register_leaf_function" in msg


def test_a_leaf_module_hides_value_dependent_code_and_its_output_has_a_value():
    model = GatedNet().eval()
    gm = gpdc.trace(model, [2, 3, 8, 8], leaf_modules=(Gate,))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["body.0", "body.1"]
    assert gm.meta["gpdc.specialised"][0]["code"] == "return y if y.size(1) == 4 else 2 * y"
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)


def normalise_if_large(x):
    return x / x.abs().max() if x.abs().max() > 1 else x


class Normalised(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = normalise_if_large(self.conv(x))
        return y.flatten(1) if y.dim() == 4 else y


def test_a_leaf_function_hides_value_dependent_code():
    model = Normalised().eval()
    gm = gpdc.trace(model, [2, 3, 8, 8], leaf_functions=(normalise_if_large,))
    assert any(n.target is normalise_if_large for n in gm.graph.nodes)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)


class TwoInputs(nn.Module):
    def forward(self, x, y):
        return x + y


class VarArgs(nn.Module):
    def forward(self, *args, **kwargs):
        return args[0]


@pytest.mark.parametrize("cls,text", [(TwoInputs, "y has none"), (VarArgs, "names none")])
def test_forward_signatures_gpdc_cannot_call_are_clear_errors(cls, text):
    with pytest.raises(gpdc.TraceError, match=text):
        gpdc.trace(cls(), [2, 3, 8, 8])


def test_without_an_example_tracing_is_plain_symbolic():
    gm = gpdc.symbolic_trace(SENet())  # nothing forced: traces without values
    assert gm.meta["gpdc.specialised"] == [] and "gpdc.shape" not in next(iter(gm.graph.nodes)).meta
    with pytest.raises(gpdc.TraceError, match="example input"):
        gpdc.symbolic_trace(SizeVGG())
    assert gpdc.symbolic_trace(gm).meta["gpdc.specialised"] == []  # GraphModules pass through


def test_the_users_model_is_not_touched():
    model = CifarResNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gpdc.trace(model, [2, 3, 32, 32])
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_kd_zoo_model_expands_exactly():
    torch.manual_seed(0)
    exp = gpdc.expand(CifarResNet(), {"input_shape": [2, 3, 32, 32], "expand": {"ratio": 2.0}})
    results = check_expansion(exp, torch.randn(2, 3, 32, 32))
    assert all(r["ok"] for r in results.values()), results


class InPlaceEffects(nn.Module):
    """In-place ops whose results nobody reads — timm NaFlexViT's ``x.add_(pos)``, NFNet's ``gelu(x).mul_(gamma)`` —
    and an in-place ReLU whose input is read again afterwards."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x.add_(self.pos)
        y = F.gelu(self.conv(x))
        y.mul_(1.7)
        z = self.conv(y)
        r = self.relu(z)
        return self.head((z + 0.5 * r).mean((2, 3)))  # z is r now


@pytest.mark.parametrize("strategy", ["replicate", "grow"])
def test_in_place_effects_reach_the_teacher(strategy):
    """Every tensor an op changed in place is read from that op afterwards, so the teacher (which computes only
    what the output uses) keeps the effect; the graph still equals the model, and the expansion is exact."""
    torch.manual_seed(0)
    model = InPlaceEffects().eval()
    x = torch.randn(2, 3, 6, 6)
    exp = gpdc.expand(model, {"input_shape": [2, 3, 6, 6], "expand": {"ratio": 2.0, "strategy": strategy}})
    in_place = [n for n in exp.original.graph.nodes if str(n.target) in ("add_", "mul_", "relu")]
    assert len(in_place) == 3 and all(n.users for n in in_place)
    with torch.no_grad():
        torch.testing.assert_close(exp.original(x), model(x))
    results = check_expansion(exp, x)
    assert all(r["ok"] for r in results.values()), results


class OwnBatchNorm(nn.BatchNorm2d):
    """A code base's own BatchNorm class (here: only its initialisation differs)."""

    def reset_parameters(self):
        super().reset_parameters()
        nn.init.constant_(self.weight, 0.5)


def test_a_batchnorm_of_the_users_class_follows_the_mode():
    """Traced into, its forward would be fixed at eval mode (batch statistics never used in training); it stays one
    node and the traced graph equals the model in train mode too."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), OwnBatchNorm(4), nn.Dropout(0.0))
    gm = gpdc.trace(model, [2, 3, 8, 8])
    assert [n.op for n in gm.graph.nodes].count("call_module") == 3
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm.train()(x), model.train()(x))


class TracedSizes(nn.Module):
    """Factory functions given traced sizes, as timm's Gemma 4 ViT builds its patch mask."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 2, 2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv(x)
        b, _, h, w = y.shape
        valid = torch.ones(b, h * w, dtype=torch.bool, device=x.device)
        pos = torch.arange(h * w, device=x.device).float() / (h * w) + torch.zeros(b, 1, h * w)
        tokens = y.flatten(2) * valid.unsqueeze(1) + pos
        return self.head(tokens.mean(-1))


def test_factory_functions_take_traced_sizes_and_the_batch_stays_free():
    torch.manual_seed(0)
    model = TracedSizes().eval()
    gm = gpdc.trace(model, [2, 3, 8, 8])
    assert {n.target for n in gm.graph.nodes if n.op == "call_function"} >= {torch.ones, torch.zeros, torch.arange}
    for batch in (2, 5):
        x = torch.randn(batch, 3, 8, 8)
        torch.testing.assert_close(gm(x), model(x))
    exp = gpdc.expand(model, {"input_shape": [2, 3, 8, 8], "expand": {"ratio": 2.0}})
    assert any(g.teacher_width > g.width for g in exp.groups)
    results = check_expansion(exp, torch.randn(2, 3, 8, 8))
    assert all(r["ok"] for r in results.values()), results
