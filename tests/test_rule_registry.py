"""The rule registry: every entry of the torchvision/timm integrations table is registered after import and
fires on a small model (which stays exact), replacing a rule warns, ``scoped()`` undoes registrations,
``gpdc rules`` lists what is supported, and the README's custom-rule example runs."""

import importlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gpdc
from gpdc.analyze import ChannelAnalysis
from gpdc.cli import main
from gpdc.exactness import check_expansion
from gpdc.rules import registry
from gpdc.rules.elementwise import ChannelwiseRule
from gpdc.rules.integrations import INTEGRATIONS, register_integrations
from gpdc.rules.movement import MoveRule
from gpdc.trace import _LEAF_FUNCTIONS, _LEAF_MODULES

ROOT = Path(__file__).resolve().parents[1]


def nhwc(x):
    return x.permute(0, 2, 3, 1)


def tokens(x):
    return x.flatten(2).transpose(1, 2)


def partitions(x):
    """[B, groups, partition, C], as MaxViT's attention takes it."""
    return tokens(x).unsqueeze(1)


def nchw(x):
    return x


class Around(nn.Module):
    """conv → ``to`` → ``op`` → ``back`` → mean over positions → linear: the channels ``op`` sees come from
    the conv and widen; only the linear's output is pinned."""

    def __init__(self, op, out_channels, to=nhwc, back=None):
        super().__init__()
        self.conv, self.op, self.head = nn.Conv2d(3, 8, 1), op, nn.Linear(out_channels, 5)
        self.to, self.back = to, back

    def forward(self, x):
        y = self.op(self.to(self.conv(x)))
        y = self.back(y) if self.back else y
        return self.head(y.flatten(1, -2).mean(1))


def _swin_patch_merging():
    from torchvision.models.swin_transformer import PatchMerging

    return Around(PatchMerging(8), 16), [2, 3, 4, 4], ()


def _stochastic_depth(leaf=()):
    from torchvision.ops import StochasticDepth

    return Around(StochasticDepth(0.2, "row"), 8, to=nchw, back=nhwc), [2, 3, 4, 4], leaf


def _stochastic_depth_leaf():
    from torchvision.ops import StochasticDepth

    return _stochastic_depth((StochasticDepth,))


def _shifted_window_attention():
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    return Around(ShiftedWindowAttention(8, [2, 2], [1, 1], 2), 8), [2, 3, 4, 4], ()


def _maxvit_attention():
    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

    return Around(RelativePositionalMultiHeadAttention(8, 4, 4), 8, to=partitions), [2, 3, 2, 2], ()


def _timm_std_conv():
    from timm.layers import StdConv2d

    return Around(StdConv2d(8, 8, 3, padding=1), 8, to=nchw, back=nhwc), [2, 3, 4, 4], ()


def _timm_attention():
    from timm.layers.attention import Attention

    return Around(Attention(8, num_heads=2), 8, to=tokens), [2, 3, 4, 4], ()


def _timm_swin_block():
    from timm.models.swin_transformer import SwinTransformerBlock

    return Around(SwinTransformerBlock(8, (4, 4), num_heads=2, window_size=2, shift_size=1), 8), [2, 3, 4, 4], ()


# target of the integrations table -> (model, input shape, leaf modules) whose expansion fires it
CASES = {
    "torchvision.models.swin_transformer._patch_merging_pad": _swin_patch_merging,
    "torchvision.ops.stochastic_depth": _stochastic_depth,
    "torchvision.ops.StochasticDepth": _stochastic_depth_leaf,
    "torchvision.models.swin_transformer.ShiftedWindowAttention": _shifted_window_attention,
    "torchvision.models.maxvit.RelativePositionalMultiHeadAttention": _maxvit_attention,
    "timm.layers.StdConv2d": _timm_std_conv,
    "timm.layers.attention.Attention": _timm_attention,
    "timm.models.swin_transformer.WindowAttention": _timm_swin_block,
    "timm.models.swin_transformer.window_reverse": _timm_swin_block,
}


def _registered(entry):
    """What the registries hold for the entry's target: its rule, or whether it is a leaf."""
    target = entry.resolve()
    return {
        "module rule": lambda: registry.module_rule(target),
        "function rule": lambda: registry._FUNCTION_RULES.get(target),
        "leaf module": lambda: target in _LEAF_MODULES,
        "leaf function": lambda: target in _LEAF_FUNCTIONS,
    }[entry.kind]()


def _fired(entry, an: ChannelAnalysis) -> bool:
    """Whether the entry took effect on the analysed graph: its target is one node, analysed by its rule."""
    target = entry.resolve()
    for node in an.gm.graph.nodes:
        if entry.kind in ("module rule", "leaf module"):
            match = node.op == "call_module" and isinstance(an.module(node), target)
        else:
            match = node.op == "call_function" and node.target is target
        if match and (entry.rule is None or an.rules.get(node) is entry.rule):
            return True
    return False


