"""The registered models that zoo-wide tests parametrize over (a plain module: test modules import it,
never each other). ``conftest`` imports it first, after setting what must precede the kernels."""

import sys

import timm

import visionzoo

MODELS = visionzoo.list_models()


def _declared_order(name: str) -> int:
    """Position of ``name`` in its module's ``default_cfgs``, which list a family's sizes smallest first."""
    module = sys.modules[timm.models.model_entrypoint(name).__module__]
    return list(module.default_cfgs).index(name)


def _smallest_of_each_family(names: list[str]) -> list[str]:
    """The first declared model of each family (``pretrained_cfg["family"]``, which the models declare)."""
    smallest: dict[str, str] = {}
    for name in sorted(names, key=_declared_order):
        smallest.setdefault(timm.models.get_pretrained_cfg(name).family, name)
    return sorted(smallest.values())


# Sizes of a family share their code: the thorough per-model tests run on the smallest one.
FAMILY_MODELS = _smallest_of_each_family(MODELS)
