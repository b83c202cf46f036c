"""Every family against what it declares: the paper's parameter count and GMACs (read from the models'
pretrained cfgs, ``backbones/papers.py``), checkpoints of our own layout through the family's
``checkpoint_filter_fn``, and a training step that reaches each family's own parameters.

Comparisons with the official forward passes stay in the family test modules.
"""

import re
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

from visionzoo.backbones.helpers import PretrainedWeightsError
from visionzoo.backbones.papers import paper_figures
from visionzoo.stats import model_stats

from zoo_models import FAMILY_MODELS, MODELS

PAPER_MODELS = [name for name in MODELS if "paper_params" in paper_figures(name)]

# Counting GMACs takes seconds a model: these run in every test run, the others with `make test-slow`.
QUICK_GMACS = {"nat_mini", "dinat_tiny", "nat_base", "biformer_tiny", "transnext_micro"}
GMACS_TOLERANCE = 0.02


def test_every_paper_family_declares_its_figures():
    families = {timm.models.get_pretrained_cfg(name).family for name in PAPER_MODELS}
    assert families == {"nat", "dinat", "biformer", "transnext"}
    assert all(paper_figures(name).keys() >= {"paper", "paper_gmacs", "paper_top1"} for name in PAPER_MODELS)


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_parameter_counts_equal_official(name):
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == paper_figures(name)["paper_params"]


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in QUICK_GMACS else pytest.mark.slow) for n in PAPER_MODELS]
)
def test_gmacs_within_two_percent_of_paper(name):
    gmacs, paper = model_stats(name).gmacs, paper_figures(name)["paper_gmacs"]
    assert abs(gmacs - paper) / paper < GMACS_TOLERANCE, gmacs


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_filter_passes_our_own_layout_through(name):
    checkpoint_filter_fn = sys.modules[timm.models.model_entrypoint(name).__module__].checkpoint_filter_fn
    model = timm.create_model(name)
    ours = model.state_dict()
    for checkpoint in (ours, {"model": ours}, {"state_dict": ours}):
        assert checkpoint_filter_fn(checkpoint, model).keys() == ours.keys()


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_foreign_checkpoint_lists_missing_and_unexpected_keys(name, load_official):
    checkpoint = timm.create_model(name).state_dict()
    missing = list(checkpoint)[-1]
    del checkpoint[missing]
    checkpoint["stages.0.foreign.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=rf"(?s)Missing key.*{re.escape(missing)}.*Unexpected.*stages\.0\.foreign"):
        load_official(name, checkpoint)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_pretrained_weights_out_of_reach_name_the_source_and_the_local_file_option(name, tmp_path):
    url = f"http://127.0.0.1:9/visionzoo-unreachable-{name}.pth"  # nothing listens: refused at once
    with pytest.raises(PretrainedWeightsError, match=rf"cannot download the pretrained weights from {re.escape(url)}"):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(url=url))
    missing = tmp_path / "missing.pth"
    with pytest.raises(
        PretrainedWeightsError, match=rf"{name}: no pretrained weights file at {re.escape(str(missing))}$"
    ):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))


# model, kwargs, input size, a parameter of the family's own mixer, parameters spared weight decay
TRAIN_CASES = [
    ("nat_tiny", {}, (97, 131), "stages.0.blocks.0.mixer.rpb", {"stages.0.blocks.0.mixer.rpb"}),
    ("dinat_tiny", {}, (97, 131), "stages.0.blocks.0.mixer.rpb", {"stages.0.blocks.0.mixer.rpb"}),
    ("biformer_tiny", {}, (45, 71), "stages.0.blocks.0.mixer.lepe.weight", set()),
    (
        "transnext_micro",
        {"depths": (1, 1, 1, 1)},
        (97, 131),
        "stages.0.blocks.0.mixer.learnable_tokens",
        {"stages.0.blocks.0.mixer.relative_pos_bias_local", "stages.3.blocks.0.mixer.cpb_fc1.weight"},
    ),
]


@pytest.mark.parametrize("name, kwargs, size, param, no_decay", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_step_on_cpu(name, kwargs, size, param, no_decay):
    model = timm.create_model(name, num_classes=10, drop_path_rate=0.1, **kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(2, 3, *size), torch.tensor([3, 7])
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    grad = model.get_parameter(param).grad
    assert torch.isfinite(loss) and grad is not None and grad.abs().sum() > 0
    assert no_decay <= model.no_weight_decay()
