"""gpdc: a declarative torch.fx graph-rewriting compiler for Gap Preserving Distillation.

Pipeline: trace → analyze → plan → expand (IR) → share; see DESIGN.md.
"""

from . import rules  # noqa: F401  (registers the built-in channel rules)
from .errors import CouplingError, GpdcError, RuleError, SpecError, TraceError
from .expansion import Expansion, expand
from .feature_kd import FeatureLoss, register_feature_loss
from .gpd import GPD, GPDOutput
from .rules import Rule, register_elementwise, register_function_rule, register_method_rule, register_module_rule
from .spec import Spec, load_spec
from .trace import register_leaf_function, register_leaf_module, symbolic_trace, trace
from .train.allocator import keep_freed_memory

__all__ = [
    "expand", "Expansion", "GPD", "GPDOutput", "FeatureLoss", "register_feature_loss", "Spec", "load_spec", "trace", "symbolic_trace",
    "register_leaf_module", "register_leaf_function", "register_module_rule", "register_function_rule",
    "register_method_rule", "register_elementwise", "Rule", "keep_freed_memory",
    "GpdcError", "SpecError", "TraceError", "RuleError", "CouplingError",
]
