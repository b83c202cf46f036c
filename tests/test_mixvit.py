"""The mixvit family: per-stage and per-block mixer configuration."""

from functools import cache

import pytest
import timm
import torch

import visionzoo
from visionzoo.backbones.mixvit import DownsampleCfg, MixVitCfg, StemCfg
from visionzoo.mixers import GlobalAttention
from visionzoo.stats import model_stats


def test_mixer_kwargs_cycle_over_blocks():
    cfg = MixVitCfg(
        depths=(1, 1, 3, 1),
        mixers=("global", "global", ("global", "global"), "global"),
        mixer_kwargs=({}, {}, ({"qkv_bias": False}, {"qkv_bias": True}), {}),
    )
    model = timm.create_model("mixvit_tiny", depths=cfg.depths, mixers=cfg.mixers, mixer_kwargs=cfg.mixer_kwargs)
    biases = [block.mixer.qkv.bias is not None for block in model.stages[2].blocks]
    assert biases == [False, True, False]


def test_mixer_prefixed_kwargs_reach_every_block():
    model = timm.create_model("mixvit_mini", mixer_backend="reference", mixer_head_dim=16, num_heads=(None,) * 4)
    mixers = [m for m in model.modules() if isinstance(m, GlobalAttention)]
    assert mixers and all(m.backend == "reference" for m in mixers)
    assert [m.num_heads for m in mixers[:1]] == [64 // 16]


def test_stage_override_of_mixer_kwargs_wins_over_prefixed():
    model = timm.create_model("mixvit_mini", mixer_qkv_bias=False, mixer_kwargs=({"qkv_bias": True}, {}, {}, {}))
    assert model.stages[0].blocks[0].mixer.qkv.bias is not None
    assert model.stages[1].blocks[0].mixer.qkv.bias is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(depths=(2, 2, 2)), "embed_dim has 4 entries for 3 stages"),
        (dict(mixers=("global",) * 3), "mixers has 3 entries for 4 stages"),
        (dict(mixers=("global", "nope", "global", "global")), "unknown mixer 'nope'"),
        (dict(mlp_layer="swiglu"), "unknown channel mixer 'swiglu'; valid: conv_glu, mlp"),
        (dict(mixer_kwargs=((), {}, {}, {})), "stage 0 has an empty mixer or mixer_kwargs sequence"),
    ],
)
def test_bad_configuration_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model("mixvit_mini", **kwargs)


def test_nested_groups_take_mappings_and_a_stem_kind():
    model = timm.create_model("mixvit_mini", stem="patch", downsample={"bias": True})
    assert model.stem.conv.kernel_size == (7, 7) and model.stages[1].downsample.conv.bias is not None
    assert MixVitCfg(stem="patch", downsample={"bias": True}).stem == StemCfg(kind="patch")
    assert MixVitCfg(downsample={"bias": True}).downsample == DownsampleCfg(bias=True)
    with pytest.raises(ValueError, match="stem must be 'conv' or 'patch', got 'pixel'"):
        MixVitCfg(stem="pixel")


def test_conv_glu_and_layer_scale():
    model = timm.create_model("mixvit_mini", mlp_layer="conv_glu", layer_scale_init=1e-5, drop_path_rate=0.1)
    block = model.stages[0].blocks[0]
    hidden = int(2 * int(64 * 3.0) / 3)
    assert block.mlp.fc1.out_features == 2 * hidden and block.mlp.dwconv.groups == hidden
    torch.testing.assert_close(block.ls1.gamma, torch.full((64,), 1e-5))
    out = model(torch.randn(1, 3, 70, 90))
    assert out.shape == (1, 1000)


@pytest.mark.parametrize("name", [n for n in visionzoo.list_models("mixvit_tiny_*") if n != "mixvit_tiny_neighborhood"])
def test_presets_match_the_local_baseline(name):
    # params within 5% of mixvit_tiny; MACs within 5% of mixvit_tiny_neighborhood (mixvit_tiny's
    # global mixer is quadratic: 8.9 GMACs at 224x224 against 4.3 for the local mixers)
    stats = model_stats(name)
    assert abs(stats.params / _stats("mixvit_tiny").params - 1) < 0.05
    assert abs(stats.gmacs / _stats("mixvit_tiny_neighborhood").gmacs - 1) < 0.05


_stats = cache(model_stats)
