"""Detection and segmentation heads over our backbones and timm's, and the dense-task metrics."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from visionzoo.heads import create_detector, create_segmenter
from visionzoo.heads.segmentation import SemanticFPNDecoder, UPerNetDecoder, convert_mmseg_heads
from visionzoo.kernels import use_backend
from visionzoo.metrics import detection_map, detections_for_map, segmentation_metrics

TINY = dict(embed_dim=(32, 64, 128, 256), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))

# one backbone per mixer family, tiny widths; timm's resnet18 stands for any timm model
BACKBONES = {
    "neighborhood": ("mixvit_mini", dict(mixers="neighborhood", **TINY)),
    "multi_axis": ("mixvit_mini", dict(mixers="multi_axis", mixer_window_size=4, **TINY)),
    "halo": ("mixvit_mini", dict(mixers="halo", mixer_block_size=4, mixer_halo_size=1, **TINY)),
    "eca": ("mixvit_mini", dict(mixers="eca", **TINY)),
    "global": ("mixvit_mini", dict(mixers="global", **TINY)),
    "nat": ("nat_mini", TINY),
    "resnet18": ("resnet18", {}),
}
DETECTORS = ("retinanet", "fcos", "faster_rcnn", "mask_rcnn")
# every family under one detector (rotating), every detector over several families
DETECTOR_CASES = [(family, DETECTORS[i % len(DETECTORS)]) for i, family in enumerate(BACKBONES)]
SEGMENTER_CASES = [(family, ("upernet", "semantic_fpn")[i % 2]) for i, family in enumerate(BACKBONES)]

# untrained detectors score below the default thresholds: keep a few detections of any score
EVAL_KWARGS = {
    "retinanet": dict(score_thresh=0.0, detections_per_img=5),
    "fcos": dict(score_thresh=0.0, detections_per_img=5),
    "faster_rcnn": dict(box_score_thresh=0.0, box_detections_per_img=5),
    "mask_rcnn": dict(box_score_thresh=0.0, box_detections_per_img=5),
}
DETECTOR_KWARGS = dict(fpn_channels=32, min_size=96, max_size=160)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def _detection_batch():
    """Two non-square images whose sides are not multiples of 32, one object each (boxes x1, y1, x2, y2)."""
    sizes, boxes, labels = [(90, 130), (75, 101)], [[10, 10, 50, 60], [5, 20, 40, 70]], [1, 2]
    images, targets = [], []
    for (h, w), (x1, y1, x2, y2), label in zip(sizes, boxes, labels):
        mask = torch.zeros(1, h, w, dtype=torch.uint8)
        mask[0, y1:y2, x1:x2] = 1
        images.append(torch.rand(3, h, w))
        targets.append(
            dict(boxes=torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32), labels=torch.tensor([label]), masks=mask)
        )
    return images, targets


def _backbone_params(model: nn.Module):
    return [(n, p) for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]


def _assert_backbone_grads(model: nn.Module):
    params = _backbone_params(model)
    assert params
    missing = [n for n, p in params if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in params)
    assert sum(p.grad.abs().sum() for _, p in params) > 0


@pytest.mark.parametrize("family,detector", DETECTOR_CASES)
def test_detector_train_step_and_eval(family, detector):
    name, kwargs = BACKBONES[family]
    model = create_detector(detector, name, 3, backbone_kwargs=kwargs, **DETECTOR_KWARGS, **EVAL_KWARGS[detector])
    images, targets = _detection_batch()
    model.train()
    losses = model(images, targets)
    if detector == "mask_rcnn":
        assert "loss_mask" in losses
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    _assert_backbone_grads(model)

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs):
        n = len(out["boxes"])
        assert 0 < n <= 5
        assert out["boxes"].shape == (n, 4) and out["scores"].shape == (n,) and out["labels"].shape == (n,)
        h, w = image.shape[-2:]  # boxes come back in the original image's coordinates
        assert (
            (out["boxes"] >= 0).all() and (out["boxes"][:, [0, 2]] <= w).all() and (out["boxes"][:, [1, 3]] <= h).all()
        )
        if detector == "mask_rcnn":
            assert out["masks"].shape == (n, 1, h, w)


def test_mask_rcnn_outputs_feed_coco_map():
    name, kwargs = BACKBONES["resnet18"]
    model = create_detector("mask_rcnn", name, 3, backbone_kwargs=kwargs, **DETECTOR_KWARGS, **EVAL_KWARGS["mask_rcnn"])
    images, targets = _detection_batch()
    with torch.no_grad():
        outputs = model.eval()(images)
    metric = detection_map(("bbox", "segm"))
    metric.update(detections_for_map(outputs), [dict(t, masks=t["masks"].bool()) for t in targets])
    result = metric.compute()
    assert 0 <= result["bbox_map"] <= 1 and 0 <= result["segm_map"] <= 1


def _backbone_inputs(model: nn.Module) -> list[tuple[int, ...]]:
    shapes = []
    model.backbone.body.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    return shapes


def test_detector_min_size_max_size():
    """torchvision's rule: short side to min_size unless the long side would pass max_size; batch padded to 32."""
    name, kwargs = BACKBONES["eca"]
    image = torch.rand(3, 90, 130)
    model = create_detector(
        "retinanet", name, 3, fpn_channels=32, min_size=96, max_size=160, backbone_kwargs=kwargs
    ).eval()
    assert model.transform.min_size == (96,) and model.transform.max_size == 160
    shapes = _backbone_inputs(model)
    with torch.no_grad():
        model([image])
    # scale 96 / 90: 90x130 -> 96x138, padded to 96x160
    assert shapes == [(1, 3, 96, 160)]
    model = create_detector(
        "retinanet", name, 3, fpn_channels=32, min_size=96, max_size=120, backbone_kwargs=kwargs
    ).eval()
    shapes = _backbone_inputs(model)
    with torch.no_grad():
        model([image])
    # 96 / 90 would make the long side 138 > 120: scale 120 / 130 instead, 83x120, padded to 96x128
    assert shapes == [(1, 3, 96, 128)]


