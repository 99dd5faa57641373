"""Every registration of a torchvision or timm class or function, in one table.

gpdc's rules are written against torch. A third-party library needs an entry here when tracing would
otherwise lose what a rule needs: a module kept as one node (a leaf) so that the rule of its class
applies, or a rule for a function the library hides from torch.fx (``torch.fx.wrap``, timm's notrace
registry), which reaches gpdc as one opaque call. Everything else a library does is traced into and
handled by the torch rules or the probe. ``gpdc rules`` lists the table; entries of a library that is
not installed (timm is optional) are skipped. Each entry's comment names the tests that fire it besides
``tests/test_rule_registry.py``, which fires every entry on a small model.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass

from ..trace import register_leaf_function, register_leaf_module
from .attention import TimmAttentionRule, WindowAttentionRule
from .elementwise import ChannelwiseRule
from .movement import MoveRule, SpaceToChannelsRule
from .producers import StdConvRule
from .registry import _FUNCTION_RULES, _MODULE_RULES, Rule, register_function_rule, register_module_rule

_TABLES = {"module rule": _MODULE_RULES, "function rule": _FUNCTION_RULES}
_APPLY = {
    "module rule": register_module_rule,
    "function rule": register_function_rule,
    "leaf module": lambda target, rule: register_leaf_module(target),
    "leaf function": lambda target, rule: register_leaf_function(target),
}


@dataclass(frozen=True)
class Integration:
    """One registration: ``target`` (``package.module.name``) of ``library`` gets ``rule`` or becomes a leaf."""

    library: str
    target: str
    kind: str  # a key of _APPLY
    reason: str
    rule: Rule | None = None  # module and function rules only

    @property
    def installed(self) -> bool:
        return importlib.util.find_spec(self.library) is not None

    def resolve(self):
        """The class or function named by ``target`` (imports its module)."""
        module, _, name = self.target.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def as_dict(self) -> dict:
        return {"library": self.library, "target": self.target, "kind": self.kind,
                "rule": None if self.rule is None else repr(self.rule), "reason": self.reason,
                "installed": self.installed}


_HEADS_LEAF = ("its forward splits channels into heads with sizes read from its attributes: kept one node, so "
               "the teacher is the same class with more heads")
_WINDOW_HEADS = WindowAttentionRule()

INTEGRATIONS: tuple[Integration, ...] = (
    # tests/test_transformers.py::test_transformer_exact_fold_and_onnx[torchvision:swin_t],
    # tests/test_zoo.py::test_exact_fold_and_onnx[torchvision:swin_v2_t]
    Integration("torchvision", "torchvision.models.swin_transformer._patch_merging_pad", "function rule",
                "fx-wrapped by torchvision (one node): gathers each 2x2 patch of a channels-last map into 4 blocks of "
                "channels (Swin patch merging)", SpaceToChannelsRule(4)),
    # tests/test_transformers.py::test_transformer_exact_fold_and_onnx[torchvision:convnext_tiny] (and swin_t),
    # tests/test_zoo.py::test_exact_fold_and_onnx[torchvision:efficientnet_b0]
    Integration("torchvision", "torchvision.ops.stochastic_depth", "function rule",
                "fx-wrapped by torchvision (one node): drops whole samples, every channel alike (the probe refuses "
                "random ops)", ChannelwiseRule()),
    # tests/test_rule_registry.py only: torch.fx traces into the module, down to stochastic_depth
    Integration("torchvision", "torchvision.ops.StochasticDepth", "module rule",
                "the module around stochastic_depth, for models that keep it as a leaf", ChannelwiseRule()),
    # tests/test_transformers.py::test_transformer_exact_fold_and_onnx[torchvision:swin_t],
    # tests/test_zoo.py::test_exact_fold_and_onnx[torchvision:swin_v2_t] (V2 subclasses V1)
    Integration("torchvision", "torchvision.models.swin_transformer.ShiftedWindowAttention", "leaf module",
                _HEADS_LEAF),
    Integration("torchvision", "torchvision.models.swin_transformer.ShiftedWindowAttention", "module rule",
                "widens by whole heads; per-head bias table, V2 logit scale and bias MLP", _WINDOW_HEADS),
    # tests/test_transformers.py::test_transformer_exact_fold_and_onnx[torchvision:maxvit_t]
    Integration("torchvision", "torchvision.models.maxvit.RelativePositionalMultiHeadAttention", "leaf module",
                _HEADS_LEAF),
    Integration("torchvision", "torchvision.models.maxvit.RelativePositionalMultiHeadAttention", "module rule",
                "widens by whole heads, like Swin's window attention under MaxViT's attribute names",
                WindowAttentionRule("to_qkv", "merge", "n_heads")),
    # tests/test_zoo.py::test_exact_fold_and_onnx[timm:resnetv2_50x1_bit]
    Integration("timm", "timm.layers.StdConv2d", "leaf module",
                "standardises its weight inside forward: kept one node, so its rule sees the raw weight"),
    Integration("timm", "timm.layers.StdConv2d", "module rule",
                "the teacher standardises each row with statistics that count every student input channel once",
                StdConvRule()),
    # tests/test_transformers.py::test_transformer_exact_fold_and_onnx[timm:deit_tiny_patch16_224]
    # (and vit_small_patch16_224), tests/test_transformers.py::test_per_layer_ratios_in_transformer_blocks
    Integration("timm", "timm.layers.attention.Attention", "leaf module", _HEADS_LEAF),
    Integration("timm", "timm.layers.attention.Attention", "module rule",
                "widens by whole heads: fused qkv, q/k norms over the head size", TimmAttentionRule()),
    # tests/test_zoo.py::test_exact_fold_and_onnx[timm:swin_tiny_patch4_window7_224]
    Integration("timm", "timm.models.swin_transformer.WindowAttention", "leaf module", _HEADS_LEAF),
    Integration("timm", "timm.models.swin_transformer.WindowAttention", "module rule",
                "widens by whole heads; per-head relative position bias table", _WINDOW_HEADS),
    # tests/test_zoo.py::test_exact_fold_and_onnx[timm:swin_tiny_patch4_window7_224]
    Integration("timm", "timm.models.swin_transformer.window_reverse", "function rule",
                "a timm notrace function (one node): reshapes windows back into a channels-last map, channels "
                "untouched", MoveRule()),
)


def register_integrations(imported_only: bool = True) -> None:
    """Apply the table for the libraries already imported (``imported_only``: a model can only hold classes and call
    functions of a library that is imported, and importing timm costs a third of a second) or for every installed
    one, skipping targets that already have a rule (one a user registered wins); applying it again changes nothing.
    gpdc applies it each time it traces or analyses a model (and for ``gpdc rules``, every library), so importing
    gpdc does not import torchvision's and timm's model code."""
    for entry in INTEGRATIONS:
        if entry.library in sys.modules if imported_only else entry.installed:
            target = entry.resolve()
            if entry.rule is None or _TABLES[entry.kind].get(target) is None:
                _APPLY[entry.kind](target, entry.rule)
