"""Channel group attention (DaViT): equal to timm's ChannelAttention with the same weights, forward and gradients,
on every backend of its op; linear in tokens; the dual preset."""

import pytest
import timm
import torch
from timm.models.davit import ChannelAttention as TimmChannelAttention

from visionzoo import create_mixer
from visionzoo.stats import model_stats


def _pair(dim: int, groups: int, backend: str):
    layer = TimmChannelAttention(dim, num_heads=groups).double()
    mixer = create_mixer("channel", dim, num_heads=groups, backend=backend).double()
    mixer.load_state_dict(layer.state_dict())  # the same parameter names: qkv, proj
    return mixer, layer


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("dim, groups, size", [(64, 2, (7, 9)), (96, 3, (14, 14)), (32, 1, (1, 5))])
def test_matches_timm_channel_attention_forward_and_gradients(dim, groups, size, backend):
    mixer, layer = _pair(dim, groups, backend)
    x = torch.randn(2, *size, dim, dtype=torch.float64, requires_grad=True)
    ours = mixer(x)
    theirs = layer(x.flatten(1, 2)).unflatten(1, size)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, [x, *mixer.parameters()], grad)
    theirs_grads = torch.autograd.grad(theirs, [x, *layer.parameters()], grad)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_every_output_channel_sees_the_whole_map():
    mixer = create_mixer("channel", 32, num_heads=2)
    x = torch.randn(1, 12, 12, 32, requires_grad=True)
    mixer(x)[0, 0, 0].sum().backward()  # one output token
    assert (x.grad.abs().sum(-1) > 0).all(), "an output token did not depend on every input token"


def test_dual_preset_alternates_window_and_channel_attention_within_budget():
    model = timm.create_model("mixvit_tiny_dual")
    stage = model.stages[0].blocks
    assert [type(b.mixer).__name__ for b in stage] == ["MultiAxisAttention", "ChannelAttention", "MultiAxisAttention"]
    dual, tiny, neighborhood = (model_stats(n) for n in ("mixvit_tiny_dual", "mixvit_tiny", "mixvit_tiny_neighborhood"))
    assert abs(dual.params / tiny.params - 1) < 0.05, (dual.params, tiny.params)
    assert abs(dual.gmacs / neighborhood.gmacs - 1) < 0.05, (dual.gmacs, neighborhood.gmacs)
