"""The rewrite passes, one per file, in pipeline order (installed as ``gpdc.passes``)."""

from .branch import ChannelBranchReparameterization
from .expand import InverseReparameterization
from .sink import SinkParameterChains

__all__ = ["SinkParameterChains", "InverseReparameterization", "ChannelBranchReparameterization"]
