"""User-facing errors.

Every error a user can cause (a bad spec, an untraceable model, an op without a rule) is a
``GpdcError``: the CLI prints its one-paragraph message and exits with code 2, no traceback.
Anything else escaping the compiler is a bug in gpdc.
"""


class GpdcError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""

    exit_code = 2


class SpecError(GpdcError):
    """The YAML/dict spec is invalid, or does not fit the model."""


class TraceError(GpdcError):
    """torch.fx could not trace the model."""


class RuleError(GpdcError):
    """A graph node has no channel rule, or its rule cannot handle it."""


class UnmatchableError(RuleError):
    """An op no teacher can match, at any width (a random op): never run at the student's width instead."""


class CouplingError(GpdcError):
    """Two coupled channel spaces cannot be widened consistently."""


class InternalError(GpdcError):
    """Something inside gpdc failed that should not (a gpdc bug): the message names the stage, node and
    rule, so the report can be acted on; the CLI still prints one paragraph, no traceback."""
