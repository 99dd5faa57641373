"""Outputs of any structure: teacher, shared student and folded student return the model's structure,
every tensor leaf is checked (and named when it differs), feature outputs are pinned unless freed, and
ONNX names its outputs after the leaves."""

import collections
import dataclasses
import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import gpdc
from gpdc.exactness import check_expansion, check_shape, compare, max_rel_difference, randomize
from gpdc.export import OnnxMismatchError, check_onnx, export_onnx
from gpdc.outputs import leaves, logits_path, tensor_leaves

Pair = collections.namedtuple("Pair", "logits feats")


@dataclasses.dataclass
class Result:
    logits: torch.Tensor
    feature: torch.Tensor
    note: str = "kept"


class Net(nn.Module):
    """Two stages and a classifier; returns its output in the structure named by ``kind``."""

    def __init__(self, kind: str, norm=nn.BatchNorm2d):
        super().__init__()
        self.kind = kind
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), norm(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = norm(8)
        self.down = nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1, bias=False), norm(12), nn.ReLU())
        self.hidden = nn.Linear(12, 16)  # widens whatever the outputs pin
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        f1 = self.stem(x)
        f1 = torch.relu(f1 + self.bn(self.conv(f1)))
        f2 = self.down(f1)
        pooled = f2.mean((2, 3))
        logits = self.fc(torch.relu(self.hidden(pooled)))
        if self.kind == "tensor":
            return logits
        if self.kind == "tuple":
            return logits, {"feats": [f1, f2], "pooled": pooled}
        if self.kind == "list":
            return [logits, f2]
        if self.kind == "dict":
            return {"out": logits, "aux": f2, "n_stages": 2}
        if self.kind == "ordereddict":
            return collections.OrderedDict([("out", logits), ("aux", f1)])
        if self.kind == "namedtuple":
            return Pair(logits, [f1, f2])
        return Result(logits, f2)


KINDS = ["tensor", "tuple", "list", "dict", "ordereddict", "namedtuple", "dataclass"]
X = torch.randn(2, 3, 16, 16)


def structure(out) -> list:
    """Leaf paths, and for each container on the way its type, so two outputs of one structure agree."""
    return [(str(p), type(v).__name__ if not isinstance(v, torch.Tensor) else tuple(v.shape)) for p, v in leaves(out)]


def expand(kind, strategy, free=(), norm=nn.BatchNorm2d):
    model = randomize(Net(kind, norm))
    spec = {"input_shape": [2, 3, 16, 16], "expand": {"ratio": 1.5, "strategy": strategy, "free_outputs": list(free)}}
    return model, gpdc.expand(model, spec)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strategy", ["replicate", "grow"])
def test_any_structure_expands_exactly_and_folds(kind, strategy):
    model, exp = expand(kind, strategy)
    checks = check_expansion(exp, X)
    assert all(c["ok"] for c in checks.values()), checks
    with torch.no_grad():
        want = model.eval()(X)
        teacher, student, folded = exp.teacher(X), exp.student(X), exp.fold()(X)
    for out in (teacher, student, folded):
        assert type(out) is type(want)
        assert structure(out) == structure(want)
    assert max_rel_difference(student, folded)[0] <= 1e-5
    assert isinstance(exp.fold(), Net)
    if kind == "dict":
        assert teacher["n_stages"] == 2  # non-tensor leaves pass through
    if kind == "dataclass":
        assert teacher.note == "kept"


@pytest.mark.parametrize("strategy", ["replicate", "grow"])
def test_outputs_are_pinned_unless_freed(strategy):
    _, pinned = expand("tuple", strategy)
    _, freed = expand("tuple", strategy, free=["feats.*", "pooled"])
    assert sum(g.ratio > 1 for g in freed.groups) > sum(g.ratio > 1 for g in pinned.groups)
    reasons = [g.pinned for g in pinned.groups if g.pinned]
    assert any("out[1]['feats'][1]" in r and "expand.free_outputs: ['1.feats.1']" in r for r in reasons), reasons
    assert set(map(str, freed.output_maps)) == {"out[1]['feats'][0]", "out[1]['feats'][1]", "out[1]['pooled']"}
    assert freed.report()["outputs"]["out[0]"] == "pinned"
    checks = check_expansion(freed, X)
    assert all(c["ok"] for c in checks.values()), checks
    with torch.no_grad():
        wide, student = freed.teacher(X), freed.student(X)
    f2 = wide[1]["feats"][1]
    m = freed.output_maps[next(p for p in freed.output_maps if p.key == "1.feats.1")]
    assert f2.shape[1] == m.teacher_width > student[1]["feats"][1].shape[1]
    assert max_rel_difference(freed.student_view(wide), student)[0] <= 1e-5


def test_free_outputs_that_match_nothing_are_an_error():
    with pytest.raises(gpdc.SpecError, match="'logitz' matches no output.*'1.feats.0'"):
        expand("tuple", "replicate", free=["logitz"])


def test_nothing_widens_names_the_feature_outputs():
    class AllFeatures(Net):
        def forward(self, x):
            f1 = self.stem(x)
            f2 = self.down(torch.relu(f1 + self.bn(self.conv(f1))))
            h = self.hidden(f2.mean((2, 3)))
            return self.fc(h), [f1, f2, h]

    with pytest.raises(gpdc.RuleError, match="free_outputs"):
        gpdc.expand(AllFeatures("x"), {"input_shape": [2, 3, 16, 16]})


