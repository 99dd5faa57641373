"""Channel rules, registered on import: one file per family of ops."""

from . import attention, elementwise, functional, movement, norm, params, probe, producers  # noqa: F401  (registration side effects)
from .elementwise import register_elementwise
from .registry import Rule, register_function_rule, register_method_rule, register_module_rule

__all__ = ["Rule", "register_module_rule", "register_function_rule", "register_method_rule", "register_elementwise"]
