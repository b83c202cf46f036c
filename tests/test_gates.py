"""Channel gates: ECA against timm's EcaModule and the paper's kernel-size rule; gates as timm attn layers."""

import math

import pytest
import timm
import torch
from timm.layers import EcaModule

from visionzoo import create_mixer
from visionzoo.mixers import EcaGate, ElaGate
from visionzoo.mixers.gates import eca_kernel_size


@pytest.mark.parametrize(
    "channels, expected", [(4, 1), (16, 3), (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7)]
)
def test_eca_kernel_size_follows_the_paper(channels, expected):
    t = int(abs(math.log2(channels) / 2 + 1 / 2))
    assert eca_kernel_size(channels) == expected == (t if t % 2 else t + 1)


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_eca_gate_matches_timm(channels):
    ours, theirs = EcaGate(channels), EcaModule(channels)
    assert ours.conv.weight.shape == theirs.conv.weight.shape  # same adaptive kernel where timm does not clamp
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, channels, 9, 7)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


def test_eca_mixer_is_depthwise_conv_then_gate():
    mixer = create_mixer("eca", 64, num_heads=2).eval()
    x = torch.randn(2, 10, 13, 64)
    with torch.no_grad():
        expected = mixer.gate(mixer.dwconv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        torch.testing.assert_close(mixer(x), expected)
    assert mixer.dwconv.groups == 64 and mixer.dwconv.kernel_size == (7, 7)


def test_eca_gate_is_a_timm_attn_layer():
    plain = timm.create_model("resnet18", num_classes=10)
    model = timm.create_model("resnet18", num_classes=10, block_args=dict(attn_layer=EcaGate))
    gates = [m for m in model.modules() if isinstance(m, EcaGate)]
    assert len(gates) == 8  # one per BasicBlock
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == sum(g.conv.weight.numel() for g in gates)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def _ela_by_hand(x, weight, groups, norm_groups, norm_weight, norm_bias, eps=1e-5):
    """ELA written out: pool, grouped 1D conv as explicit sums, GroupNorm by its formula, sigmoid."""
    channels, per_group, kernel = weight.shape

    def attend(pooled):  # (B, C, L)
        padded = torch.nn.functional.pad(pooled, (kernel // 2, kernel // 2))
        length = pooled.shape[-1]
        out = torch.zeros_like(pooled)
        for c in range(channels):
            first = (c // (channels // groups)) * per_group
            for j in range(per_group):
                for t in range(kernel):
                    out[:, c] += weight[c, j, t] * padded[:, first + j, t : t + length]
        grouped = out.reshape(out.shape[0], norm_groups, -1)
        mean = grouped.mean(-1, keepdim=True)
        var = grouped.var(-1, unbiased=False, keepdim=True)
        normed = ((grouped - mean) / torch.sqrt(var + eps)).reshape_as(out)
        return torch.sigmoid(normed * norm_weight[:, None] + norm_bias[:, None])

    rows, cols = attend(x.mean(3)), attend(x.mean(2))
    return x * rows[:, :, :, None] * cols[:, :, None, :]


@pytest.mark.parametrize(
    "variant, kernel, conv_groups, norm_groups",
    [("T", 5, 64, 32), ("B", 7, 64, 16), ("S", 5, 8, 16), ("L", 7, 8, 16)],
)
def test_ela_gate_follows_the_paper(variant, kernel, conv_groups, norm_groups):
    gate = ElaGate(64, variant).double()
    with torch.no_grad():
        gate.norm.weight.normal_()
        gate.norm.bias.normal_()
    assert gate.conv.kernel_size == (kernel,) and gate.conv.groups == conv_groups and gate.conv.bias is None
    assert gate.norm.num_groups == norm_groups
    assert sum(p.numel() for p in gate.parameters()) == 64 * (64 // conv_groups) * kernel + 2 * 64
    x = torch.randn(2, 64, 9, 6, dtype=torch.float64)
    expected = _ela_by_hand(x, gate.conv.weight, conv_groups, norm_groups, gate.norm.weight, gate.norm.bias)
    torch.testing.assert_close(gate(x), expected, atol=1e-12, rtol=1e-10)


def test_ela_shares_its_conv_and_norm_between_rows_and_columns():
    # one conv and one norm for both directions (timm's EfficientLocalAttn has two): transposing
    # the map transposes the output
    gate = ElaGate(32, "B")
    x = torch.randn(2, 32, 11, 5)
    torch.testing.assert_close(gate(x.transpose(2, 3)), gate(x).transpose(2, 3))


@pytest.mark.parametrize("channels, variant", [(48, "T"), (20, "B"), (36, "S")])
def test_ela_gate_rejects_channels_its_groups_cannot_split(channels, variant):
    with pytest.raises(ValueError, match=f"ELA-{variant} needs channels divisible by"):
        ElaGate(channels, variant)
    with pytest.raises(ValueError, match="unknown ELA variant 'X'"):
        ElaGate(64, "X")


def test_ela_mixer_is_depthwise_conv_then_gate():
    mixer = create_mixer("ela", 64, num_heads=2, ela_variant="S").eval()
    x = torch.randn(2, 10, 13, 64)
    with torch.no_grad():
        expected = mixer.gate(mixer.dwconv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        torch.testing.assert_close(mixer(x), expected)
    assert mixer.gate.variant == "S" and mixer.dwconv.groups == 64


@pytest.mark.parametrize("name, base, blocks", [("ela_resnet18", "resnet18", 8), ("ela_resnet50", "resnet50", 16)])
def test_ela_resnet_is_timm_resnet_with_an_ela_gate_per_block(name, base, blocks):
    plain, model = timm.create_model(base), timm.create_model(name)
    gates = [m for m in model.modules() if isinstance(m, ElaGate)]
    assert len(gates) == blocks and all(g.variant == "B" for g in gates)
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == sum(p.numel() for g in gates for p in g.parameters())
    # the gates sit on the residual branch, where timm puts a block's attn_layer
    assert all(isinstance(block.se, ElaGate) for stage in (model.layer1, model.layer4) for block in stage)


def test_ela_resnet_variant_and_features():
    model = timm.create_model("ela_resnet18", ela_variant="L", features_only=True)
    assert {m.variant for m in model.modules() if isinstance(m, ElaGate)} == {"L"}
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert [f.shape[-2:] for f in model(torch.randn(1, 3, 61, 75))] == [(16, 19), (8, 10), (4, 5), (2, 3)]
