"""ONNX export of every registered model, of segmenters and detectors, checked in onnxruntime; checkpoint
loading for export."""

import onnxruntime
import pytest
import torch
from safetensors.torch import save_model

from visionzoo.checkpoints import load_checkpoint, load_model
from visionzoo.cli import main
from visionzoo.export import check_onnx, export_onnx, fixed_size_reasons
from visionzoo.heads import create_detector, create_segmenter
from visionzoo.tasks import DetectionTask

from zoo_models import MODELS


# 10-70 s a model (tracing, then onnxruntime's graph optimisation): `make test-slow`, a CI step of its own
@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_model_exports_with_dynamic_batch_and_size(name, tmp_path):
    model = load_model(name, num_classes=10)
    path = export_onnx(model, tmp_path / f"{name}.onnx", input_size=(64, 64), dynamic=True)
    sizes = [(64, 64)] if fixed_size_reasons(model) else [(64, 64), (97, 75)]
    results = check_onnx(model, path, sizes, batch=3)
    assert [r.input_shape for r in results] == [(3, 3, *size) for size in sizes]
    assert all(r.ok for r in results), results


def test_static_export_fixes_the_input_shape(tmp_path):
    import onnx

    model = load_model("ela_resnet18", num_classes=3)
    path = export_onnx(model, tmp_path / "static.onnx", input_size=(64, 48), dynamic=False)
    dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 64, 48]
    assert check_onnx(model, path, [(64, 48)], batch=2)[0].ok


@pytest.fixture
def trained(tmp_path):
    model = load_model("ela_resnet18", num_classes=7)
    return model, tmp_path


def _same_outputs(a, b):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


def test_load_model_from_safetensors_resizes_the_classifier(trained):
    model, tmp_path = trained
    save_model(model, str(tmp_path / "weights.safetensors"))
    restored = load_model("ela_resnet18", tmp_path / "weights.safetensors")
    assert restored.num_classes == 7
    _same_outputs(model, restored)


def test_load_model_from_a_lightning_style_checkpoint(trained):
    model, tmp_path = trained
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3, "hyper_parameters": {"model": "ela_resnet18"}}, tmp_path / "last.ckpt")
    _same_outputs(model, load_model("ela_resnet18", tmp_path / "last.ckpt"))


def test_bad_checkpoints_are_clear_errors(trained):
    model, tmp_path = trained
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(corrupt)
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": model.state_dict()}, whole)
    for name, suffix in (("truncated.ckpt", ".ckpt"), ("truncated.safetensors", ".safetensors")):
        if suffix == ".safetensors":
            save_model(model, str(whole.with_suffix(suffix)))
        data = whole.with_suffix(suffix).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])  # a copy cut short
        with pytest.raises(ValueError, match=f"cannot read checkpoint .*{name}"):
            load_checkpoint(tmp_path / name)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"state_dict": {}, "hook": print}, unsafe)  # pickled code: refused by weights_only
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(unsafe)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.safetensors")
    save_model(model, str(tmp_path / "resnet.safetensors"))
    with pytest.raises(ValueError, match="does not fit mixvit_mini"):
        load_model("mixvit_mini", tmp_path / "resnet.safetensors")


def test_export_command_checks_in_onnxruntime(tmp_path, capsys):
    args = ["export", "ela_resnet18", "-o", str(tmp_path / "m.onnx"), "--img-size", "64", "64", "--dynamic"]
    assert main([*args, "--check-size", "80", "96"]) == 0
    out = capsys.readouterr().out
    assert "dynamic batch, dynamic HxW" in out and out.count("(ok)") == 2
    assert main([*args, "--tolerance", "-1"]) == 1  # nothing can pass a negative tolerance: the mismatch path
    assert "MISMATCH" in capsys.readouterr().out
    assert main(["export", "ela_resnet18", "--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_aggregated_attention_fixes_height_and_width(tmp_path):
    import onnx

    model = load_model("transnext_micro", num_classes=3, depths=(1, 1, 1, 1))
    assert fixed_size_reasons(model) == ["AggregatedAttention", "CosineGlobalAttention"]
    path = export_onnx(model, tmp_path / "transnext.onnx", input_size=(64, 96), dynamic=True)
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 64, 96]
    assert all(r.ok for r in check_onnx(model, path, [(64, 96)], batch=3))


def test_segmenter_exports_its_main_logits_with_dynamic_size(tmp_path):
    import onnx

    segmenter = create_segmenter("upernet", "mixvit_mini", 5, aux_head=True, channels=32).eval()
    path = export_onnx(segmenter, tmp_path / "upernet.onnx", input_size=(64, 64), dynamic=True)
    outputs = onnx.load(str(path)).graph.output
    assert [o.name for o in outputs] == ["outputs"]  # the auxiliary head only serves training
    dims = [d.dim_param or d.dim_value for d in outputs[0].type.tensor_type.shape.dim]
    assert (dims[0], *dims[2:]) == ("batch", "height", "width")
    results = check_onnx(segmenter, path, [(64, 64), (70, 90)], batch=2)
    assert [r.input_shape for r in results] == [(2, 3, 64, 64), (2, 3, 70, 90)]
    assert all(r.ok for r in results), results


# a score threshold of 0 keeps every candidate, so the check compares full sets of detections
@pytest.mark.parametrize(
    "name, kwargs", [("retinanet", {"score_thresh": 0.0}), ("mask_rcnn", {"box_score_thresh": 0.0})]
)
def test_detector_exports_one_image_with_dynamic_size(name, kwargs, tmp_path):
    detector = create_detector(name, "mixvit_mini", 4, min_size=96, max_size=128, fpn_channels=32, **kwargs).eval()
    if name == "retinanet":  # its initial scores agree to 6 digits: NMS would pick among them by rounding noise
        torch.nn.init.normal_(detector.head.classification_head.cls_logits.weight, std=1.0)
    path = export_onnx(detector, tmp_path / f"{name}.onnx", input_size=(100, 120), dynamic=True)
    results = check_onnx(detector, path, [(100, 120), (140, 90)])
    assert [r.input_shape for r in results] == [(3, 100, 120), (3, 140, 90)]
    assert all(r.ok for r in results), results
    assert all(r.detections > 0 for r in results), "nothing detected: the check compared empty sets"
    expected = {"boxes", "scores", "labels"} | ({"masks"} if name == "mask_rcnn" else set())
    assert {o.name for o in onnxruntime.InferenceSession(str(path)).get_outputs()} == expected


def test_export_rebuilds_a_detector_from_its_fit_checkpoint_with_the_ema_weights(tmp_path, capsys):
    task = DetectionTask(
        "mixvit_mini",
        3,
        detector="mask_rcnn",
        detector_kwargs={"min_size": 96, "max_size": 128, "fpn_channels": 32, "box_score_thresh": 0.0},
        ema_decay=0.9,
    )
    with torch.no_grad():  # the EMA weights differ from the trained ones: export must take the EMA's
        for p in task.ema.module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    model = load_model(None, path)
    image = torch.rand(3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model([image])[0]["scores"], task.ema.module.eval()([image])[0]["scores"])
    assert main(["export", "--checkpoint", str(path), "-o", str(tmp_path / "d.onnx"), "--dynamic"]) == 0
    out = capsys.readouterr().out
    assert "one image (a torchvision detector), dynamic HxW" in out and out.count("detections (ok)") == 2
    with pytest.raises(ValueError, match="rebuilds its own model"):
        load_model(None, path, num_classes=5)