def test_detector_normalizes_with_backbone_mean_std():
    model = create_detector("retinanet", "resnet18", 3, fpn_channels=16)
    assert model.transform.image_mean == list(model.backbone.body.pretrained_cfg["mean"])
    assert model.transform.image_std == list(model.backbone.body.pretrained_cfg["std"])


@pytest.mark.parametrize("family,segmenter", SEGMENTER_CASES)
def test_segmenter_train_step_and_eval(family, segmenter):
    name, kwargs = BACKBONES[family]
    aux = family in ("neighborhood", "resnet18", "eca", "nat")
    model = create_segmenter(segmenter, name, 5, aux_head=aux, channels=32, backbone_kwargs=kwargs)
    images = torch.rand(2, 3, 97, 131)
    labels = torch.randint(0, 5, (2, 97, 131))
    labels[:, :5] = 255
    model.train()
    outputs = model(images)
    assert set(outputs) == ({"out", "aux"} if aux else {"out"})
    loss = F.cross_entropy(outputs["out"], labels, ignore_index=255)
    if aux:
        loss = loss + 0.4 * F.cross_entropy(outputs["aux"], labels, ignore_index=255)
    assert torch.isfinite(loss)
    loss.backward()
    _assert_backbone_grads(model)

    model.eval()
    with torch.no_grad():
        outputs = model(torch.rand(1, 3, 97, 131))
    assert outputs["out"].shape == (1, 5, 97, 131)
    if aux:
        assert outputs["aux"].shape == (1, 5, 97, 131)


