"""Token mixers, registered by name: ``create_mixer(name, dim, num_heads=..., **hparams)``."""

from .aggregated import AggregatedAttention, CosineGlobalAttention
from .gates import EcaGate, EcaMixer, ElaGate, ElaMixer
from .global_attention import GlobalAttention
from .halo import HaloAttention
from .multi_axis import MultiAxisAttention, PartitionAttention
from .neighborhood import NeighborhoodAttention
from .registry import MultiHeadMixer, TokenMixer, create_mixer, get_mixer_class, list_mixers, register_mixer
from .routing import GlobalLePEAttention, RoutingAttention

__all__ = [
    "AggregatedAttention",
    "CosineGlobalAttention",
    "EcaGate",
    "EcaMixer",
    "ElaGate",
    "ElaMixer",
    "GlobalAttention",
    "GlobalLePEAttention",
    "HaloAttention",
    "MultiAxisAttention",
    "MultiHeadMixer",
    "NeighborhoodAttention",
    "PartitionAttention",
    "RoutingAttention",
    "TokenMixer",
    "create_mixer",
    "get_mixer_class",
    "list_mixers",
    "register_mixer",
]
