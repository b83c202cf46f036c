"""ONNX export of every registered model, of segmenters and detectors, checked in onnxruntime; checkpoint
loading for export."""

import onnxruntime
import pytest
import timm
import torch
from safetensors.torch import save_model

from visionzoo.checkpoints import load_checkpoint, load_model
from visionzoo.cli import main
from visionzoo.export import (
    ExportError,
    check_onnx,
    default_input_size,
    dynamic_size_range,
    export_onnx,
    export_program,
    program_to_onnx,
)
from visionzoo.heads import create_detector, create_segmenter
from visionzoo.tasks import DetectionTask

from zoo_models import FAMILY_MODELS, MODELS


def _dims(path) -> list:
    import onnx

    return [d.dim_param or d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]


# Shallow builds (every stage, two blocks each: DiNAT's dilated and plain blocks both) keep the slow suite
# within CI's budget: translating a graph to ONNX costs about 10 s a block on 2 cores.
def _shallow(name: str) -> dict:
    return {} if name.startswith("ela_resnet") else {"depths": (2, 2, 2, 2)}


# sizes that pad to other window, region and pool multiples than the export size, with other batches
CHECKS = [((97, 75), 1), ((70, 112), 3), ((224, 224), 2), ((417, 403), 1)]


def _assert_program_matches(program, model, checks) -> None:
    for (height, width), batch in checks:
        x = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_every_model_exports_at_its_size_and_runs_where_fewer_windows_fit(name):
    """torch.export at the model's input size (``visionzoo export``'s default): the program matches eager
    at sizes with fewer windows, regions and pool cells than traced, down to one window a stage."""
    model = load_model(name, num_classes=10, **_shallow(name))
    program = export_program(model, default_input_size(model, dynamic=True), dynamic=True)
    _assert_program_matches(program, model, [((64, 64), 1), ((97, 75), 3)])


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_model_exports_with_dynamic_batch_and_size(name, tmp_path):
    """torch.export with dynamic batch, height and width at 64x64, then ONNX: the program and onnxruntime
    match eager at sizes that pad differently."""
    model = load_model(name, num_classes=10, **_shallow(name))
    size = tuple(max(64, side) for side in dynamic_size_range(model)[0])
    program = export_program(model, size, dynamic=True)
    _assert_program_matches(program, model, CHECKS)  # more windows a stage than traced
    path = program_to_onnx(program, tmp_path / f"{name}.onnx", name)
    assert _dims(path) == ["batch", 3, "height", "width"]
    results = check_onnx(model, path, [size for size, _ in CHECKS], batch=[batch for _, batch in CHECKS])
    assert [r.input_shape for r in results] == [(batch, 3, *size) for size, batch in CHECKS]
    assert all(r.ok for r in results), [r.describe() for r in results]


def test_static_export_fixes_the_input_shape(tmp_path):
    model = load_model("ela_resnet18", num_classes=3)
    path = export_onnx(model, tmp_path / "static.onnx", input_size=(64, 48), dynamic=False)
    assert _dims(path) == [2, 3, 64, 48]
    assert check_onnx(model, path, [(64, 48)], batch=2)[0].ok
    (failed,) = check_onnx(model, path, [(64, 64)], batch=2)  # onnxruntime refuses it: a failed check, no raise
    assert not failed.ok and "\n" not in failed.error
    assert failed.describe().startswith("64x64 (batch 2): onnxruntime failed: InvalidArgument")


def test_dynamic_export_below_the_smallest_dynamic_size_is_one_line(tmp_path, capsys):
    model = load_model("ela_resnet18", num_classes=3)
    assert dynamic_size_range(model) == ((33, 33), (2048, 2048))
    with pytest.raises(ExportError, match="at 32x40: the export size must lie within 33x33 to 2048x2048"):
        export_onnx(model, tmp_path / "small.onnx", input_size=(32, 40), dynamic=True)
    assert main(["export", "ela_resnet18", "-o", str(tmp_path / "m.onnx"), "--img-size", "32", "40", "--dynamic"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: cannot export ela_resnet18 with dynamic") and captured.err.count("\n") == 1


def test_a_model_torch_export_cannot_trace_is_one_line(tmp_path, monkeypatch, capsys):
    model = load_model("ela_resnet18", num_classes=3)
    model.register_forward_pre_hook(lambda _, args: (args[0][..., :-1],) if args[0].shape[-1] % 2 else None)
    monkeypatch.setattr("visionzoo.checkpoints.load_model", lambda *_: model)
    assert main(["export", "ela_resnet18", "-o", str(tmp_path / "m.onnx"), "--img-size", "64", "64", "--dynamic"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: torch.export cannot trace ela_resnet18 with dynamic batch, height and width: ")
    assert "Constraints violated (width)" in err and err.count("\n") == 1


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
    assert main([*args, "--check-size", "80", "96", "--check-size", "97", "75"]) == 0
    out = capsys.readouterr().out
    assert "dynamic batch, dynamic HxW" in out and out.count("(ok)") == 4  # 64x64, 224x224 (its own), 80x96, 97x75
    assert main([*args, "--tolerance", "-1", "--check-size", "97", "75"]) == 2  # nothing passes a negative tolerance
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "(ok)" not in captured.out
    assert captured.err.startswith(f"error: {tmp_path / 'm.onnx'} differs from torch (tolerance -1) at 64x64 (batch 2)")
    assert "; 97x75 (batch 2): max abs diff " in captured.err
    assert main(["export", "ela_resnet18", "--checkpoint", str(tmp_path / "missing.ckpt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_an_onnx_file_that_does_not_load_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import visionzoo.export

    real_export = visionzoo.export.export_onnx

    def export_then_truncate(*args, **kwargs):  # the file is damaged between writing and checking
        path = real_export(*args, **kwargs)
        path.write_bytes(path.read_bytes()[:1000])
        return path

    monkeypatch.setattr(visionzoo.export, "export_onnx", export_then_truncate)
    assert main(["export", "ela_resnet18", "-o", str(tmp_path / "m.onnx"), "--img-size", "64", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'm.onnx'} does not load as an ONNX model: ")
    with pytest.raises(ExportError, match="does not load as an ONNX model"):
        check_onnx(timm.create_model("ela_resnet18"), tmp_path / "m.onnx", [(64, 64)])


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
    args = [
        "export",
        "--checkpoint",
        str(path),
        "-o",
        str(tmp_path / "d.onnx"),
        "--dynamic",
        "--check-size",
        "140",
        "90",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "one image (a torchvision detector), dynamic HxW" in out and out.count("detections (ok)") == 2
    with pytest.raises(ValueError, match="rebuilds its own model"):
        load_model(None, path, num_classes=5)
