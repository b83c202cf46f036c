"""ONNX export of every registered model, checked in onnxruntime; checkpoint loading for export."""

import pytest
import torch
from safetensors.torch import save_model

from visionzoo.cli import main
from visionzoo.export import check_onnx, export_onnx, fixed_size_reasons, load_checkpoint, load_model

from conftest import MODELS


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
    assert "dynamic batch and HxW" in out and out.count("(ok)") == 2
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
