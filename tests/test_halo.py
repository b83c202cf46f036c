"""Halo attention: equal to timm's HaloAttn with copied weights, and any map size."""

import pytest
import torch
from timm.layers.halo_attn import HaloAttn

from visionzoo import create_mixer
from visionzoo.kernels import halo_attention


@pytest.mark.parametrize(
    "dim, heads, block, halo, size", [(32, 4, 4, 1, (8, 12)), (64, 2, 8, 3, (16, 24)), (16, 1, 2, 2, (6, 4))]
)
def test_matches_timm_halo_attn(dim, heads, block, halo, size):
    layer = HaloAttn(dim, num_heads=heads, block_size=block, halo_size=halo).eval()
    mixer = create_mixer("halo", dim, num_heads=heads, block_size=block, halo_size=halo, proj=False).eval()
    mixer.load_timm_weights(layer)
    x = torch.randn(2, *size, dim)
    with torch.no_grad():
        expected = layer(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        torch.testing.assert_close(mixer(x), expected, atol=1e-5, rtol=1e-5)


def test_matches_timm_gradients():
    layer = HaloAttn(32, num_heads=2, block_size=4, halo_size=2)
    mixer = create_mixer("halo", 32, num_heads=2, block_size=4, halo_size=2, proj=False)
    mixer.load_timm_weights(layer)
    x = torch.randn(1, 8, 8, 32)
    mixer(x).square().sum().backward()
    layer(x.permute(0, 3, 1, 2)).square().sum().backward()
    torch.testing.assert_close(mixer.rel_height.grad, layer.pos_embed.height_rel.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixer.kv.weight.grad, layer.kv.weight.grad[:, :, 0, 0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [(61, 75), (1, 1), (9, 3)])
def test_any_map_size(size):
    mixer = create_mixer("halo", 32, num_heads=2, block_size=8, halo_size=3)
    x = torch.randn(2, *size, 32, requires_grad=True)
    out = mixer(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()


def test_op_zero_pads_maps_off_the_block_grid():
    q, k, v = torch.randn(3, 1, 2, 6, 7, 4)
    rel = torch.randn(2, 15, 4)  # 2 * (4 + 2 * 2) - 1 offsets
    padded = (torch.nn.functional.pad(t, (0, 0, 0, 1, 0, 2)) for t in (q, k, v))
    want = halo_attention(*padded, 4, 2, *rel)[:, :, :6, :7]
    torch.testing.assert_close(halo_attention(q, k, v, 4, 2, *rel), want, atol=0, rtol=0)


def test_op_rejects_half_a_position_embedding():
    q = torch.randn(1, 1, 8, 8, 4)
    with pytest.raises(ValueError, match="give both rel_height and rel_width"):
        halo_attention(q, q, q, 2, 1, rel_height=torch.zeros(7, 4))