def test_upernet_size_matches_nat_paper():
    """NAT paper, ADE20K UPerNet with the FCN auxiliary head, 150 classes: NAT-Mini 50M parameters, 900 GFLOPs
    (GMACs) at 512x2048. Counted on the meta device: no arithmetic runs."""
    model = create_segmenter("upernet", "nat_mini", 150, aux_head=True).eval()
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 50
    model = model.to("meta")
    with torch.no_grad(), use_backend("reference"), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 512, 2048, device="meta"))
    assert counter.get_total_flops() / 2e9 == pytest.approx(900, rel=0.005)


@pytest.mark.smoke
def test_semantic_fpn_upsampling_steps():
    """log2(stride / 4) conv + 2x upsample steps per level (one conv at stride 4), summed at the finest map's size."""
    decoder = SemanticFPNDecoder([8, 16, 32, 64], 3, strides=(4, 8, 16, 32), fpn_channels=8, channels=8)
    assert [len(convs) for convs in decoder.scale_heads] == [1, 1, 2, 3]
    features = [torch.rand(1, c, *s) for c, s in zip([8, 16, 32, 64], [(25, 33), (13, 17), (7, 9), (4, 5)])]
    assert decoder.eval()(features).shape == (1, 3, 25, 33)


def test_upernet_decoder_shapes():
    decoder = UPerNetDecoder([8, 16, 32, 64], 3, channels=8, pool_scales=(1, 2, 3, 6))
    features = [torch.rand(2, c, *s) for c, s in zip([8, 16, 32, 64], [(25, 33), (13, 17), (7, 9), (4, 5)])]
    assert decoder(features).shape == (2, 3, 25, 33)
    assert decoder.fuse[0].in_channels == 4 * 8
    assert decoder.ppm.bottleneck[0].in_channels == 64 + 4 * 8


# --- an independent forward of mmsegmentation's heads on an official-layout state dict ---


