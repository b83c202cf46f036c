"""Zoo-wide tests over the models that ``import visionzoo`` registers with timm.

Every model builds, trains a step and rejects wrong channels; the thorough API tests run on the
smallest size of each family (``FAMILY_MODELS``), since the sizes of a family share their code.
"""

import pytest
import timm
import timm.optim
import torch
from safetensors.torch import load_model, save_model

from visionzoo.kernels import use_backend

from zoo_models import FAMILY_MODELS, MODELS

SMALL = 64
ODD_SIZES = [(200, 232), (97, 131)]


def _create(name, **kwargs):
    return timm.create_model(name, **kwargs)


def _min_size(model):
    return model.pretrained_cfg["min_input_size"][1:]


def _nchw(features, model):
    """forward_features output in NCHW, whichever layout the model declares (timm's ``output_fmt``)."""
    return features.permute(0, 3, 1, 2) if getattr(model, "output_fmt", "NCHW") == "NHWC" else features


def test_registry_is_discovered():
    assert {"mixvit_mini", "mixvit_tiny", "mixvit_small", "mixvit_base"} <= set(MODELS)
    assert set(timm.list_models("mixvit*")) >= {"mixvit_tiny"}


@pytest.mark.smoke
def test_mixvit_tiny_matches_nat_tiny_size():
    model = _create("mixvit_tiny")
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    assert 27e6 < sum(p.numel() for p in model.parameters()) < 29e6  # NAT-Tiny: 28M


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name):
    model = _create(name, num_classes=7)
    out = model(torch.randn(2, 3, SMALL, SMALL))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize("name", FAMILY_MODELS)
