"""visionzoo: vision backbones built from interchangeable token mixers, registered with timm.

``import visionzoo`` registers every model, so ``timm.create_model("mixvit_tiny")`` works.
"""

from __future__ import annotations

from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import timm

from . import kernels
from .mixers import create_mixer, list_mixers, register_mixer

try:
    __version__ = version("visionzoo")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "backbones",
    "create_mixer",
    "kernels",
    "list_mixers",
    "list_models",
    "list_recipes",
    "register_mixer",
]


def list_models(pattern: str = "*") -> list[str]:
    """Names of the timm models that visionzoo registers, filtered by a shell-style ``pattern``."""
    return [
        name
        for name in timm.list_models(pattern)
        if timm.models.model_entrypoint(name).__module__.startswith(f"{__name__}.")
    ]


def list_recipes() -> list[str]:
    """Recipe paths relative to the packaged ``recipes`` folder, e.g. ``classification/quickstart.yaml``."""
    root = resources.files(f"{__name__}.recipes")
    with resources.as_file(root) as path:
        return sorted(p.relative_to(path).as_posix() for p in Path(path).rglob("*.yaml"))


from . import backbones  # noqa: E402  (last: registers the models with timm)
