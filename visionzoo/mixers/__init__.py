"""Token mixers, registered by name: ``create_mixer(name, dim, num_heads=..., **hparams)``."""

from . import registry
from .aggregated import AggregatedAttention, CosineGlobalAttention
from .channel import ChannelAttention
from .gates import EcaGate, EcaMixer, ElaGate, ElaMixer
from .global_attention import GlobalAttention
from .halo import HaloAttention
from .multi_axis import MultiAxisAttention, PartitionAttention
from .neighborhood import NeighborhoodAttention
from .registry import *  # noqa: F403  (the mixer base classes and the registry functions)
from .routing import GlobalLePEAttention, RoutingAttention

__all__ = [
    *(name for name in registry.__all__ if name != "resolve_num_heads"),
    "AggregatedAttention",
    "ChannelAttention",
    "CosineGlobalAttention",
    "EcaGate",
    "EcaMixer",
    "ElaGate",
    "ElaMixer",
    "GlobalAttention",
    "GlobalLePEAttention",
    "HaloAttention",
    "MultiAxisAttention",
    "NeighborhoodAttention",
    "PartitionAttention",
    "RoutingAttention",
]
