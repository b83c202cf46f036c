"""visionzoo explain: Grad-CAM over the image, and one query's attention weights in a block."""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from visionzoo.cli import main
from visionzoo.explain import attention_blocks, explain, explain_attention, grad_cam, preprocess, query_weights
from visionzoo.kernels import use_backend
from visionzoo.tasks import ClassificationTask

INPUT = 128  # model input: three stages of a tiny MixViT leave an 8x8 map for Grad-CAM
HELD_OUT = (96, 128)  # held-out images are (H, W) = 96x128: not the model's input size, not square
# A MixViT with depthwise convolutions gated by ECA: local mixing, so Grad-CAM's map stays where the evidence is
CAM_MODEL = dict(embed_dim=(16, 32, 64), depths=(1, 1, 1), num_heads=(1, 2, 4), mixers="eca", mixer_kwargs=({},) * 3)
# One block per attention mixer explain can draw; stage 0 alternates dilations 1 and 2 (DiNAT)
ATTENTION_MODEL = dict(
    embed_dim=(16, 32, 32, 64),
    depths=(2, 1, 1, 1),
    num_heads=(2, 2, 2, 4),
    mixers=("neighborhood", "routing", "global", "global_lepe"),
    mixer_kwargs=(
        ({"kernel_size": 5, "dilation": 1}, {"kernel_size": 3, "dilation": 2}),
        {"n_win": 3, "topk": 2},
        {},
        {},
    ),
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def squares(rng, count, size=(INPUT, INPUT), labels=None, quadrants=None, centred=False):
    """Dim noise with a red (class 0) or green (class 1) square in quadrant 0-3 (row-major): local evidence."""
    height, width = size
    images = rng.uniform(0.0, 0.4, (count, height, width, 3))
    labels = rng.integers(0, 2, count) if labels is None else np.asarray(labels)
    quadrants = rng.integers(0, 4, count) if quadrants is None else np.asarray(quadrants)
    side = min(height, width) // 4
    for image, label, quadrant in zip(images, labels, quadrants):
        top = height // 4 - side // 2 if centred else rng.integers(0, height // 2 - side)
        left = width // 4 - side // 2 if centred else rng.integers(0, width // 2 - side)
        top, left = top + height // 2 * (quadrant // 2), left + width // 2 * (quadrant % 2)
        image[top : top + side, left : left + side] = (1.0, 0.2, 0.2) if label == 0 else (0.2, 1.0, 0.2)
    return (images * 255).astype(np.uint8), labels


def normalised(images):
    """uint8 (B, H, W, 3) to the model's input, with the mean and std explain takes from its pretrained cfg."""
    x = torch.from_numpy(images).float().div(255).permute(0, 3, 1, 2)
    return (x - torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]) / torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]


