"""The papers' figures: the one place they are written.

For each paper-family model, the official parameter count (exactly what the official code
builds, 1000 classes), the multiply-accumulates at 224x224 that the paper reports (papers
call them FLOPs) and the ImageNet-1K top-1 at 224 it reports. Each family's ``default_cfgs``
carries its models' entries (:func:`visionzoo.backbones.helpers.generate_backbone_cfgs`), so
``model.pretrained_cfg`` holds them; the timm models we compare against have their top-1 here.
"""

from __future__ import annotations

from typing import Any

import timm

__all__ = ["COMPARISON_FIGURES", "FAMILY_FIGURES", "FIGURE_KEYS", "paper_figures"]

FIGURE_KEYS = ("paper", "paper_params", "paper_gmacs", "paper_top1")

_NAT = "NAT (arXiv:2204.07143)"
_DINAT = "DiNAT (arXiv:2209.15001)"
_BIFORMER = "BiFormer (arXiv:2303.08810)"
_TRANSNEXT = "TransNeXt (arXiv:2311.17132)"

# model: (official parameters, paper GMACs, paper top-1), grouped by paper
_FIGURES = {
    _NAT: {
        "nat_mini": (19_984_174, 2.7, 81.8),
        "nat_tiny": (27_901_582, 4.3, 83.2),
        "nat_small": (50_743_297, 7.8, 83.7),
        "nat_base": (89_769_652, 13.7, 84.3),
    },
    _DINAT: {
        "dinat_mini": (19_984_174, 2.7, 81.8),
        "dinat_tiny": (27_901_582, 4.3, 82.7),
        "dinat_small": (50_719_681, 7.8, 83.8),  # no LayerScale, unlike nat_small
        "dinat_base": (89_769_652, 13.7, 84.4),
    },
    _BIFORMER: {
        "biformer_tiny": (13_142_760, 2.2, 81.4),
        "biformer_small": (25_536_232, 4.5, 83.8),
        "biformer_base": (56_804_968, 9.8, 84.3),
    },
    _TRANSNEXT: {
        "transnext_micro": (12_809_304, 2.7, 82.5),
        "transnext_tiny": (28_258_960, 5.7, 84.0),
        "transnext_small": (49_741_564, 10.3, 84.7),
        "transnext_base": (89_721_496, 18.4, 84.8),
    },
}

FAMILY_FIGURES: dict[str, dict[str, Any]] = {
    name: dict(zip(FIGURE_KEYS, (paper, *figures), strict=True))
    for paper, models in _FIGURES.items()
    for name, figures in models.items()
}

# timm models that docs/models.md and the benchmarks compare ours with: the top-1 their papers report
COMPARISON_FIGURES: dict[str, dict[str, Any]] = {
    "convnext_tiny": {"paper": "ConvNeXt (arXiv:2201.03545)", "paper_top1": 82.1},
    "swin_tiny_patch4_window7_224": {"paper": "Swin Transformer (arXiv:2103.14030)", "paper_top1": 81.3},
    "maxvit_tiny_tf_224": {"paper": "MaxViT (arXiv:2204.01697)", "paper_top1": 83.6},
    "davit_tiny": {"paper": "DaViT (arXiv:2204.03645)", "paper_top1": 82.8},
}


def paper_figures(name: str) -> dict[str, Any]:
    """The paper's figures of a model (``paper``, ``paper_params``, ``paper_gmacs``, ``paper_top1``; those known).

    Ours come from the registered pretrained cfg, timm's comparison models from
    :data:`COMPARISON_FIGURES`; a model with neither gives an empty dict.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    figures = {key: getattr(cfg, key) for key in FIGURE_KEYS if getattr(cfg, key, None) is not None}
    return figures or dict(COMPARISON_FIGURES.get(name.split(".")[0], {}))
