"""The rewrite passes, one per file, in pipeline order (installed as ``gpdc.passes``)."""

from .branch import ChannelBranchReparameterization
from .expand import InverseReparameterization

__all__ = ["InverseReparameterization", "ChannelBranchReparameterization"]
