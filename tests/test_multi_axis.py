"""Multi-axis attention: parity with timm's MaxViT partition attention, and masking at any size."""

import itertools

import pytest
import torch
from timm.models.maxxvit import MaxxVitTransformerCfg, PartitionAttentionCl

from visionzoo import create_mixer
from visionzoo.mixers import PartitionAttention


def _timm_layer(dim, partition, size, dim_head):
    cfg = MaxxVitTransformerCfg(dim_head=dim_head, head_first=False, window_size=size, rel_pos_type="bias")
    return PartitionAttentionCl(dim, partition, cfg).eval()


@pytest.mark.parametrize("partition", ["block", "grid"])
@pytest.mark.parametrize("size, map_size", [((4, 4), (8, 12)), ((7, 7), (14, 21)), ((2, 3), (6, 6))])
def test_matches_timm_partition_attention(partition, size, map_size):
    layer = _timm_layer(32, partition, size, dim_head=8)
    mixer = create_mixer("multi_axis", 32, num_heads=4, window_size=size, partition=partition).eval()
    with torch.no_grad():
        layer.attn.rel_pos.relative_position_bias_table.normal_()
    getattr(mixer, partition).load_timm_weights(layer.attn)
    x = torch.randn(2, *map_size, 32)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), layer._partition_attn(x), atol=1e-5, rtol=1e-5)


def brute_force(part: PartitionAttention, x: torch.Tensor) -> torch.Tensor:
    """Each token against the valid tokens of its window or grid group, one query at a time."""
    batch, height, width, dim = x.shape
    sh, sw = part.size
    padded_h, padded_w = -(-height // sh) * sh, -(-width // sw) * sw
    cell_h, cell_w = padded_h // sh, padded_w // sw
    q, k, v = (t.permute(0, 2, 3, 1, 4) for t in part.qkv_heads(x))  # (B, H, W, heads, d)
    table = part.relative_position_bias_table

    def group_and_position(i, j):
        if part.grid:  # same offset inside its cell; position = which cell
            return (i % cell_h, j % cell_w), (i // cell_h, j // cell_w)
        return (i // sh, j // sw), (i % sh, j % sw)

    out = torch.zeros(batch, height, width, part.num_heads, part.head_dim)
    for i, j in itertools.product(range(height), range(width)):
        group, (pi, pj) = group_and_position(i, j)
        keys = [
            (a, b) for a, b in itertools.product(range(height), range(width)) if group_and_position(a, b)[0] == group
        ]
        positions = [group_and_position(a, b)[1] for a, b in keys]
        bias = torch.stack([table[(pi - a + sh - 1) * (2 * sw - 1) + pj - b + sw - 1] for a, b in positions])
        logits = torch.einsum(
            "bhd,nbhd->bhn", q[:, i, j] * part.head_dim**-0.5, torch.stack([k[:, a, b] for a, b in keys])
        )
        weights = (logits + bias.T).softmax(-1)
        out[:, i, j] = torch.einsum("bhn,nbhd->bhd", weights, torch.stack([v[:, a, b] for a, b in keys]))
    return part.proj(out.reshape(batch, height, width, dim))


@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("map_size", [(6, 7), (5, 9), (8, 8)])
def test_padding_is_masked_out(grid, map_size):
    part = PartitionAttention(16, (4, 3), grid=grid, num_heads=2).eval()
    with torch.no_grad():
        part.relative_position_bias_table.normal_()
        x = torch.randn(2, *map_size, 16)
        torch.testing.assert_close(part(x), brute_force(part, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_backends_agree_at_odd_sizes_with_gradients(backend):
    mixer = create_mixer("multi_axis", 32, num_heads=2, window_size=7, partition="both", backend=backend)
    reference = create_mixer("multi_axis", 32, num_heads=2, window_size=7, partition="both", backend="reference")
    reference.load_state_dict(mixer.state_dict())
    x = torch.randn(2, 61, 75, 32, requires_grad=True)
    out, expected = mixer(x), reference(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    (want,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(grad, want, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(grad).all()


def test_both_is_block_then_grid():
    mixer = create_mixer("multi_axis", 16, num_heads=2, window_size=3, grid_size=2, partition="both").eval()
    x = torch.randn(1, 6, 6, 16)
    with torch.no_grad():
        local = mixer.block(x)
        torch.testing.assert_close(mixer(x), local + mixer.grid(x + local))
    assert mixer.block.size == (3, 3) and mixer.grid.size == (2, 2)


def test_bad_partition_is_a_clear_error():
    with pytest.raises(ValueError, match="partition must be 'block', 'grid' or 'both'"):
        create_mixer("multi_axis", 16, partition="diagonal")
