"""int8 export: a fit checkpoint quantized in onnxruntime with a recipe's val split, checked against the float file;
ONNX files timed side by side; the errors in one line."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import yaml

from visionzoo.cli import main
from visionzoo.quantize import QuantizeError, compare_onnx, recipe_data

from tiny_datasets import write_idx

QUICKSTART = Path(__file__).parents[1] / "recipes" / "classification" / "quickstart.yaml"
CPU = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32",
    "--trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The quickstart recipe (a quarter of train held out) fitted for 200 steps on a tiny Fashion-MNIST-like set;
    its data root, recipe and checkpoint."""
    tmp = tmp_path_factory.mktemp("int8")
    root = write_idx(tmp / "idx", train=128, test=32)
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["data"]["init_args"].update(val_fraction=0.25, batch_size=16)
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = tmp / "run"
    args = ["fit", "--config", str(tmp / "recipe.yaml"), f"--data.init_args.root={root}"]
    assert main([*args, f"--trainer.default_root_dir={run}", "--trainer.max_steps=200", *CPU]) == 0
    return root, tmp / "recipe.yaml", run / "checkpoints" / "last.ckpt"


def _export_int8(trained, out: Path, *extra: str) -> int:
    root, recipe, checkpoint = trained
    args = ["export", "--checkpoint", str(checkpoint), "-o", str(out), "--int8", "--calibration", str(recipe)]
    return main([*args, "--calibration-root", str(root), "--calibration-batches", "2", "--no-check", *extra])


def test_int8_export_round_trips_and_agrees_with_the_float_model(trained, tmp_path, capsys):
    float_path = tmp_path / "quickstart.onnx"
    assert _export_int8(trained, float_path) == 0
    out = capsys.readouterr().out
    int8_path = tmp_path / "quickstart.int8.onnx"
    assert f"wrote {int8_path} (int8" in out and "int8 against float on the test split: 32 images" in out
    graph = onnx.load(str(int8_path)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, "nothing was quantized"
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    assert int8_weights, "no int8 weights in the file"
    assert int8_path.stat().st_size < 0.4 * float_path.stat().st_size

    # on a fixed batch (the 32 test images): the same class for at least 90% and logits within 0.5
    data = recipe_data(trained[1], trained[0])
    comparison = compare_onnx(float_path, int8_path, data.test_dataloader())
    assert comparison.images == 32 and comparison.agreement >= 0.9 and comparison.max_abs_diff <= 0.5, comparison
    assert comparison.float_top1 is not None and abs(comparison.float_top1 - comparison.int8_top1) <= 0.1

    assert main(["bench", "--onnx", str(float_path), "--onnx", str(int8_path), "--img-size", "32", "32",
                 "--batch", "4", "--min-run-time", "0.05"]) == 0  # fmt: skip
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| file | MiB |") and len(table) == 4
    assert "quickstart.int8.onnx" in table[3] and "32x32, batch 4" in table[3]


def test_int8_errors_are_one_line(trained, tmp_path, capsys):
    root, recipe, checkpoint = trained
    assert main(["export", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--int8"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: --int8 needs --calibration RECIPE (its val split calibrates the ranges)"
    )

    missing = root.parent / "missing", recipe, checkpoint
    assert _export_int8(missing, tmp_path / "m.onnx") == 2
    err = capsys.readouterr().err.strip()
    assert "the data cannot be built" in err and "does not exist" in err and len(err.splitlines()) == 1

    no_val = yaml.safe_load(QUICKSTART.read_text())
    no_val["data"]["init_args"]["val_fraction"] = 0
    (tmp_path / "no_val.yaml").write_text(yaml.safe_dump(no_val))
    args = ["export", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--int8", "--no-check"]
    assert main([*args, "--calibration", str(tmp_path / "no_val.yaml"), "--calibration-root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert "val" in err and len(err.splitlines()) == 1, err

    foreign = {**no_val, "data": {"class_path": "some_module.Data", "init_args": {}}}
    (tmp_path / "foreign.yaml").write_text(yaml.safe_dump(foreign))
    with pytest.raises(ValueError, match=r"'some_module\.Data' is outside the namespaces"):
        recipe_data(tmp_path / "foreign.yaml")
    with pytest.raises(QuantizeError, match="has no data: section"):
        (tmp_path / "empty.yaml").write_text("trainer: {}\n")
        recipe_data(tmp_path / "empty.yaml")

    assert main(["bench", "--onnx", str(tmp_path / "none.onnx")]) == 2
    assert "no ONNX file at" in capsys.readouterr().err


@pytest.mark.slow  # an export and a calibration of its own (about 30 s on 2 cores): `make test-slow`
def test_int8_segmenter_is_compared_per_pixel(tmp_path):
    """A segmenter's val batches carry each mask at its stored size: the comparison reads the images alone and
    scores per pixel; an untrained segmenter's logits stay within a tenth of their spread."""
    import numpy as np
    import onnxruntime

    from visionzoo.data import SegmentationData
    from visionzoo.export import export_onnx
    from visionzoo.heads import create_segmenter
    from visionzoo.quantize import quantize_onnx

    from tiny_datasets import write_ade20k

    tiny = dict(embed_dim=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), mixers="eca")
    segmenter = create_segmenter("semantic_fpn", "mixvit_tiny", 4, channels=16, backbone_kwargs=tiny).eval()
    float_path = export_onnx(segmenter, tmp_path / "fpn.onnx", input_size=(64, 64), dynamic=True)
    root = write_ade20k(tmp_path / "ade", images=4, num_classes=4)
    data = SegmentationData(str(root), layout="ade20k", num_classes=4, batch_size=2, image_size=64)
    int8_path = quantize_onnx(float_path, tmp_path / "fpn.int8.onnx", data.val_dataloader(), batches=2)
    comparison = compare_onnx(float_path, int8_path, data.val_dataloader())
    assert comparison.images == 4 and comparison.float_top1 is None  # no image labels: agreement only
    images = next(iter(data.val_dataloader()))[0].numpy()
    logits = onnxruntime.InferenceSession(str(float_path)).run(None, {"images": images})[0]
    assert logits.shape == (2, 4, 64, 64)
    assert comparison.max_abs_diff <= 0.1 * float(np.ptp(logits)), (comparison, float(np.ptp(logits)))
