"""Channel rules, registered on import: one file per family of ops; the table of torchvision and timm integrations
(``integrations``), which builds on their rules, is applied when gpdc first traces or analyses a model."""

from . import attention, contraction, elementwise, functional, movement, norm, params, probe, producers  # noqa: F401,E501  (registration side effects)
from .context import AnalysisContext, ChannelsIn, ExpansionContext
from .elementwise import register_elementwise
from .integrations import register_integrations
from .registry import Rule, register_function_rule, register_method_rule, register_module_rule, scoped


__all__ = ["Rule", "AnalysisContext", "ExpansionContext", "ChannelsIn", "register_integrations", "register_module_rule", "register_function_rule", "register_method_rule", "register_elementwise",
           "scoped"]