@pytest.mark.parametrize("size", ODD_SIZES)
def test_odd_sizes(name, size):
    model = _create(name, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 5)
        features = model.forward_features(torch.randn(1, 3, *size))
    assert _nchw(features, model).shape == (1, model.num_features, -(-size[0] // 32), -(-size[1] // 32))


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_minimum_size(name):
    model = _create(name).eval()
    min_h, min_w = _min_size(model)
    assert tuple(model.min_input_size) == (min_h, min_w), "pretrained_cfg['min_input_size'] is out of date"
    with torch.no_grad():
        model(torch.randn(1, 3, min_h, min_w))
    for size in [(min_h - 1, min_w), (min_h, min_w - 1)]:
        with pytest.raises(ValueError, match=rf"needs inputs of at least {min_h}x{min_w}, got {size[0]}x{size[1]}"):
            model(torch.randn(1, 3, *size))


@pytest.mark.parametrize("name", MODELS)
def test_wrong_channels(name):
    model = _create(name)
    with pytest.raises(ValueError, match=rf"{name} expects images \(B, 3, H, W\), got \(1, 1, 64, 64\)"):
        model(torch.randn(1, 1, SMALL, SMALL))


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_integer_images_are_refused(name):
    model = _create(name)
    with pytest.raises(ValueError, match=rf"{name} expects floating-point images .*, got torch\.uint8"):
        model(torch.randint(0, 255, (1, 3, SMALL, SMALL), dtype=torch.uint8))


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_channels_last_and_strided_images_give_the_same_outputs(name):
    model = _create(name).eval()
    x = torch.randn(2, 3, SMALL, SMALL + 8)
    strided = torch.randn(2, 3, SMALL, 2 * (SMALL + 8))[..., ::2].copy_(x)  # a view: not contiguous
    assert not strided.is_contiguous()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), expected)
        torch.testing.assert_close(model(strided), expected)
        torch.testing.assert_close(model(x.permute(0, 1, 3, 2).transpose(2, 3)), expected)  # transposed strides


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_nan_in_one_image_stays_in_that_image(name):
    """Documented behaviour (docs/reliability.md): NaN is not checked for, it propagates to that image's
    outputs only (in eval mode, where no BatchNorm mixes the batch)."""
    model = _create(name).eval()
    x = torch.randn(2, 3, SMALL, SMALL)
    poisoned = x.clone()
    poisoned[0, :, 5, 7] = float("nan")
    with torch.no_grad():
        expected, got = model(x), model(poisoned)
    assert got[0].isnan().all()
    torch.testing.assert_close(got[1], expected[1])


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_features_only(name):
    model = _create(name, features_only=True)
    reductions = model.feature_info.reduction()
    channels = model.feature_info.channels()
    assert reductions == [4, 8, 16, 32]
    size = (96, 160)
    features = model(torch.randn(2, 3, *size))
    assert [f.shape for f in features] == [
        (2, c, size[0] // r, size[1] // r) for c, r in zip(channels, reductions, strict=True)
    ]
    subset = _create(name, features_only=True, out_indices=model.feature_info.out_indices[1::2])
    assert subset.feature_info.reduction() == [8, 32]
    assert [f.shape[1] for f in subset(torch.randn(1, 3, SMALL, SMALL))] == channels[1::2]


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_forward_intermediates(name):
    model = _create(name).eval()
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [f.shape[1] for f in intermediates] == [info["num_chs"] for info in model.feature_info]
        if getattr(model, "output_fmt", "NCHW") == "NHWC":
            nhwc = model.forward_intermediates(x, indices=[0, 2], output_fmt="NHWC", intermediates_only=True)
            torch.testing.assert_close(nhwc[0], intermediates[0].permute(0, 2, 3, 1))
            torch.testing.assert_close(nhwc[1], intermediates[2].permute(0, 2, 3, 1))
        early = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[1], intermediates[-1])
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], _nchw(final, model))
        kept = model.prune_intermediate_layers(indices=(0, 1))
        assert kept == [0, 1] and model.num_classes == 0
        pruned = model.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
        for got, expected in zip(pruned, intermediates[:2], strict=True):
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_reset_classifier_and_pre_logits(name):
    model = _create(name).eval()
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pre.shape == (1, model.num_features)
        model.reset_classifier(0)
        assert model.get_classifier().__class__ is torch.nn.Identity
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(13)
        assert model(x).shape == (1, 13) and model.num_classes == 13


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_grad_checkpointing_is_exact(name):
    model = _create(name, num_classes=3)
    x = torch.randn(2, 3, SMALL, SMALL)

    def run():
        model.zero_grad()
        out = model(x)
        out.sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_out, plain_grads = run()
    model.set_grad_checkpointing(True)
    ckpt_out, ckpt_grads = run()
    torch.testing.assert_close(ckpt_out, plain_out, atol=1e-6, rtol=1e-5)
    for n in plain_grads:
        torch.testing.assert_close(ckpt_grads[n], plain_grads[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_eval_is_deterministic(name):
    model = _create(name, drop_rate=0.2, drop_path_rate=0.3).eval()
    x = torch.randn(2, 3, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x)), "drop path / dropout inactive in train mode"


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_safetensors_round_trip(name, tmp_path):
    model = _create(name, num_classes=4).eval()
    path = tmp_path / f"{name}.safetensors"
    save_model(model, str(path))
    torch.manual_seed(123)
    restored = _create(name, num_classes=4).eval()
    missing, unexpected = load_model(restored, str(path))
    assert not missing and not unexpected
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_optimizer_api(name):
    model = _create(name)
    matcher = model.group_matcher()
    assert set(matcher) == {"stem", "blocks"}
    groups = timm.optim.param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert model.no_weight_decay() <= {n for n, _ in model.named_parameters()}
    timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_training_step(name, dtype):
    model = _create(name, num_classes=10).cuda()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        loss = torch.nn.functional.cross_entropy(model(x), torch.arange(4, device="cuda"))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        expected = model.eval()(x).float()
        with use_backend("reference"):
            torch.testing.assert_close(model(x).float(), expected, atol=5e-2, rtol=5e-2)
