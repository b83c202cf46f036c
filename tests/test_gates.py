"""Channel gates: ECA against timm's EcaModule and the paper's kernel-size rule; gates as timm attn layers."""

import math

import pytest
import timm
import torch
from timm.layers import EcaModule

from visionzoo import create_mixer
from visionzoo.mixers import EcaGate
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
