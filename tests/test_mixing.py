"""MaskMix (MixPro) beside timm's mixup/cutmix in the classification task, and LAMB's parameter groups."""

import lightning.pytorch as pl
import pytest
import timm
import torch
from timm.optim import Lamb

from visionzoo.tasks import ClassificationTask
from visionzoo.tasks.mixing import BatchMixing, MaskMix, patch_size

TINY = dict(embed_dim=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), mixers="neighborhood")


def _cells_are_uniform(mask: torch.Tensor, cell: int) -> bool:
    """Each ``cell x cell`` block of the mask (cut at the border) is all True or all False."""
    rows, cols = mask.shape
    blocks = (mask[r : r + cell, c : c + cell] for r in range(0, rows, cell) for c in range(0, cols, cell))
    return all(block.unique().numel() == 1 for block in blocks)


def test_maskmix_mixes_whole_cells_and_labels_by_the_kept_area():
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 30, 37), torch.tensor([0, 1, 2, 3])
    mixer = MaskMix(alpha=1.0, cell=8, num_classes=5)
    for seed in range(20):
        torch.manual_seed(seed)
        torch.rand(())  # the draw of prob, as __call__ makes it
        mask = mixer.mask(30, 37, images.device)
        torch.manual_seed(seed)
        mixed, targets = mixer(images, labels)
        assert _cells_are_uniform(mask, 8), "a cell mixes two images"
        torch.testing.assert_close(mixed, torch.where(mask, images, images.flip(0)), atol=0, rtol=0)
        kept = mask.float().mean()
        expected = kept * torch.eye(5)[labels] + (1 - kept) * torch.eye(5)[labels.flip(0)]
        torch.testing.assert_close(targets, expected)


def test_maskmix_kept_area_follows_its_beta():
    torch.manual_seed(0)
    mixer = MaskMix(alpha=0.2, cell=4, num_classes=2)
    areas = torch.tensor([mixer.mask(32, 32, torch.device("cpu")).float().mean().item() for _ in range(400)])
    assert abs(areas.mean() - 0.5) < 0.05  # Beta(0.2, 0.2) is symmetric ...
    assert ((areas < 0.1) | (areas > 0.9)).float().mean() > 0.5  # ... and mostly near 0 or 1


def test_maskmix_cells_follow_the_models_patch_size():
    model = timm.create_model("mixvit_mini", num_classes=3, **TINY)
    assert patch_size(model) == 4 and patch_size(torch.nn.Linear(2, 2)) == 1
    mixing = BatchMixing(model, 3, maskmix_alpha=1.0)
    assert mixing.mixers[0].cell == 4
    with pytest.raises(ValueError, match="maskmix_cell 6 is not a multiple of the model's patch size 4"):
        ClassificationTask("mixvit_mini", 3, model_kwargs=TINY, maskmix_alpha=1.0, maskmix_cell=6)


def test_unmixed_batches_keep_their_images_and_hard_labels():
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 1, 0])
    mixed, targets = MaskMix(alpha=1.0, cell=4, num_classes=2, prob=0.0, label_smoothing=0.1)(images, labels)
    assert mixed is images
    torch.testing.assert_close(targets, torch.eye(2)[labels] * 0.9 + 0.05)
    assert BatchMixing(torch.nn.Linear(2, 2), 2, maskmix_alpha=1.0)(images[:3], labels[:3]) is None  # odd batch


def test_task_with_mixup_and_maskmix_trains_on_both():
    torch.manual_seed(0)
    task = ClassificationTask("mixvit_mini", 3, model_kwargs=TINY, mixup_alpha=0.8, maskmix_alpha=1.0, maskmix_cell=8)
    assert [type(m).__name__ for m in task.mixing.mixers] == ["Mixup", "MaskMix"]
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    chosen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        chosen.add(int(torch.randint(2, ())))
        torch.manual_seed(seed)
        loss = task.training_step((images, labels), 0)
        assert torch.isfinite(loss)
    assert chosen == {0, 1}, "one of the mixes was never picked"


def test_lamb_gets_the_same_parameter_groups_as_adamw(monkeypatch):
    """Layer-wise lr decay and the weight-decay exemptions (norms, biases, the model's no_weight_decay) are the
    same for LAMB as for AdamW: only the update rule changes."""
    monkeypatch.setattr(pl.Trainer, "estimated_stepping_batches", 10)

    def groups(optimizer: str):
        task = ClassificationTask("nat_mini", 10, optimizer=optimizer, weight_decay=0.05, layer_decay=0.8)
        task.trainer = pl.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False)
        built = task.configure_optimizers()["optimizer"]
        names = {id(p): n for n, p in task.model.named_parameters()}
        return built, sorted(
            (g["weight_decay"], round(g.get("lr_scale", 1.0), 6), tuple(sorted(names[id(p)] for p in g["params"])))
            for g in built.param_groups
        )

    lamb, lamb_groups = groups("lamb")
    adamw, adamw_groups = groups("adamw")
    assert type(adamw).__name__ == "AdamW"
    assert isinstance(lamb, Lamb) and lamb_groups == adamw_groups
    exempt = {n for decay, _, params in lamb_groups if decay == 0 for n in params}
    assert "stages.0.blocks.0.mixer.rpb" in exempt and "stages.0.blocks.0.norm1.weight" in exempt
    assert "stages.0.blocks.0.mixer.qkv.weight" not in exempt
    assert len({scale for _, scale, _ in lamb_groups}) > 2, "no layer-wise decay"