def _official_conv_module(sd, prefix, cin, cout, k, norm=True):
    """An mmcv ConvModule's entries: conv without bias and BN, or conv with bias and no norm (the FPN neck)."""
    f64 = dict(dtype=torch.float64)
    sd[f"{prefix}.conv.weight"] = torch.randn(cout, cin, k, k, **f64) / math.sqrt(cin * k * k)
    if not norm:
        sd[f"{prefix}.conv.bias"] = 0.1 * torch.randn(cout, **f64)
        return
    sd[f"{prefix}.bn.weight"] = 0.5 + torch.rand(cout, **f64)
    sd[f"{prefix}.bn.bias"] = 0.1 * torch.randn(cout, **f64)
    sd[f"{prefix}.bn.running_mean"] = 0.1 * torch.randn(cout, **f64)
    sd[f"{prefix}.bn.running_var"] = 0.5 + torch.rand(cout, **f64)
    sd[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(7)


def _run_conv_module(sd, prefix, x, act=True):
    w = sd[f"{prefix}.conv.weight"]
    x = F.conv2d(x, w, sd.get(f"{prefix}.conv.bias"), padding=w.shape[-1] // 2)
    if f"{prefix}.bn.weight" in sd:
        bn = [sd[f"{prefix}.bn.{n}"] for n in ("running_mean", "running_var", "weight", "bias")]
        x = F.batch_norm(x, *bn, training=False, eps=1e-5)
    return F.relu(x) if act else x


def _bilinear(x, size):
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _official_uperhead(in_channels, channels, aux_channels, num_classes, pool_scales):
    sd = {}
    for i in range(len(pool_scales)):
        _official_conv_module(sd, f"decode_head.psp_modules.{i}.1", in_channels[-1], channels, 1)
    _official_conv_module(sd, "decode_head.bottleneck", in_channels[-1] + len(pool_scales) * channels, channels, 3)
    for i, c in enumerate(in_channels[:-1]):
        _official_conv_module(sd, f"decode_head.lateral_convs.{i}", c, channels, 1)
        _official_conv_module(sd, f"decode_head.fpn_convs.{i}", channels, channels, 3)
    _official_conv_module(sd, "decode_head.fpn_bottleneck", len(in_channels) * channels, channels, 3)
    sd["decode_head.conv_seg.weight"] = torch.randn(num_classes, channels, 1, 1, dtype=torch.float64)
    sd["decode_head.conv_seg.bias"] = torch.randn(num_classes, dtype=torch.float64)
    _official_conv_module(sd, "auxiliary_head.convs.0", in_channels[2], aux_channels, 3)
    sd["auxiliary_head.conv_seg.weight"] = torch.randn(num_classes, aux_channels, 1, 1, dtype=torch.float64)
    sd["auxiliary_head.conv_seg.bias"] = torch.randn(num_classes, dtype=torch.float64)
    sd["backbone.patch_embed.proj.weight"] = torch.zeros(1)  # left to the backbone's own mapping
    return sd


def _official_uperhead_forward(sd, feats, pool_scales):
    """UPerHead.forward: PPM on the last map as the top lateral, top-down sums, 3x3 convs, concat at stride 4."""
    top = feats[-1]
    pooled = [
        _bilinear(_run_conv_module(sd, f"decode_head.psp_modules.{i}.1", F.adaptive_avg_pool2d(top, s)), top.shape[2:])
        for i, s in enumerate(pool_scales)
    ]
    laterals = [_run_conv_module(sd, f"decode_head.lateral_convs.{i}", f) for i, f in enumerate(feats[:-1])]
    laterals.append(_run_conv_module(sd, "decode_head.bottleneck", torch.cat([top, *pooled], 1)))
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + _bilinear(laterals[i], laterals[i - 1].shape[2:])
    outs = [_run_conv_module(sd, f"decode_head.fpn_convs.{i}", x) for i, x in enumerate(laterals[:-1])]
    outs.append(laterals[-1])
    fused = torch.cat([outs[0]] + [_bilinear(x, outs[0].shape[2:]) for x in outs[1:]], 1)
    y = _run_conv_module(sd, "decode_head.fpn_bottleneck", fused)
    logits = F.conv2d(y, sd["decode_head.conv_seg.weight"], sd["decode_head.conv_seg.bias"])
    aux = _run_conv_module(sd, "auxiliary_head.convs.0", feats[2])
    return logits, F.conv2d(aux, sd["auxiliary_head.conv_seg.weight"], sd["auxiliary_head.conv_seg.bias"])


def _official_semantic_fpn(in_channels, fpn_channels, channels, num_classes):
    sd = {}
    for i, c in enumerate(in_channels):
        _official_conv_module(sd, f"neck.lateral_convs.{i}", c, fpn_channels, 1, norm=False)
        _official_conv_module(sd, f"neck.fpn_convs.{i}", fpn_channels, fpn_channels, 3, norm=False)
        for k in range(max(1, i)):  # strides 4, 8, 16, 32: 1, 1, 2, 3 convs; FPNHead puts an upsample after each
            _official_conv_module(
                sd, f"decode_head.scale_heads.{i}.{2 * k}", fpn_channels if k == 0 else channels, channels, 3
            )
    sd["decode_head.conv_seg.weight"] = torch.randn(num_classes, channels, 1, 1, dtype=torch.float64)
    sd["decode_head.conv_seg.bias"] = torch.randn(num_classes, dtype=torch.float64)
    return sd


def _official_semantic_fpn_forward(sd, feats):
    """mmseg FPN neck (nearest top-down) + FPNHead (conv, 2x bilinear upsample per octave, sum at stride 4)."""
    laterals = [_run_conv_module(sd, f"neck.lateral_convs.{i}", f, act=False) for i, f in enumerate(feats)]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
    pyramid = [_run_conv_module(sd, f"neck.fpn_convs.{i}", x, act=False) for i, x in enumerate(laterals)]
    out = None
    for i, x in enumerate(pyramid):
        for k in range(max(1, i)):
            x = _run_conv_module(sd, f"decode_head.scale_heads.{i}.{2 * k}", x)
            if i > 0:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        out = x if out is None else out + _bilinear(x, out.shape[2:])
    return F.conv2d(out, sd["decode_head.conv_seg.weight"], sd["decode_head.conv_seg.bias"])


def _load_official(model, state_dict):
    missing, unexpected = model.load_state_dict(convert_mmseg_heads(state_dict), strict=False)
    assert not unexpected and all(k.startswith("backbone.") for k in missing), (unexpected, missing)


def test_upernet_matches_official_layout_forward():
    model = create_segmenter("upernet", "resnet18", 5, aux_head=True, aux_channels=8, channels=16)
    state_dict = _official_uperhead(model.backbone.channels, 16, 8, 5, (1, 2, 3, 6))
    model = model.double().eval()  # before loading, so the fp64 weights stay fp64
    _load_official(model, {"state_dict": state_dict, "meta": {}})
    images = torch.rand(1, 3, 97, 131, dtype=torch.float64)
    with torch.no_grad():
        feats = model.backbone(images)
        logits, aux = _official_uperhead_forward(state_dict, feats, (1, 2, 3, 6))
        outputs = model(images)
    torch.testing.assert_close(outputs["out"], _bilinear(logits, (97, 131)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outputs["aux"], _bilinear(aux, (97, 131)), rtol=1e-10, atol=1e-10)


def test_semantic_fpn_matches_official_layout_forward():
    model = create_segmenter("semantic_fpn", "resnet18", 5, fpn_channels=16, channels=8)
    state_dict = _official_semantic_fpn(model.backbone.channels, 16, 8, 5)
    model = model.double().eval()
    _load_official(model, state_dict)
    images = torch.rand(1, 3, 97, 131, dtype=torch.float64)
    with torch.no_grad():
        logits = _official_semantic_fpn_forward(state_dict, model.backbone(images))
        outputs = model(images)
    torch.testing.assert_close(outputs["out"], _bilinear(logits, (97, 131)), rtol=1e-10, atol=1e-10)


def _frozen_names(model):
    return {
        n.removeprefix("backbone.body.").removeprefix("body.")
        for n, p in model.named_parameters()
        if not p.requires_grad
    }


def test_frozen_stages_resnet():
    """mmdet's meaning: 0 freezes the stem, 1 the stem and the first (stride-4) stage; frozen norms stay in eval."""
    model = create_segmenter("semantic_fpn", "resnet18", 3, frozen_stages=1, fpn_channels=8, channels=8)
    body = model.backbone.body
    frozen = _frozen_names(model)
    assert {"conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.1.bn2.bias"} <= frozen
    assert not any(n.startswith(("layer2", "layer3", "layer4", "decoder")) for n in frozen)
    model.train()
    assert not body.bn1.training and not body.layer1[1].bn2.training
    assert body.layer2[0].bn1.training and model.decoder.training
    stats = body.layer1[0].bn1.running_mean.clone()
    model(torch.rand(2, 3, 64, 96))["out"].sum().backward()
    assert torch.equal(body.layer1[0].bn1.running_mean, stats)
    assert body.conv1.weight.grad is None and body.layer2[0].conv1.weight.grad is not None

    stem_only = create_segmenter("semantic_fpn", "resnet18", 3, frozen_stages=0, fpn_channels=8, channels=8)
    assert _frozen_names(stem_only) == {"conv1.weight", "bn1.weight", "bn1.bias"}
    assert not _frozen_names(create_segmenter("semantic_fpn", "resnet18", 3, fpn_channels=8, channels=8))


def test_frozen_stages_mixvit_and_norm_eval():
    name, kwargs = BACKBONES["neighborhood"]
    model = create_detector("faster_rcnn", name, 3, frozen_stages=2, backbone_kwargs=dict(kwargs, drop_path_rate=0.5))
    frozen = _frozen_names(model)
    assert any(n.startswith("model.stem.") for n in frozen) and any(n.startswith("model.stages.1.") for n in frozen)
    assert not any(n.startswith(("model.stages.2.", "model.stages.3.", "fpn.")) for n in frozen)
    stages = model.backbone.body.body.model.stages
    model.train()
    assert not stages[1].blocks[0].drop_path1.training  # frozen stages run deterministically
    assert stages[2].blocks[0].drop_path1.training

    model = create_segmenter("upernet", "resnet18", 3, norm_eval=True, channels=8)
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert model.decoder.fuse[1].training  # the decoder's norms still train


def test_out_norm_normalizes_each_output():
    name, kwargs = BACKBONES["global"]
    plain = create_segmenter("semantic_fpn", name, 3, fpn_channels=8, channels=8, backbone_kwargs=kwargs)
    normed = create_segmenter(
        "semantic_fpn", name, 3, out_norm=True, fpn_channels=8, channels=8, backbone_kwargs=kwargs
    )
    extra = sum(p.numel() for p in normed.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 2 * sum(TINY["embed_dim"])
    with torch.no_grad():
        features = normed.eval().backbone(torch.rand(1, 3, 64, 96))
    for f, c in zip(features, TINY["embed_dim"]):
        assert f.shape[1] == c
        torch.testing.assert_close(f.mean(1), torch.zeros_like(f[:, 0]), atol=1e-5, rtol=0)
        torch.testing.assert_close(f.var(1, unbiased=False), torch.ones_like(f[:, 0]), atol=1e-2, rtol=0)


def test_backbone_errors():
    with pytest.raises(ValueError, match="unknown backbone 'no_such_model'"):
        create_detector("retinanet", "no_such_model", 3)
    with pytest.raises(ValueError, match=r"unknown detector 'yolo'; valid: faster_rcnn, fcos, mask_rcnn, retinanet"):
        create_detector("yolo", "resnet18", 3)
    with pytest.raises(ValueError, match="unknown segmenter 'deeplab'"):
        create_segmenter("deeplab", "resnet18", 3)
    with pytest.raises(
        ValueError, match=r"mask_rcnn needs feature maps at strides 4, 8, 16, 32; .* gives strides 8, 16, 32"
    ):
        create_detector("mask_rcnn", "resnet18", 3, backbone_kwargs=dict(out_indices=(2, 3, 4)))
    with pytest.raises(ValueError, match="cannot serve as features_only"):
        create_segmenter("upernet", "resnet18", 3, backbone_kwargs=dict(out_indices=(7,)))
    with pytest.raises(ValueError, match="frozen_stages must be in"):
        create_segmenter("upernet", "resnet18", 3, frozen_stages=5)
    name, kwargs = BACKBONES["eca"]
    model = create_segmenter("upernet", name, 3, channels=8, backbone_kwargs=kwargs)
    with pytest.raises(ValueError, match="needs inputs of at least"):
        model(torch.rand(1, 3, 16, 16))


# --- metrics, on cases worked out by hand ---


def _box(x1, y1, x2, y2):
    return torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32)


@pytest.mark.smoke
def test_box_map_by_hand():
    """Two objects; the top-scored prediction is a false positive, the next one finds one object exactly.

    Precision/recall points: (0, 0) then (1/2, 1/2). COCO interpolates precision as the best at
    recall >= r: 1/2 at the 51 recall thresholds 0, 0.01, ..., 0.5 and 0 above, so AP = 0.5 * 51 / 101 at every
    IoU threshold; recall with 100 detections is 1/2.
    """
    metric = detection_map("bbox")
    preds = [
        dict(
            boxes=torch.cat([_box(200, 200, 240, 240), _box(10, 10, 50, 50)]),
            scores=torch.tensor([0.9, 0.8]),
            labels=torch.tensor([1, 1]),
        )
    ]
    target = [dict(boxes=torch.cat([_box(10, 10, 50, 50), _box(100, 100, 150, 150)]), labels=torch.tensor([1, 1]))]
    metric.update(preds, target)
    result = metric.compute()
    assert result["map"].item() == pytest.approx(0.5 * 51 / 101, abs=1e-6)
    assert result["map_50"].item() == pytest.approx(0.5 * 51 / 101, abs=1e-6)
    assert result["mar_100"].item() == pytest.approx(0.5, abs=1e-6)


def test_box_map_perfect_and_wrong_class():
    metric = detection_map("bbox")
    target = [dict(boxes=_box(10, 10, 50, 50), labels=torch.tensor([1]))]
    metric.update([dict(boxes=_box(10, 10, 50, 50), scores=torch.tensor([0.5]), labels=torch.tensor([1]))], target)
    assert metric.compute()["map"].item() == pytest.approx(1.0)
    metric = detection_map("bbox")
    metric.update([dict(boxes=_box(10, 10, 50, 50), scores=torch.tensor([0.5]), labels=torch.tensor([2]))], target)
    assert metric.compute()["map"].item() == pytest.approx(0.0)


def test_mask_map_by_hand():
    """The predicted mask covers half of the object's 10x10 square: IoU 0.5, a match only at threshold 0.50.

    One of the ten thresholds 0.50:0.95 gives AP 1, the others 0: mAP 0.1, mAP@50 1, mAP@75 0.
    """
    target_mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    target_mask[0, 10:20, 10:20] = True
    pred_mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    pred_mask[0, 10:20, 10:15] = True
    metric = detection_map("segm")
    metric.update(
        [dict(masks=pred_mask, scores=torch.tensor([0.7]), labels=torch.tensor([0]))],
        [dict(masks=target_mask, labels=torch.tensor([0]))],
    )
    result = metric.compute()
    assert result["map"].item() == pytest.approx(0.1, abs=1e-6)
    assert result["map_50"].item() == pytest.approx(1.0)
    assert result["map_75"].item() == pytest.approx(0.0)


def test_detections_for_map_thresholds_soft_masks():
    soft = torch.tensor([[[[0.2, 0.6], [0.5, 0.9]]]])
    (out,) = detections_for_map(
        [dict(boxes=_box(0, 0, 2, 2), scores=torch.tensor([0.9]), labels=torch.tensor([1]), masks=soft)]
    )
    assert out["masks"].dtype == torch.bool and out["masks"].tolist() == [[[False, True], [False, True]]]


@pytest.mark.smoke
def test_miou_and_pixel_accuracy_by_hand():
    """Pixels (label, prediction), the 255 pixel ignored: (0,0) (0,1) (1,1) (1,1) (2,1).

    IoU: class 0 1/2 (1 hit; 2 labelled + 1 predicted - 1), class 1 2/4, class 2 0/1; class 3 appears nowhere
    and is left out: mIoU (1/2 + 1/2 + 0) / 3 = 1/3. Pixel accuracy 3/5.
    """
    target = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1], [1, 1, 0]]])
    metrics = segmentation_metrics(num_classes=4)
    result = metrics(pred, target)
    assert result["miou"].item() == pytest.approx(1 / 3)
    assert result["pixel_accuracy"].item() == pytest.approx(3 / 5)
    # logits give the same answer
    logits = F.one_hot(pred, 4).permute(0, 3, 1, 2).float()
    assert segmentation_metrics(num_classes=4)(logits, target)["miou"].item() == pytest.approx(1 / 3)


def test_miou_accumulates_over_the_dataset():
    """Row by row, the per-image mIoUs are 1/2 and 1/4 (mean 3/8); accumulated over both rows it is still 1/3."""
    target = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1], [1, 1, 0]]])
    metrics = segmentation_metrics(num_classes=4)
    for row in range(2):
        metrics.update(pred[:, row : row + 1], target[:, row : row + 1])
    result = metrics.compute()
    assert result["miou"].item() == pytest.approx(1 / 3)
    assert not math.isclose(result["miou"].item(), 3 / 8)
    assert result["pixel_accuracy"].item() == pytest.approx(3 / 5)