def test_every_integration_has_a_case_that_fires_it():
    assert {e.target for e in INTEGRATIONS} == set(CASES)


@pytest.mark.parametrize("entry", INTEGRATIONS, ids=lambda e: f"{e.kind}:{e.target}")
def test_integration_is_registered_once_gpdc_traces_with_its_library_imported(entry):
    if not entry.installed:
        pytest.skip(f"{entry.library} is not installed")
    importlib.import_module(entry.library)  # a model holding its classes has imported it
    gpdc.trace(nn.Conv2d(3, 4, 1), [1, 3, 4, 4])
    assert _registered(entry) is (entry.rule if entry.rule is not None else True)


def test_importing_gpdc_imports_no_model_code_and_a_users_rule_wins():
    code = ("import sys, gpdc, torch; assert 'torchvision.models' not in sys.modules, 'imported'; "
            "from timm.layers.attention import Attention; r = gpdc.rules.elementwise.ChannelwiseRule(); "
            "gpdc.register_module_rule(Attention, r); gpdc.trace(torch.nn.Conv2d(3, 4, 1), [1, 3, 4, 4]); "
            "assert gpdc.rules.registry.module_rule(Attention) is r")
    r = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_expanding_a_plain_model_imports_no_library_it_does_not_use():
    code = ("import sys, gpdc, torch; from torch import nn; gpdc.expand(nn.Sequential(nn.Conv2d(3, 4, 3), "
            "nn.Conv2d(4, 2, 1)), {'input_shape': [1, 3, 4, 4]}); "
            "assert 'timm' not in sys.modules and 'torchvision.models' not in sys.modules, 'imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("target", CASES)
def test_integration_fires_and_stays_exact(target):
    entries = [e for e in INTEGRATIONS if e.target == target]
    if not entries[0].installed:
        pytest.skip(f"{entries[0].library} is not installed")
    model, shape, leaves = CASES[target]()
    an = ChannelAnalysis(gpdc.trace(model, shape, leaf_modules=leaves))
    assert [e.kind for e in entries if not _fired(e, an)] == []
    exp = gpdc.expand(model, {"input_shape": shape, "expand": {"ratio": 1.5}}, leaf_modules=leaves)
    assert any(g.teacher_width > g.width for g in exp.groups)
    checks = check_expansion(exp, torch.randn(*shape))
    assert all(c["ok"] for c in checks.values()), checks


def test_replacing_a_rule_warns_naming_target_and_both_rules():
    move = MoveRule()
    gpdc.register_function_rule(torch.erf, move)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpdc.register_function_rule(torch.erf, move)  # the same rule again: silent
        register_integrations()  # the table again: silent
    with pytest.warns(UserWarning, match=r"function torch\.erf: its channel rule MoveRule\(\) is replaced by "
                                         r"ChannelwiseRule\(spatial_only=False\)"):
        gpdc.register_function_rule(torch.erf, ChannelwiseRule())
    with pytest.warns(UserWarning, match=r"method '\.view\(\)'.*MoveRule\(\).*ChannelwiseRule"):
        gpdc.register_method_rule("view", ChannelwiseRule())


def test_scoped_restores_rules_and_leaves():
    class Custom(nn.Module):
        def forward(self, x):
            return x

    def custom(x):
        return x

    before = registry.catalogue()
    with registry.scoped():
        gpdc.register_leaf_module(Custom)
        gpdc.register_leaf_function(custom)
        gpdc.register_elementwise(Custom, custom, "erfinv")
        with pytest.warns(UserWarning):
            gpdc.register_module_rule(nn.Conv2d, ChannelwiseRule())
        assert registry.catalogue() != before
    assert registry.catalogue() == before
    assert registry.module_rule(nn.Conv2d) is not None and type(registry.module_rule(nn.Conv2d)).__name__ == "DenseRule"


def test_gpdc_rules_lists_rules_leaves_integrations_and_the_probe():
    r = CliRunner().invoke(main, ["rules"])
    assert r.exit_code == 0, r.output
    for needle in ("module rules", "DenseRule: ", "torch.nn.modules.conv.Conv2d", "method rules", "MoveRule: ",
                   "leaf modules", "_patch_merging_pad: function rule SpaceToChannelsRule(k=4)", "probed"):
        assert needle in r.output, needle
    assert r.output.strip().splitlines()[-1].startswith("probed:")


def test_gpdc_rules_json_parses_and_import_registers_nothing_twice():
    r = subprocess.run([sys.executable, "-W", "error::UserWarning", "-m", "gpdc", "rules", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    listing = json.loads(r.stdout)
    assert "torch.nn.modules.conv.Conv2d" in listing["module_rules"]["DenseRule"]
    assert [e["target"] for e in listing["integrations"]] == [e.target for e in INTEGRATIONS]
    assert all(e["reason"] for e in listing["integrations"]) and "probe" in listing["probed"]


def test_custom_rule_example_runs_and_is_exact():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_rule.py")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("without a rule: 'scale' module of type ChannelScale has parameters and no channel rule; conv2 reads 16 "
            "channels") in r.stdout, r.stdout
    assert r.stdout.count(" exact") == 8 and "NOT EXACT" not in r.stdout, r.stdout


class GainConv(nn.Conv2d):
    """A conv that makes its kernel in forward — a gain per output channel, as timm's ScaledStdConv2dSame."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight * self.gain, self.bias, self.stride, self.padding)


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm with an activation after it, as timm's BatchNormAct2d: the BatchNorm rule still holds."""

    def forward(self, x):
        return nn.functional.silu(super().forward(x))


class OwnForwards(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = GainConv(3, 8, 3, padding=1), BatchNormAct(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), BatchNormAct(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.bn2(self.conv2(self.bn1(self.conv1(x)))).mean((2, 3)))


@pytest.mark.parametrize("leaf", [False, True], ids=["traced", "leaf"])
def test_a_subclass_with_its_own_forward_is_not_widened_by_its_base_classes_rule(leaf):
    """GainConv is a Conv2d whose forward scales the kernel: traced through, its ops widen it; kept as a leaf, it runs
    at the student's width (exact; no internal error over its unmapped gain). BatchNormAct, a BatchNorm of the
    user's class, stays one node (tracing into it would fix its mode at eval) widened by the BatchNorm rule."""
    from gpdc.exactness import randomize

    torch.manual_seed(0)
    model = randomize(OwnForwards())
    assert registry.module_rule(GainConv) is None and registry.module_rule(BatchNormAct) is not None
    with registry.scoped():
        if leaf:
            gpdc.register_leaf_module(GainConv)
        exp = gpdc.expand(model, {"input_shape": [2, 3, 6, 6], "expand": {"ratio": 2.0}})
    checks = check_expansion(exp, torch.randn(2, 3, 6, 6))
    assert all(c["ok"] for c in checks.values()), checks
    assert exp.teacher.get_submodule("bn1").num_features == (8 if leaf else 16)  # GainConv's output: widened if traced
    assert {n.target for n in exp.original.graph.nodes if n.op == "call_module"} >= {"bn1", "bn2"}
    assert exp.teacher.get_submodule("bn2").num_features == 16


def test_timm_scaled_std_conv_same_is_traced_through_and_exact():
    """timm keeps ScaledStdConv2dSame out of fx graphs; its kernel is standardised over the fan-in and scaled by a
    gain, so the Conv2d rule would be wrong (and left its gain unmapped: an internal error on dm_nfnet)."""
    from timm.layers import ScaledStdConv2dSame

    from gpdc.exactness import randomize

    torch.manual_seed(0)
    model = randomize(nn.Sequential(ScaledStdConv2dSame(3, 8, 3, stride=2), nn.GELU(), ScaledStdConv2dSame(8, 8, 3),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)))
    for ratio, strategy in ((2.0, "replicate"), (1.5, "grow")):
        exp = gpdc.expand(model, {"input_shape": [2, 3, 9, 9], "expand": {"ratio": ratio, "strategy": strategy}})
        checks = check_expansion(exp, torch.randn(2, 3, 9, 9))
        assert all(c["ok"] for c in checks.values()), (ratio, checks)
        assert not exp.student_width and any(g.teacher_width > g.width for g in exp.groups)


def test_a_batchnorm_act_with_a_parametrised_activation_runs_at_the_students_width():
    """timm's BatchNormAct2d with a PReLU: the BatchNorm rule knows the normalisation's parameters, not the
    activation's (an internal error over the unmapped slope before); it runs unwidened, exactly."""
    from timm.layers import BatchNormAct2d

    from gpdc.exactness import randomize

    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.PReLU), nn.Conv2d(8, 8, 3),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)))
    exp = gpdc.expand(model, {"input_shape": [2, 3, 8, 8], "expand": {"ratio": 2.0}})
    assert list(exp.student_width) == ["_1"]
    checks = check_expansion(exp, torch.randn(2, 3, 8, 8))
    assert all(c["ok"] for c in checks.values()), checks


def test_timms_linear_is_traced_through_to_f_linear_and_widened():
    """timm's Linear (a nn.Linear with a forward of its own) needs no entry of its own: F.linear inside it has a rule."""
    from timm.layers import Linear

    from gpdc.rules.functional import FunctionalDenseRule

    model = Around(Linear(8, 6), 6)
    an = ChannelAnalysis(gpdc.trace(model, [2, 3, 4, 4]))
    assert [type(an.rules.get(n)) for n in an.gm.graph.nodes if n.target is torch.nn.functional.linear] == \
        [FunctionalDenseRule]
    exp = gpdc.expand(model, {"input_shape": [2, 3, 4, 4], "expand": {"ratio": 1.5}})
    assert not exp.student_width and sum(g.teacher_width > g.width for g in exp.groups) == 2
    checks = check_expansion(exp, torch.randn(2, 3, 4, 4))
    assert all(c["ok"] for c in checks.values()), checks
