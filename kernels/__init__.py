"""Functional attention ops: a PyTorch reference per op, fast backends and their dispatch."""

if __name__ != "visionzoo.kernels":
    raise ImportError(
        f"this package is visionzoo.kernels; importing it as {__name__!r} would load a second copy. "
        "Install visionzoo (pip install -e .) and import visionzoo.kernels."
    )

from .aggregated import (
    aggregated_attention,
    aggregated_attention_reference,
    aggregated_attention_unfold,
    gather_pool_bias,
    length_scale,
    pooled_position_coords,
)
from .attention import dense_attention, dense_attention_reference, dense_attention_weights
from .dispatch import ENV_VAR, Capability, KernelOp, get_op, is_exporting, list_ops, use_backend
from .halo import halo_attention, halo_attention_reference
from .neighborhood import (
    neighborhood_attention,
    neighborhood_attention_reference,
    neighborhood_attention_weights,
    neighborhood_windows,
)
from .routing import (
    bilevel_routing_attention,
    bilevel_routing_attention_gather,
    bilevel_routing_attention_reference,
    bilevel_routing_attention_weights,
    route_regions,
)
from .windows import (
    adaptive_avg_pool,
    crop_map,
    pad_to_multiple,
    partition_windows,
    relative_position_index,
    unpartition_windows,
)

__all__ = [
    "ENV_VAR",
    "Capability",
    "KernelOp",
    "adaptive_avg_pool",
    "aggregated_attention",
    "aggregated_attention_reference",
    "aggregated_attention_unfold",
    "bilevel_routing_attention",
    "bilevel_routing_attention_gather",
    "bilevel_routing_attention_reference",
    "bilevel_routing_attention_weights",
    "crop_map",
    "dense_attention",
    "dense_attention_reference",
    "dense_attention_weights",
    "gather_pool_bias",
    "get_op",
    "halo_attention",
    "halo_attention_reference",
    "is_exporting",
    "length_scale",
    "list_ops",
    "neighborhood_attention",
    "neighborhood_attention_reference",
    "neighborhood_attention_weights",
    "neighborhood_windows",
    "pad_to_multiple",
    "partition_windows",
    "pooled_position_coords",
    "relative_position_index",
    "route_regions",
    "unpartition_windows",
    "use_backend",
]
