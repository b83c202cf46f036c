"""Runs pytorch-image-models' ``tests/test_models.py`` against visionzoo's registered models only.

Put timm's file (from the timm commit matching the installed version) next to this one and run pytest
here; see docs/testing.md. TorchScript tests are left out: the zoo's kernels are not scriptable.
"""

import os

os.environ.setdefault("TORCH_BACKEND", "visionzoo")  # test_models imports it before it lists the models

import visionzoo

OURS = set(visionzoo.list_models())


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        ours = callspec is not None and callspec.params.get("model_name") in OURS
        (keep if ours and "torchscript" not in item.name else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
