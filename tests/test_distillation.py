"""Distillation: the logit term against timm's, the losses going down on tiny data, checkpoints that rebuild the
student, segmentation students, feature maps of either layout, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.task import LogitDistillationTask
from torch import nn

from visionzoo.checkpoints import load_model
from visionzoo.cli import main
from visionzoo.data import ClassificationData
from visionzoo.heads import create_segmenter
from visionzoo.tasks import DistillationTask, SegmentationDistillationTask
from visionzoo.tasks.distillation import _embedding_path, _Taps, distillation_kl

from tiny_datasets import write_idx

TEACHER = dict(embed_dim=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), mixers="eca")
STUDENT = dict(embed_dim=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), mixers="eca")


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A tiny MixViT teacher's weights as safetensors (as an official release or an export would give them)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file(timm.create_model("mixvit_tiny", num_classes=10, **TEACHER).state_dict(), str(path))
    return path


def _task(teacher_file, **kwargs) -> DistillationTask:
    args = dict(
        teacher="mixvit_tiny",
        teacher_checkpoint=str(teacher_file),
        teacher_kwargs=dict(num_classes=10, **TEACHER),
        model_name="mixvit_tiny",
        num_classes=10,
        model_kwargs=STUDENT,
    )
    return DistillationTask(**{**args, **kwargs})


def test_logit_term_equals_timms_logit_distillation():
    student = timm.create_model("mixvit_tiny", num_classes=10, **STUDENT).eval()
    teacher = timm.create_model("mixvit_tiny", num_classes=10, **TEACHER)
    teacher.pretrained_cfg = student.pretrained_cfg  # the same normalisation: timm's task passes images unchanged
    timm_task = LogitDistillationTask(
        student, teacher, criterion=nn.CrossEntropyLoss(), temperature=4.0, task_loss_weight=0.5, verbose=False
    )
    images, labels = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    expected = timm_task(images, labels)["kd_loss"]
    with torch.no_grad():
        ours = distillation_kl(student(images), teacher.eval()(images), temperature=4.0)
    torch.testing.assert_close(ours, expected.detach())
    per_pixel = distillation_kl(torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4), 2.0)
    assert per_pixel.ndim == 0 and per_pixel > 0


def test_distillation_lowers_its_losses_and_its_checkpoint_rebuilds_the_student(teacher_file, tmp_path):
    root = write_idx(tmp_path / "idx", train=24, test=8)
    data = ClassificationData(str(root), format="idx", image_size=32, batch_size=8, val_fraction=0.25)
    task = _task(teacher_file, task_weight=0.0, logit_weight=1.0, feature_weight=1.0, embed_weight=1.0, lr=0.01)
    data.setup("fit")
    images = next(iter(data.train_dataloader()))[0]

    def terms() -> dict[str, float]:
        with torch.no_grad():
            task.model.eval()
            student = task.distiller.student_taps(task.model, images)
            teacher = task.distiller.teacher_taps(task.teacher, images)
            task.model.train()
            return {k: v.item() for k, v in task.distiller(student, teacher).items()}

    before = terms()
    assert set(before) == {"logit", "feature", "embed"}
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1,
    )  # fmt: skip
    trainer.fit(task, data)
    after = terms()
    assert all(after[name] < before[name] for name in before), (before, after)

    path = tmp_path / "distilled.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert not any(k.startswith("teacher") for k in saved), "the frozen teacher was saved"
    assert any(k.startswith("distiller.projections.") for k in saved)
    student = load_model(None, path)
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in task.model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(student(images), task.model.eval()(images))
    resumed = DistillationTask.load_from_checkpoint(path, weights_only=True)  # the whole task, teacher reloaded
    torch.testing.assert_close(resumed.distiller.projections[0].weight, task.distiller.projections[0].weight)


def test_every_distillation_weight_zero_trains_the_student_alone(teacher_file):
    task = _task(teacher_file, task_weight=1.0, logit_weight=0.0)
    assert not task.distiller.active and not list(task.distiller.parameters())
    task.log = task.log_dict = lambda *args, **kwargs: None
    batch = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    ran = []
    task.teacher.register_forward_hook(lambda *args: ran.append(True))
    assert task.training_step(batch, 0) > 0 and not ran, "the teacher ran for nothing"


def test_segmentation_student_against_a_segmenter_or_a_classifier_teacher(tmp_path):
    teacher = create_segmenter("semantic_fpn", "mixvit_tiny", 4, channels=16, backbone_kwargs=TEACHER)
    task = SegmentationDistillationTask(
        teacher="mixvit_tiny",
        teacher_kwargs=dict(num_classes=4, **TEACHER),
        logit_weight=0.0,
        feature_weight=1.0,
        embed_weight=1.0,
        model_name="mixvit_tiny",
        num_classes=4,
        decoder="semantic_fpn",
        segmenter_kwargs=dict(channels=16, backbone_kwargs=STUDENT),
    )
    task.log = task.log_dict = lambda *args, **kwargs: None
    batch = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    task.training_step(batch, 0).backward()
    assert all(p.grad is not None for p in task.distiller.parameters())

    # a segmenter teacher: per-pixel logits, maps from its backbone; the stem is channels-last inside timm's wrapper
    assert _embedding_path(teacher) == ("backbone.body.model.stem", True)
    seen = _Taps([0, 3], ("backbone.body.model.stem", True))(teacher, batch[0])
    assert seen.logits.shape == (2, 4, 64, 64)
    assert [tuple(m.shape) for m in seen.maps] == [(2, 16, 16, 16), (2, 32, 2, 2)]
    assert seen.embedding.shape == (2, 16, 16, 16)


def test_a_teacher_that_does_not_fit_is_a_one_line_error(teacher_file, tmp_path):
    with pytest.raises(ValueError, match="classifier teacher of 10 classes; teacher mixvit_tiny gives 5"):
        _task(teacher_file, teacher_checkpoint=None, teacher_kwargs=dict(num_classes=5, **TEACHER))
    with pytest.raises(ValueError, match="teacher test_vit has no stride-4 map for the student's stage 0"):
        _task(
            teacher_file,
            teacher="test_vit",
            teacher_checkpoint=None,
            teacher_kwargs={},
            logit_weight=0,
            feature_weight=1,
        )
    with pytest.raises(ValueError, match="feature stage 7 is not one of"):
        _task(teacher_file, feature_weight=1.0, feature_stages=[7])
    with pytest.raises(ValueError, match="the teacher cannot be built: no checkpoint at"):
        _task(teacher_file, teacher_checkpoint=str(tmp_path / "missing.ckpt"))


def test_the_distillation_recipe_names_a_missing_teacher_in_one_line(tmp_path, capsys):
    root = write_idx(tmp_path / "idx", train=16, test=4)
    recipe = str(Path(__file__).parents[1] / "recipes" / "classification" / "quickstart_distill.yaml")
    args = ["fit", "--config", recipe, f"--data.init_args.root={root}", f"--trainer.default_root_dir={tmp_path}"]
    assert main([*args, f"--model.init_args.teacher_checkpoint={tmp_path / 'none.ckpt'}"]) == 2
    err = capsys.readouterr().err
    assert "the teacher cannot be built: no checkpoint at" in err and "Traceback" not in err