def test_compare_names_the_leaf_that_differs():
    ref = {"out": torch.ones(2, 3), "aux": [torch.zeros(2, 4), torch.ones(2, 2)]}
    bad = {"out": torch.ones(2, 3), "aux": [torch.zeros(2, 4), torch.ones(2, 2) + 1e-2]}
    e = compare(bad, ref, ref)
    assert not e.ok and e.leaf == "out['aux'][1]"
    assert compare(ref, ref, ref).ok


@pytest.mark.parametrize("kind", ["tuple", "ordereddict", "namedtuple"])
def test_onnx_outputs_are_named_after_leaves_and_all_checked(kind, tmp_path):
    _, exp = expand(kind, "replicate")
    folded = exp.fold()
    path = export_onnx(folded, X, tmp_path / "m.onnx")
    import onnx

    names = [o.name for o in onnx.load(path).graph.output]
    assert names == [p.onnx_name for p, _ in tensor_leaves(folded(X))]
    eq = check_onnx(path, folded, torch.randn(3, 3, 16, 16))  # another batch size: the batch axis is dynamic
    assert eq.ok, eq
    with torch.no_grad():  # a change in one leaf's weights is caught and named
        folded.stem[0].weight[0, 0, 0, 0] += 1.0
    eq = check_onnx(path, folded, X)
    assert not eq.ok and eq.worst_output in names


def test_onnx_of_another_model_is_a_mismatch(tmp_path):
    _, exp = expand("tuple", "replicate")
    path = export_onnx(exp.fold(), X, tmp_path / "m.onnx")
    with pytest.raises(OnnxMismatchError, match="does not fit the model"):
        check_onnx(path, Net("tensor").eval(), X)


@pytest.mark.parametrize("strategy", ["replicate", "grow"])
def test_buffer_only_norms_expand_and_fold(strategy):
    model, exp = expand("tensor", strategy, norm=FrozenBatchNorm2d)
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and all(bool((m.running_var != 1).any() and (m.bias != 0).any()) for m in frozen)  # not identities
    assert sum(g.ratio > 1 for g in exp.groups) >= 2
    checks = check_expansion(exp, X)
    assert all(c["ok"] for c in checks.values()), checks
    fresh = Net("tensor", FrozenBatchNorm2d)
    fresh.load_state_dict(exp.fold_state_dict(), strict=True)
    assert max_rel_difference(exp.student.eval()(X), fresh.eval()(X))[0] <= 1e-5


def test_batch_one_with_batchnorm_after_pooling_checks_at_batch_two():
    class Head(nn.Module):  # DeepLabV3's ASPP pooling branch: BatchNorm over a 1x1 map
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.proj = nn.Conv2d(8, 8, 1)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.proj(self.pool(self.conv(x))))))

    exp = gpdc.expand(randomize(Head()), {"input_shape": [1, 3, 16, 16]})
    shape, note = check_shape(exp)
    assert shape == [2, 3, 16, 16] and "'bn'" in note
    checks = check_expansion(exp, torch.randn(*shape))
    assert all(c["ok"] for c in checks.values()), checks


def doubled(x):
    return x * 2


class _Broken(gpdc.Rule):
    def analyze(self, node, an):
        raise ValueError("boom")

    def expand(self, node, ex):  # pragma: no cover - analyze fails first
        raise ValueError("boom")


def test_a_crashing_rule_is_reported_as_a_gpdc_bug_naming_node_and_rule():
    gpdc.register_leaf_function(doubled)
    gpdc.register_function_rule(doubled, _Broken())

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(doubled(self.a(x)))

    with pytest.raises(gpdc.GpdcError) as e:
        gpdc.expand(M(), {"input_shape": [1, 3, 4, 4]})
    msg = str(e.value)
    assert "analyze stage" in msg and "'doubled'" in msg and "_Broken" in msg and "ValueError: boom" in msg
    assert "gpdc bug" in msg


@pytest.mark.parametrize("out,key,want", [
    (torch.zeros(1), None, "out"),
    ((torch.zeros(1), {"f": torch.zeros(1)}), None, "out[0]"),
    ({"aux": torch.zeros(1), "out": torch.zeros(1)}, None, "out['out']"),
    (Pair(torch.zeros(1), [torch.zeros(1)]), None, "out.logits"),
    ((torch.zeros(1), torch.zeros(1)), "1", "out[1]"),
])
def test_logits_leaf_default_and_key(out, key, want):
    assert str(logits_path(out, key)) == want


def test_ambiguous_logits_is_an_error():
    with pytest.raises(gpdc.GpdcError, match="train.logits"):
        logits_path({"out": torch.zeros(1), "logits": torch.zeros(1)}, None)


def test_a_teacher_that_cannot_fit_in_memory_is_refused_with_the_estimate():
    with pytest.raises(gpdc.SpecError, match=r"would not fit in memory.*GiB"):
        gpdc.expand(Net("tensor"), {"input_shape": [2, 3, 16, 16], "expand": {"ratio": 1e6}})