def save_png(path, image):
    Image.fromarray(image).save(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MixViT trained until it tells red squares from green ones, and its visionzoo-fit checkpoint."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    task = ClassificationTask("mixvit_tiny", 2, model_kwargs=CAM_MODEL)
    model = task.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    val_images, val_labels = squares(np.random.default_rng(1), 64)
    accuracy = 0.0
    for step in range(1, 201):
        images, labels = squares(rng, 16)
        loss = F.cross_entropy(model(normalised(images)), torch.from_numpy(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            with torch.no_grad():
                predicted = model.eval()(normalised(val_images)).argmax(-1).numpy()
            model.train()
            accuracy = (predicted == val_labels).mean()
            if accuracy == 1.0:
                break
    assert accuracy == 1.0, f"the classes did not separate in {step} steps (validation accuracy {accuracy})"
    path = tmp_path_factory.mktemp("fit") / "last.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    return model.eval(), path


def quadrant_mask(size, quadrant):
    """True on ``quadrant`` (0-3, row-major) of an ``(H, W)`` map."""
    rows, cols = np.indices(size)
    return ((rows >= size[0] // 2) == (quadrant // 2 == 1)) & ((cols >= size[1] // 2) == (quadrant % 2 == 1))


@pytest.mark.parametrize("label", [0, 1])
def test_cam_peaks_in_the_quadrant_of_the_evidence(trained, tmp_path, label):
    model, _ = trained
    for quadrant in range(4):
        image, _ = squares(np.random.default_rng(10 + quadrant), 1, HELD_OUT, [label], [quadrant], centred=True)
        out = tmp_path / f"cam{quadrant}.png"
        result = explain(model, save_png(tmp_path / "in.png", image[0]), out, img_size=(INPUT, INPUT))
        assert result.predicted == result.class_index == label
        assert result.cam.shape == HELD_OUT and result.layer == "norm"
        inside = quadrant_mask(HELD_OUT, quadrant)
        assert inside.flat[result.cam.argmax()], f"class {label} in quadrant {quadrant}: the CAM peaks elsewhere"
        assert result.cam[inside].mean() > 1.2 * result.cam[~inside].mean()
        with Image.open(out) as drawn:
            assert drawn.size == (HELD_OUT[1], HELD_OUT[0]) and drawn.mode == "RGB"


def test_cli_explains_a_fit_checkpoint(trained, tmp_path, capsys):
    _, checkpoint = trained
    image, _ = squares(np.random.default_rng(20), 1, HELD_OUT, [1], [1], centred=True)
    png, out = save_png(tmp_path / "in.png", image[0]), tmp_path / "out" / "cam.png"
    argv = ["explain", "--checkpoint", str(checkpoint), "--image", str(png), "--out", str(out)]
    assert main([*argv, "--img-size", str(INPUT), str(INPUT)]) == 0
    printed = capsys.readouterr().out
    assert "predicted class 1" in printed and f"wrote {out}" in printed and "Grad-CAM of class 1 at norm" in printed
    with Image.open(out) as drawn:
        assert drawn.size == (HELD_OUT[1], HELD_OUT[0])
    other = tmp_path / "other.png"  # the other class on request: another map
    argv[-1] = str(other)
    assert main([*argv, "--img-size", str(INPUT), str(INPUT), "--class-index", "0"]) == 0
    assert "Grad-CAM of class 0" in capsys.readouterr().out
    with Image.open(out) as first, Image.open(other) as second:
        assert np.abs(np.asarray(first, float) - np.asarray(second, float)).mean() > 10


@pytest.mark.parametrize(
    "name, kwargs, channels_last",
    [
        ("mixvit_tiny", dict(CAM_MODEL, num_classes=5), True),
        ("resnet18", dict(num_classes=5), False),
        ("ela_resnet50", dict(num_classes=5), False),
    ],
)
def test_grad_cam_is_the_class_activation_map(name, kwargs, channels_last):
    """Average pooling and a linear classifier make Grad-CAM the CAM: relu(sum_c w[class, c] * A[c])."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    images = torch.randn(1, 3, 80, 96)
    layer = model.norm if channels_last else model.layer4
    captured = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    cam, logits, _ = grad_cam(model, images, class_index=3)
    handle.remove()
    features = captured[0].permute(0, 3, 1, 2) if channels_last else captured[0]
    expected = torch.einsum("c,chw->hw", model.get_classifier().weight[3].detach(), features[0]).clamp(min=0)
    expected = F.interpolate(expected[None, None], size=(80, 96), mode="bilinear", align_corners=False)[0, 0]
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    assert cam.shape == (80, 96)
    torch.testing.assert_close(torch.from_numpy(cam), expected, atol=2e-3, rtol=0)
    torch.testing.assert_close(logits, model(images), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def attention_task():
    torch.manual_seed(0)
    task = ClassificationTask("mixvit_tiny", 3, model_kwargs=ATTENTION_MODEL)
    with torch.no_grad():  # position biases far from their near-zero init, so that a misplaced one shows
        for block in task.model.stages[0].blocks:
            block.mixer.rpb.normal_()
    return task


@pytest.fixture
def attention_model(attention_task):
    return attention_task.model.eval()


def block_input(model, block, images):
    """The input (1, H, W, C) of ``block``'s mixer, and the mixer."""
    mixer = attention_blocks(model)[block]
    captured = []
    handle = mixer.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    return mixer, captured[0]


def mixer_output_at(mixer, x, query):
    """The mixer's attention output (heads, head_dim) at ``query`` from its own forward with the reference
    kernels: the input of ``proj``, less BiFormer's LePE convolution, which adds to it; and the values."""
    captured = []
    hooks = [mixer.proj.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))]
    if getattr(mixer, "lepe", None) is not None:
        hooks.append(mixer.lepe.register_forward_hook(lambda _m, _args, out: torch.zeros_like(out)))
    try:
        with use_backend("reference"):
            mixer(x)
    finally:
        for hook in hooks:
            hook.remove()
    out = captured[0][0, query[0], query[1]].unflatten(-1, (mixer.num_heads, mixer.head_dim))
    return out, mixer.qkv_heads(x)[2][0]


@pytest.mark.parametrize("size", [(112, 144), (100, 90)])  # maps of 28x36 / 25x23 tokens in stage 0
@pytest.mark.parametrize("block", ["0.0", "0.1", "1.0", "2.0", "3.0"])
def test_query_weights_are_the_mixers_attention(attention_model, block, size):
    """Each head sums to 1, and weighting the values with the map gives the kernel's output at the query."""
    images = torch.randn(1, 3, *size)
    mixer, x = block_input(attention_model, block, images)
    height, width = x.shape[1:3]
    for query in [(0, 0), (height // 2, width // 3), (height - 1, width - 2)]:
        with torch.no_grad():
            weights = query_weights(mixer, x, query)
            expected, values = mixer_output_at(mixer, x, query)
        assert weights.shape == (mixer.num_heads, height, width)
        torch.testing.assert_close(weights.sum((1, 2)), torch.ones(mixer.num_heads), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.einsum("hyx,hyxd->hd", weights, values), expected, atol=1e-5, rtol=1e-5)


def test_neighborhood_map_is_zero_outside_the_window(attention_model):
    _, x = block_input(attention_model, "0.0", torch.randn(1, 3, 96, 96))  # 24x24 tokens, 5x5 windows
    mixer = attention_blocks(attention_model)["0.0"]
    inside = torch.zeros(24, 24, dtype=torch.bool)
    inside[8:13, 3:8] = True  # query (10, 5): rows 8-12, cols 3-7
    weights = query_weights(mixer, x, (10, 5))
    assert (weights[:, ~inside] == 0).all() and (weights[:, inside] > 0).all()
    corner = torch.zeros(24, 24, dtype=torch.bool)
    corner[19:, :5] = True  # at the border the window shifts inside the map, it does not shrink
    weights = query_weights(mixer, x, (23, 0))
    assert (weights[:, ~corner] == 0).all() and (weights[:, corner] > 0).all()
    dilated = attention_blocks(attention_model)["0.1"]  # 3x3 window, dilation 2
    _, x = block_input(attention_model, "0.1", torch.randn(1, 3, 96, 96))
    inside = torch.zeros(24, 24, dtype=torch.bool)
    inside[8:13:2, 3:8:2] = True
    weights = query_weights(dilated, x, (10, 5))
    assert (weights[:, ~inside] == 0).all() and (weights[:, inside] > 0).all()


def test_routing_map_covers_exactly_the_routed_regions(attention_model):
    mixer, x = block_input(attention_model, "1.0", torch.randn(1, 3, 100, 90))  # 13x12 tokens, 3x3 regions of 5x4
    weights = query_weights(mixer, x, (6, 7))
    padded = F.pad(weights, (0, 0, 0, 2))  # 15x12: the mixer's padding, which never gets weight
    per_region = padded.reshape(mixer.num_heads, 3, 5, 3, 4).permute(0, 1, 3, 2, 4).flatten(3)  # (heads, 3, 3, 20)
    real = F.pad(torch.ones(13, 12), (0, 0, 0, 2)).reshape(3, 5, 3, 4).permute(0, 2, 1, 3).flatten(2).bool()
    routed = (per_region > 0).any(-1)  # (heads, 3, 3)
    assert (routed == routed[0]).all(), "every head attends to the same routed regions"
    assert routed[0].sum() == mixer.topk
    assert (per_region[:, routed[0]][..., real[routed[0]]] > 0).all(), "every real token of a routed region"


def test_explain_attention_draws_at_the_image_size(attention_task, tmp_path, capsys):
    image = (np.random.default_rng(0).uniform(size=(75, 110, 3)) * 255).astype(np.uint8)
    png = save_png(tmp_path / "in.png", image)
    model = attention_task.model.eval()
    result = explain_attention(model, png, tmp_path / "att.png", query=(70, 3), img_size=(96, 128))
    assert result.block == "0.1"  # default: the last block of the first stage with attention
    assert result.query == (70 * 24 // 75, 3 * 32 // 110)  # on stage 0's 24x32 map
    assert result.image_map.shape == (75, 110)
    with Image.open(tmp_path / "att.png") as drawn:
        assert drawn.size == (110, 75)
    checkpoint, out = tmp_path / "last.ckpt", tmp_path / "routing.png"
    torch.save(
        {"state_dict": attention_task.state_dict(), "hyper_parameters": dict(attention_task.hparams)}, checkpoint
    )
    argv = ["explain", "--checkpoint", str(checkpoint), "--image", str(png), "--out", str(out), "--attention"]
    assert main([*argv, "--block", "1.0", "--img-size", "96", "128"]) == 0  # query: the centre (37, 55)
    assert "attention of token (5, 8) in block 1.0" in capsys.readouterr().out  # on stage 1's 12x16 map
    with Image.open(out) as drawn:
        assert drawn.size == (110, 75)


def test_clear_errors(attention_model, tmp_path, capsys):
    png = save_png(tmp_path / "in.png", np.zeros((40, 50, 3), np.uint8))
    with pytest.raises(ValueError, match="is not a classifier"):
        explain(timm.create_model("resnet18", num_classes=0), png, tmp_path / "x.png")
    with pytest.raises(ValueError, match="is not a classifier"):
        explain_attention(timm.create_model("mixvit_tiny", **ATTENTION_MODEL, num_classes=0), png, "x.png")
    with pytest.raises(FileNotFoundError, match="no image at"):
        explain(attention_model, tmp_path / "missing.png", tmp_path / "x.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"cannot read .* as an image"):
        explain(attention_model, tmp_path / "text.png", tmp_path / "x.png")
    with pytest.raises(ValueError, match="class index 7 is outside the model's 3 classes"):
        explain(attention_model, png, tmp_path / "x.png", class_index=7, img_size=(64, 64))
    with pytest.raises(ValueError, match=r"query \(40, 10\) lies outside the 40x50 image"):
        explain_attention(attention_model, png, tmp_path / "x.png", query=(40, 10))
    with pytest.raises(ValueError, match=r"block '0.5' has no attention map; blocks with one: 0.0, 0.1, 1.0, 2.0, 3.0"):
        explain_attention(attention_model, png, tmp_path / "x.png", block="0.5")
    with pytest.raises(ValueError, match="resnet18 has no block with an attention map"):
        explain_attention(timm.create_model("resnet18"), png, tmp_path / "x.png")
    with pytest.raises(ValueError, match="needs inputs of at least"):
        explain(attention_model, png, tmp_path / "x.png", img_size=(8, 8))
    with pytest.warns(UserWarning, match=r"norm is 1x1 at input 32x32: Grad-CAM cannot localise"):
        explain(attention_model, png, tmp_path / "x.png", img_size=(32, 32))
    with pytest.raises(ValueError, match="no attention map for EcaMixer"):
        query_weights(
            timm.create_model("mixvit_tiny", **CAM_MODEL).stages[0].blocks[0].mixer, torch.zeros(1, 8, 8, 16), (0, 0)
        )
    assert main(["explain", "resnet18", "--image", str(tmp_path / "missing.png"), "--out", "x.png"]) == 2
    assert "error: no image at" in capsys.readouterr().err
    assert main(["explain", "resnet18", "--image", str(png), "--out", "x.png", "--query", "1", "1"]) == 2
    assert "--query and --block go with --attention" in capsys.readouterr().err
    assert (
        main(["explain", "resnet18", "--image", str(png), "--out", "x.png", "--attention", "--class-index", "1"]) == 2
    )
    assert "--class-index goes with Grad-CAM" in capsys.readouterr().err
    assert main(["explain", "--image", str(png), "--out", "x.png"]) == 2
    assert "give a model name or a checkpoint" in capsys.readouterr().err


def test_preprocess_squashes_without_cropping():
    model = timm.create_model("resnet18")
    image = Image.fromarray(np.full((50, 200, 3), 255, np.uint8))
    image.paste((0, 0, 0), (0, 0, 10, 50))  # a black band on the left edge: a centre crop would cut it
    x = preprocess(model, image)
    assert x.shape == (1, 3, 224, 224)
    assert (x[0, :, :, 0] < 0).all() and (x[0, :, :, -1] > 0).all()
    assert preprocess(model, image, (64, 96)).shape == (1, 3, 64, 96)
