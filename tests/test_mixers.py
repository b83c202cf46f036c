"""The mixer contract: registry, shape contract, and the shared padding helper."""

import pytest
import torch

from visionzoo import create_mixer, list_mixers, register_mixer
from visionzoo.kernels import crop_map, pad_to_multiple
from visionzoo.mixers import TokenMixer, get_mixer_class
from visionzoo.mixers.global_attention import GlobalAttention


def test_registry_lists_and_normalises_names():
    assert "global" in list_mixers()
    assert get_mixer_class(" Global ") is GlobalAttention


def test_unknown_mixer_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown mixer 'nope'; valid mixers: .*global"):
        create_mixer("nope", 32)


def test_duplicate_mixer_name_raises():
    with pytest.raises(ValueError, match="'global' is already registered by GlobalAttention"):

        @register_mixer("GLOBAL")
        class Again(TokenMixer):
            pass


def test_registering_a_non_mixer_raises():
    with pytest.raises(TypeError, match="must subclass TokenMixer"):
        register_mixer("not_a_mixer")(torch.nn.Identity)
    assert "not_a_mixer" not in list_mixers()


@pytest.mark.parametrize("name", list_mixers())
@pytest.mark.parametrize("size", [(1, 1), (7, 5), (12, 16)])
def test_every_mixer_keeps_shape_and_gradients(name, size):
    mixer = create_mixer(name, 32, num_heads=4)
    min_h, min_w = mixer.min_size
    height, width = max(size[0], min_h), max(size[1], min_w)
    x = torch.randn(2, height, width, 32, requires_grad=True)
    out = mixer(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list_mixers())
def test_every_mixer_rejects_wrong_layout(name):
    mixer = create_mixer(name, 32, num_heads=4)
    with pytest.raises(ValueError, match=r"channels-last map \(B, H, W, 32\)"):
        mixer(torch.randn(2, 32, 8, 8))


def test_mixer_below_its_minimum_names_it():
    class NeedsFour(TokenMixer):
        min_size = (4, 4)

        def mix(self, x):
            return x

    with pytest.raises(ValueError, match="needs a map of at least 4x4 tokens, got 3x9"):
        NeedsFour(8)(torch.randn(1, 3, 9, 8))


def test_global_mixer_is_full_self_attention():
    """Every output token depends on every input token, and a permutation of tokens commutes."""
    mixer = create_mixer("global", 16, num_heads=2).eval()
    x = torch.randn(1, 3, 4, 16, requires_grad=True)
    mixer(x)[0, 0, 0].sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()
    perm = torch.randperm(12)
    out = mixer(x.detach())
    permuted = mixer(x.detach().reshape(1, 12, 16)[:, perm].reshape(1, 3, 4, 16))
    torch.testing.assert_close(permuted.reshape(1, 12, 16), out.reshape(1, 12, 16)[:, perm])


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_global_mixer_backends_agree(backend):
    mixer = create_mixer("global", 32, num_heads=4, backend=backend)
    reference = create_mixer("global", 32, num_heads=4, backend="reference")
    reference.load_state_dict(mixer.state_dict())
    x = torch.randn(2, 5, 7, 32)
    torch.testing.assert_close(mixer(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", [(2, 10, 13, 4), (2, 3, 10, 13, 4)])
@pytest.mark.parametrize("multiple", [1, 4, (3, 5), 16])
def test_pad_to_multiple_and_crop_round_trip(layout, multiple):
    x = torch.randn(layout)
    padded, size = pad_to_multiple(x, multiple, value=-1.0)
    mh, mw = (multiple, multiple) if isinstance(multiple, int) else multiple
    assert size == (10, 13)
    assert padded.shape[-3] % mh == 0 and padded.shape[-2] % mw == 0
    assert padded.shape[-3] - 10 < mh and padded.shape[-2] - 13 < mw
    assert (padded[..., 10:, :, :] == -1).all() and (padded[..., 13:, :] == -1).all()
    torch.testing.assert_close(crop_map(padded, size), x, atol=0, rtol=0)


@pytest.mark.parametrize("min_size, multiple, expected", [(12, 1, (12, 13)), ((3, 20), 4, (12, 20)), (15, 7, (21, 21))])
def test_pad_to_minimum_size(min_size, multiple, expected):
    x = torch.randn(1, 10, 13, 2)
    padded, size = pad_to_multiple(x, multiple, min_size=min_size)
    assert padded.shape[1:3] == expected and size == (10, 13)
    torch.testing.assert_close(crop_map(padded, size), x)


def test_pad_to_multiple_rejects_non_positive():
    with pytest.raises(ValueError, match="multiple must be positive"):
        pad_to_multiple(torch.zeros(1, 4, 4, 2), 0)


def test_size_arguments_out_of_range_are_all_named_in_one_error():
    with pytest.raises(
        ValueError, match=r"kernel_size must be odd and positive, got 4; dilation must be positive, got 0"
    ):
        create_mixer("neighborhood", 32, kernel_size=4, dilation=0)
    with pytest.raises(ValueError, match=r"^halo_size must be 0 or more, got -1$"):
        create_mixer("halo", 32, halo_size=-1)
