"""The rewrite passes, one per file, in pipeline order (installed as ``gpdc.passes``)."""

from .expand import InverseReparameterization

__all__ = ["InverseReparameterization"]
