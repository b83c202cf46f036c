"""What every task shares: the optimizer and schedule from timm, weight EMA, and the model rebuilt from its name.

A task takes a model *name* and plain keyword arguments, never a built module, so that a Lightning
checkpoint's hyper-parameters rebuild the model (STYLE.md practice 11).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn

__all__ = ["SCHEDULES", "VisionTask", "lr_multiplier"]

SCHEDULES = ("cosine", "poly", "multistep")


def lr_multiplier(
    step: int,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
    milestones: Sequence[float] = (),
) -> float:
    """Learning-rate multiplier at ``step``: a linear warm-up from 0, then

    - ``cosine``: a half cosine down to ``min_lr_ratio`` (timm, DeiT);
    - ``poly``: linear decay to ``min_lr_ratio`` (mmseg's poly schedule with power 1);
    - ``multistep``: x0.1 at each milestone, given as fractions of training (mmdet's 1x: 8/12, 11/12).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "poly":
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)
    if schedule == "multistep":
        return 0.1 ** sum(step >= m * total_steps for m in milestones)
    raise ValueError(f"unknown lr schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


class VisionTask(pl.LightningModule):
    """Base of the tasks: builds ``self.model`` through :meth:`build_model`, optimises it with a timm
    optimizer (layer-wise lr decay through the model's ``group_matcher``) under a per-step warm-up
    plus cosine, poly or multi-step schedule, and keeps an EMA of the weights when ``ema_decay`` is set (evaluated and
    exported in place of the raw weights).

    Args:
        optimizer: a timm optimizer name (``adamw``, ``lamb``, ``sgd``, ...).
        lr: peak learning rate.
        weight_decay: decoupled weight decay (norms, biases and ``no_weight_decay`` entries are exempt).
        layer_decay: layer-wise lr decay factor (e.g. 0.75 for fine-tuning), None for none.
        warmup_epochs: linear warm-up length in (fractional) epochs.
        warmup_steps: linear warm-up length in optimizer steps (added to ``warmup_epochs``; for runs set by
            ``max_steps``).
        lr_schedule: ``cosine``, ``poly`` or ``multistep`` after the warm-up, stepped every update
            (see :func:`lr_multiplier`).
        min_lr_ratio: final learning rate of ``cosine`` and ``poly`` as a fraction of ``lr``.
        milestones: ``multistep``'s decay points as fractions of training.
        ema_decay: EMA of the weights with this decay (timm ``ModelEmaV3``), None for none.
        optimizer_kwargs: more arguments for the optimizer (``momentum``, ``betas``, ...).
    """

    #: the validation metric that picks the best checkpoint (lowest for a loss, else highest)
    monitor = "val/loss"

    def __init__(
        self,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        layer_decay: float | None = None,
        warmup_epochs: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["cosine", "poly", "multistep"] = "cosine",
        min_lr_ratio: float = 0.01,
        milestones: list[float] | None = None,
        ema_decay: float | None = None,
        optimizer_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        if lr <= 0 or weight_decay < 0:
            raise ValueError(
                f"lr must be positive and weight_decay 0 or more, got lr={lr}, weight_decay={weight_decay}"
            )
        self.save_hyperparameters()  # collects the subclass's arguments too, defaults included

    def attach(self, model: nn.Module) -> None:
        """Set the trained model and its EMA (subclasses call this in ``__init__``)."""
        self.model = model
        decay = self.hparams.get("ema_decay")
        self.ema = ModelEmaV3(model, decay=decay).requires_grad_(False) if decay else None

    @property
    def eval_model(self) -> nn.Module:
        """The weights evaluated and exported: the EMA when there is one."""
        return self.model if self.ema is None else self.ema.module

    def configure_optimizers(self):
        hp = self.hparams
        if hp.layer_decay is not None and not hasattr(self.model, "group_matcher"):
            raise ValueError(f"layer_decay needs a model with a group_matcher; {type(self.model).__name__} has none")
        optimizer = create_optimizer_v2(
            self.model,
            opt=hp.optimizer,
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            layer_decay=hp.layer_decay,
            **(hp.optimizer_kwargs or {}),
        )
        for group in self.extra_param_groups():
            optimizer.add_param_group({"lr": hp.lr, "weight_decay": hp.weight_decay, **group})
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = self.trainer.max_epochs if (self.trainer.max_epochs or 0) > 0 else 1
        warmup = hp.warmup_steps + int(hp.warmup_epochs * total / epochs)
        if hp.lr_schedule not in SCHEDULES:
            raise ValueError(f"unknown lr_schedule {hp.lr_schedule!r}; valid: {', '.join(SCHEDULES)}")
        milestones = tuple(hp.milestones or ())

        def multiplier(step: int) -> float:
            return lr_multiplier(step, total, warmup, hp.lr_schedule, hp.min_lr_ratio, milestones)

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def extra_param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups trained beside the model's (a distillation's projections), under the same schedule."""
        return []

    def train_forward(self, images: torch.Tensor) -> Any:
        """The trained model's outputs in a training step (a distillation also records its feature maps)."""
        return self.model(images)

    def training_loss(self, batch) -> torch.Tensor:
        """The task's loss on a training batch (through :meth:`train_forward`); ``training_step`` logs it."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        loss = self.training_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)
