"""Token mixers, registered by name: ``create_mixer(name, dim, num_heads=..., **hparams)``."""

from .global_attention import GlobalAttention
from .neighborhood import NeighborhoodAttention
from .registry import MultiHeadMixer, TokenMixer, create_mixer, get_mixer_class, list_mixers, register_mixer

__all__ = [
    "GlobalAttention",
    "MultiHeadMixer",
    "NeighborhoodAttention",
    "TokenMixer",
    "create_mixer",
    "get_mixer_class",
    "list_mixers",
    "register_mixer",
]
