"""Detection and segmentation heads over ``features_only`` backbones."""

if __name__ != "visionzoo.heads":
    raise ImportError(
        f"this package is visionzoo.heads; importing it as {__name__!r} would load a second copy. "
        "Install visionzoo (pip install -e .) and import visionzoo.heads."
    )

from .detection import DETECTORS, FeaturePyramidBackbone, create_detector, list_detectors
from .features import FeatureBackbone
from .segmentation import (
    DECODERS,
    Segmenter,
    SemanticFPNDecoder,
    UPerNetDecoder,
    convert_mmseg_heads,
    create_segmenter,
    list_segmenters,
)

__all__ = [
    "DECODERS",
    "DETECTORS",
    "FeatureBackbone",
    "FeaturePyramidBackbone",
    "Segmenter",
    "SemanticFPNDecoder",
    "UPerNetDecoder",
    "convert_mmseg_heads",
    "create_detector",
    "create_segmenter",
    "list_detectors",
    "list_segmenters",
]
