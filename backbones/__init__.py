"""Model families registered with timm on import."""

if __name__ != "visionzoo.backbones":
    raise ImportError(
        f"this package is visionzoo.backbones; importing it as {__name__!r} would register every model twice. "
        "Install visionzoo (pip install -e .) and import visionzoo."
    )

from . import biformer, ela_resnet, nat, transnext
from .mixvit import MixVit, MixVitCfg

__all__ = ["MixVit", "MixVitCfg", "biformer", "ela_resnet", "nat", "transnext"]
