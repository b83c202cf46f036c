"""Token mixers, registered by name: ``create_mixer(name, dim, num_heads=..., **hparams)``."""

from .gates import EcaGate, EcaMixer
from .global_attention import GlobalAttention
from .halo import HaloAttention
from .multi_axis import MultiAxisAttention, PartitionAttention
from .neighborhood import NeighborhoodAttention
from .registry import MultiHeadMixer, TokenMixer, create_mixer, get_mixer_class, list_mixers, register_mixer

__all__ = [
    "EcaGate",
    "EcaMixer",
    "GlobalAttention",
    "HaloAttention",
    "MultiAxisAttention",
    "MultiHeadMixer",
    "NeighborhoodAttention",
    "PartitionAttention",
    "TokenMixer",
    "create_mixer",
    "get_mixer_class",
    "list_mixers",
    "register_mixer",
]
