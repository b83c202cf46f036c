"""Detection and segmentation heads over ``features_only`` backbones."""

if __name__ != "visionzoo.heads":
    raise ImportError(
        f"this package is visionzoo.heads; importing it as {__name__!r} would load a second copy. "
        "Install visionzoo (pip install -e .) and import visionzoo.heads."
    )
