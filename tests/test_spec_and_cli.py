"""Specs: validation, precedence, conflicts; the CLI: one clear message and exit code 2."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from torch import nn

import gpdc
from gpdc.errors import SpecError, TraceError


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gpdc", *args], capture_output=True, text=True, cwd=cwd)


def test_schema_lists_every_field_with_a_description():
    r = run_cli("spec", "--schema")
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    expand = schema["$defs"]["ExpandSpec"]["properties"]
    assert set(expand) == {"ratio", "strategy", "layers", "unwidenable", "free_outputs"}
    assert all(p.get("description") for p in expand.values())


@pytest.mark.parametrize("spec,needle", [
    ({"expand": {"ratio": 1.0}}, "expand.ratio: the default expansion ratio must be > 1"),
    ({"expand": {"ratio": 0.5}}, "expand.ratio"),
    ({"expand": {"ratoi": 2.0}}, "expand.ratoi: unknown key"),
    ({"bogus": 1}, "bogus: unknown key"),
    ({"expand": {"strategy": "copy"}}, "expand.strategy"),
    ({"expand": {"layers": {"layer1.*": 0.5}}}, "per-layer ratios must be >= 1"),
    ({"input_shape": [1, 0, 3]}, "input_shape"),
])
def test_bad_specs_name_the_field(spec, needle):
    with pytest.raises(SpecError) as e:
        gpdc.load_spec(spec)
    assert needle in str(e.value)


def test_unmatched_pattern_is_an_error():
    with pytest.raises(SpecError, match="'layer9.*' matches no layer"):
        gpdc.expand(torchvision.models.resnet18(), {"input_shape": [1, 3, 32, 32], "expand": {"layers": {"layer9.*": 1.5}}})


def test_conflicting_ratios_name_both_layers_and_the_coupling_node():
    spec = {"input_shape": [1, 3, 32, 32], "expand": {"layers": {"layer1.0.conv2": 1.5, "layer1.1.conv2": 3.0}}}
    with pytest.raises(SpecError) as e:
        gpdc.expand(torchvision.models.resnet18(), spec)
    msg = str(e.value)
    assert "'layer1.0.conv2'" in msg and "'layer1.1.conv2'" in msg and "node 'add" in msg


def test_precedence_default_glob_exact_is_reported():
    spec = {"input_shape": [1, 3, 32, 32],
            "expand": {"ratio": 2.0, "layers": {"layer4.*": 1.5, "layer3.*": 3.0, "layer3.0.conv1": 1.25}}}
    exp = gpdc.expand(torchvision.models.resnet18(), spec)
    by_layer = {name: g for g in exp.groups for name in g.layers}
    assert by_layer["layer4.0.conv2"].ratio == 1.5 and by_layer["layer4.0.conv2"].rule == "glob 'layer4.*'"
    assert by_layer["layer3.0.conv1"].ratio == 1.25 and by_layer["layer3.0.conv1"].rule == "exact 'layer3.0.conv1'"
    assert by_layer["layer3.1.conv1"].ratio == 3.0
    assert by_layer["layer1.0.conv1"].rule == "default expand.ratio"
    assert by_layer["layer3.0.conv1"].teacher_width == 320  # 256 * 1.25
    assert by_layer["fc"].pinned and by_layer["fc"].teacher_width == 1000


def test_logits_cannot_be_widened_by_exact_name():
    with pytest.raises(SpecError, match="'fc' cannot widen"):
        gpdc.expand(torchvision.models.resnet18(), {"input_shape": [1, 3, 32, 32], "expand": {"layers": {"fc": 2.0}}})


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent control flow
            return y
        return -y


def test_untraceable_model_names_the_module_and_suggests_leaf_registry():
    with pytest.raises(TraceError) as e:
        gpdc.expand(Untraceable(), {"input_shape": [1, 3, 8, 8]})
    msg = str(e.value)
    assert "Untraceable" in msg and "if y.sum() > 0" in msg and "register_leaf_module" in msg


def test_user_model_is_not_mutated():
    model = torchvision.models.resnet18(num_classes=10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exp = gpdc.expand(model, {"input_shape": [2, 3, 32, 32]})
    exp.student(torch.randn(2, 3, 32, 32))
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "bad.yaml").write_text("expand:\n  ratio: 0.5\n")
    (tmp_path / "broken.yaml").write_text("expand: [unclosed\n")
    (tmp_path / "ok.yaml").write_text("input_shape: [1, 3, 8, 8]\n")
    (tmp_path / "nobuild.py").write_text("import torch\n")
    (tmp_path / "untraceable.py").write_text(textwrap.dedent('''
        from torch import nn
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 3)
            def forward(self, x):
                y = self.conv(x)
                return y if y.sum() > 0 else -y
        def build_model():
            return M()
    '''))
    return tmp_path


@pytest.mark.parametrize("args,needle", [
    (["expand", "examples/model.py", "--spec", "{d}/bad.yaml"], "must be > 1"),
    (["expand", "examples/model.py", "--spec", "{d}/broken.yaml"], "not valid YAML"),
    (["expand", "examples/model.py", "--spec", "{d}/missing.yaml"], "does not exist"),
    (["expand", "{d}/nobuild.py", "--spec", "{d}/ok.yaml"], "has no function 'build_model()'"),
    (["expand", "{d}/untraceable.py", "--spec", "{d}/ok.yaml"], "register_leaf_module"),
    (["expand", "torchvision:resnet9000", "--spec", "{d}/ok.yaml"], "unknown torchvision model"),
])
def test_cli_bad_input_exits_2_without_traceback(files, args, needle):
    r = run_cli(*[a.format(d=files) for a in args])
    assert r.returncode == 2, r.stderr
    assert needle in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr


def test_cli_expand_bundled_default_is_exact():
    r = run_cli("expand", "examples/model.py", "--spec", "specs/example.yaml", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert all(c["ok"] for c in report["exactness"].values())
    assert report["teacher_params"] > report["student_params"]


class CumsumNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = torch.cumsum(self.conv(x), 1)  # mixes channels: no rule
        return self.fc(y.mean((2, 3)))


def test_op_without_rule_names_the_node_and_the_registry():
    exp = gpdc.expand(CumsumNet(), {"input_shape": [1, 3, 8, 8]})
    assert "register_function_rule(torch.cumsum" in exp.report()["student_width_ops"]["cumsum"]
    with pytest.raises(gpdc.RuleError) as e:  # expand.unwidenable: error insists on a fully widened teacher
        gpdc.expand(CumsumNet(), {"input_shape": [1, 3, 8, 8], "expand": {"unwidenable": "error"}})
    msg = str(e.value)
    assert "'cumsum'" in msg and "register_function_rule" in msg and "torch.cumsum(self.conv(x), 1)" in msg


class Gate(nn.Module):
    def forward(self, x):
        return x if x.max() > 100 else x.clamp(min=0)  # untraceable, but channel-wise (max is copy-invariant)


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gate = Gate()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).mean((2, 3)))


def test_leaf_module_registry_makes_untraceable_code_expandable():
    gpdc.register_leaf_module(Gate)
    gpdc.register_elementwise(Gate)
    model = GatedNet()
    exp = gpdc.expand(model, {"input_shape": [2, 3, 8, 8], "expand": {"ratio": 1.5}})
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(exp.teacher(x), model(x), rtol=1e-5, atol=1e-6)
    assert exp.groups[1].teacher_width == 12
