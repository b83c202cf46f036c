"""Property tests over every registered mixer: random batch, map size (window/region multiples or not, the
minimum) and channels split into heads keep the shape and finite values; a map below the minimum is refused.

Mixers come from the registry, each with small random hyper-parameters drawn for the keyword arguments its
constructor has (:data:`SMALL_HPARAMS`, by argument name), so a newly registered mixer is covered at once.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from visionzoo.mixers import create_mixer, get_mixer_class, list_mixers

# Strategies for the hyper-parameters mixers share by name: small windows and regions, so that maps of a few
# tokens already hold several of them and the padded (not divisible) case is common.
SMALL_HPARAMS = {
    "kernel_size": st.sampled_from([1, 3, 5]),
    "dilation": st.integers(1, 2),
    "n_win": st.integers(1, 3),
    "topk": st.integers(1, 4),
    "side_dwconv": st.sampled_from([0, 3]),
    "block_size": st.integers(1, 4),
    "halo_size": st.integers(0, 2),
    "window_size": st.sampled_from([1, 3]),
    "grid_size": st.sampled_from([None, 2, 3]),
    "partition": st.sampled_from(["block", "grid", "both"]),
    "sr_ratio": st.integers(1, 3),
    "pretrain_size": st.sampled_from([None, 4]),
    "rel_pos_bias": st.booleans(),
    "qkv_bias": st.booleans(),
    "eca_kernel_size": st.sampled_from([None, 3]),
    "ela_variant": st.sampled_from(["T", "B", "S", "L"]),
}
MIXERS = list_mixers()
MAX_EXTRA = 9  # map sizes drawn from [minimum, minimum + MAX_EXTRA]

PROPERTY_SETTINGS = settings(
    max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.filter_too_much]
)


@st.composite
def mixer_configs(draw, name: str):
    """(mixer, dim): channels are heads x head_dim; a constructor that refuses them must say why."""
    heads = draw(st.sampled_from([1, 2, 4]))
    dim = heads * draw(st.sampled_from([8, 16]))
    accepted = inspect.signature(get_mixer_class(name)).parameters
    hparams = {key: draw(strategy) for key, strategy in SMALL_HPARAMS.items() if key in accepted}
    try:
        mixer = create_mixer(name, dim, num_heads=heads, **hparams)
    except ValueError as error:  # e.g. ELA's group norm needs channels divisible by its groups
        assert str(dim) in str(error), f"{name}({dim}, {hparams}) refused without naming the channels: {error}"
        assume(False)
    return mixer.eval(), dim


@st.composite
def sizes_from_minimum(draw, min_size: tuple[int, int]):
    """(H, W) from the minimum up to :data:`MAX_EXTRA` above it."""
    min_h, min_w = min_size
    height = draw(st.integers(min_h, min_h + MAX_EXTRA), label="height")
    width = draw(st.integers(min_w, min_w + MAX_EXTRA), label="width")
    return height, width


@st.composite
def sizes_below_minimum(draw, min_size: tuple[int, int]):
    """(H, W) with one side below the minimum and the other at or above both minima."""
    min_h, min_w = min_size
    short_side = draw(st.sampled_from(["height", "width"]), label="short side")
    short = draw(st.integers(0, (min_h if short_side == "height" else min_w) - 1), label="short")
    other = draw(st.integers(max(min_h, min_w), max(min_h, min_w) + 4), label="other")
    return (short, other) if short_side == "height" else (other, short)


@pytest.mark.parametrize("name", MIXERS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_any_size_at_or_above_the_minimum_keeps_shape_and_finite_values(name, data):
    mixer, dim = data.draw(mixer_configs(name), label="mixer")
    batch = data.draw(st.integers(1, 2), label="batch")
    height, width = data.draw(sizes_from_minimum(mixer.min_size), label="map size")
    x = torch.randn(batch, height, width, dim, requires_grad=True)
    out = mixer(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", MIXERS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_a_map_below_the_minimum_is_refused_naming_it(name, data):
    mixer, dim = data.draw(mixer_configs(name), label="mixer")
    size = data.draw(sizes_below_minimum(mixer.min_size), label="map size")
    min_h, min_w = mixer.min_size
    with pytest.raises(ValueError, match=rf"at least {min_h}x{min_w} tokens, got {size[0]}x{size[1]}"):
        mixer(torch.randn(1, *size, dim))


@pytest.mark.parametrize("name", MIXERS)
def test_the_minimum_size_itself_works(name):
    """The exact minimum with the default hyper-parameters (not left to the draw)."""
    mixer = create_mixer(name, 32, num_heads=2).eval()
    out = mixer(torch.randn(1, *mixer.min_size, 32))
    assert out.shape == (1, *mixer.min_size, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", MIXERS)
def test_wrong_channels_or_rank_are_refused(name):
    mixer = create_mixer(name, 32, num_heads=2)
    height, width = (max(s, 2) for s in mixer.min_size)
    for bad in (torch.randn(1, height, width, 16), torch.randn(height, width, 32)):
        with pytest.raises(ValueError, match=r"expects a channels-last map \(B, H, W, 32\)"):
            mixer(bad)
