"""The LightningModules: schedules, EMA, mixup, layer decay, and a short real run of each task on generated data."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from visionzoo.data import ClassificationData, DetectionData, SegmentationData
from visionzoo.tasks import ClassificationTask, DetectionTask, SegmentationTask
from visionzoo.tasks.base import lr_multiplier

from tiny_datasets import write_ade20k, write_coco, write_idx

TINY_MIXVIT = dict(embed_dim=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), mixers="eca")


def test_lr_multiplier_schedules():
    assert lr_multiplier(0, 100, 10) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10) == pytest.approx(1.0)
    assert lr_multiplier(10, 100, 10, "cosine", 0.01) == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_multiplier(100, 100, 10, "cosine", 0.01) == pytest.approx(0.01)
    assert lr_multiplier(55, 100, 10, "poly", 0.0) == pytest.approx(0.5)
    steps = [lr_multiplier(s, 120, 0, "multistep", milestones=(8 / 12, 11 / 12)) for s in (79, 80, 109, 110)]
    assert steps == pytest.approx([1.0, 0.1, 0.1, 0.01])
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_multiplier(50, 100, 0, "linear")


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def idx_root(tmp_path_factory):
    return write_idx(tmp_path_factory.mktemp("idx"), train=24, test=8)


def test_classification_ema_is_what_gets_evaluated(idx_root, tmp_path):
    task = ClassificationTask("mixvit_tiny", 10, model_kwargs=TINY_MIXVIT, ema_decay=0.5, lr=0.01)
    data = ClassificationData(str(idx_root), format="idx", image_size=32, batch_size=8, val_fraction=0.25)
    before = [p.detach().clone() for p in task.ema.module.parameters()]
    _trainer(tmp_path).fit(task, data)
    raw, ema = list(task.model.parameters()), list(task.ema.module.parameters())
    assert any(not torch.equal(b, e) for b, e in zip(before, ema)), "the EMA never moved"
    assert any(not torch.allclose(r, e) for r, e in zip(raw, ema)), "the EMA equals the raw weights"
    assert task.eval_model is task.ema.module
    assert not any(p.requires_grad for p in task.ema.module.parameters())


def test_mixup_batches_train_and_odd_batches_fall_back(idx_root, tmp_path):
    task = ClassificationTask("mixvit_tiny", 10, model_kwargs=TINY_MIXVIT, mixup_alpha=0.8, cutmix_alpha=1.0)
    task.trainer = _trainer(tmp_path)
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(task, "log", lambda *a, **k: None)
        patch.setattr(pl.Trainer, "optimizers", [torch.optim.SGD(task.parameters(), lr=0.1)])
        assert torch.isfinite(task.training_step((images, labels), 0))
        assert torch.isfinite(task.training_step((images[:3], labels[:3]), 0))


def test_layer_decay_uses_the_models_group_matcher(tmp_path):
    task = ClassificationTask("mixvit_tiny", 10, model_kwargs=TINY_MIXVIT, layer_decay=0.5, lr=1.0)
    task.trainer = _trainer(tmp_path, max_steps=10)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pl.Trainer, "estimated_stepping_batches", 10)
        optimizer = task.configure_optimizers()["optimizer"]
    scales = sorted({group["lr_scale"] for group in optimizer.param_groups})
    assert len(scales) > 2 and scales[-1] == 1.0 and math.isclose(scales[-2], 0.5)


def test_layer_decay_needs_a_group_matcher(tmp_path):
    task = SegmentationTask("resnet18", 3, decoder="semantic_fpn", aux_weight=0.0, layer_decay=0.7)
    task.trainer = _trainer(tmp_path)
    with pytest.raises(ValueError, match="group_matcher"):
        task.configure_optimizers()


def test_detection_task_trains_and_reports_map(tmp_path):
    torch.set_num_threads(1)
    paths = write_coco(tmp_path / "coco", images=3, with_masks=False)
    data = DetectionData(**paths, batch_size=2)
    task = DetectionTask("resnet18", data.num_classes, detector="fcos", detector_kwargs=dict(min_size=64, max_size=96))
    trainer = _trainer(tmp_path)
    trainer.fit(task, data)
    metrics = trainer.validate(task, data, verbose=False)[0]
    assert 0.0 <= metrics["val/map"] <= 1.0 and "val/map_50" in metrics


def test_segmentation_task_trains_and_reports_miou(tmp_path):
    torch.set_num_threads(1)
    root = write_ade20k(tmp_path / "ade", images=2, num_classes=4)
    data = SegmentationData(str(root), layout="ade20k", num_classes=4, batch_size=2, image_size=64)
    task = SegmentationTask("resnet18", data.num_classes, decoder="upernet", segmenter_kwargs=dict(channels=32))
    trainer = _trainer(tmp_path)
    trainer.fit(task, data)
    metrics = trainer.validate(task, data, verbose=False)[0]
    assert 0.0 <= metrics["val/miou"] <= 1.0 and "val/pixel_accuracy" in metrics


def test_segmentation_scores_predictions_resized_to_the_stored_labels(tmp_path):
    """mmsegmentation's evaluation: the prediction on the resized image, cropped to the image and resized (bilinear
    logits) to the label as stored, scored by torchmetrics against the label PNG read here."""
    root = write_ade20k(tmp_path / "ade", images=3, size=(40, 56), num_classes=4)
    data = SegmentationData(str(root), layout="ade20k", num_classes=4, batch_size=2, image_size=64)
    task = SegmentationTask("resnet18", 4, decoder="semantic_fpn", aux_weight=0.0, segmenter_kwargs=dict(channels=16))
    reported = _trainer(tmp_path, limit_val_batches=None).validate(task, data, verbose=False)[0]["val/miou"]

    oracle = MulticlassJaccardIndex(4, average="macro", ignore_index=255)
    rows = round(40 * 64 / 56)  # the long side 56 -> 64, then padded to 64x64 at the bottom
    task.eval()
    for index, (_, label_path) in enumerate(data.dataset("val").pairs):
        image = data.dataset("val")[index][0]
        stored = torch.from_numpy(np.asarray(Image.open(label_path)).astype(np.int64))
        label = torch.where(stored == 0, 255, stored - 1)  # ADE20K's reduce_zero_label
        with torch.no_grad():
            logits = task(image[None])[:, :, :rows]
        oracle.update(F.interpolate(logits, size=(40, 56), mode="bilinear").argmax(1), label[None])
    assert reported == pytest.approx(oracle.compute().item(), abs=1e-6)
    assert reported != pytest.approx(_at_transformed_size(task, tmp_path, root), abs=1e-4), "the check cannot fail"


def _at_transformed_size(task, tmp_path, root) -> float:
    data = SegmentationData(
        str(root), layout="ade20k", num_classes=4, batch_size=2, image_size=64, eval_at_label_size=False
    )
    return _trainer(tmp_path, limit_val_batches=None).validate(task, data, verbose=False)[0]["val/miou"]
