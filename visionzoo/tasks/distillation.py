"""Knowledge distillation: a frozen teacher's logits and feature maps train a smaller student.

- Logit distillation (Hinton et al., 2015): the KL divergence from the teacher's temperature-softened class
  distribution to the student's, times ``T^2``, per sample (classification) or per pixel (segmentation);
  timm's ``LogitDistillationTask`` computes the same term (a test checks it).
- Feature-map distillation (TransKD): each chosen student stage, projected by a learned 1x1 convolution to the
  width of the teacher's stage at the same stride and resized to its map, against that map (mean squared
  error); optionally TransKD's patch-embedding alignment, the same on the stem's patch embeddings.

timm's ``timm.task`` distillation tasks are not Lightning modules and re-normalise the teacher's input from
the two models' ``pretrained_cfg``; here the teacher sees the student's batch as it is, so it must have been
trained on the same normalisation (a fit checkpoint of the same data is).

The teacher is frozen, kept out of the task's state dict (its checkpoints hold the student and the
projections) and loaded again from where the recipe names it; a distillation's fit checkpoint rebuilds
its student alone (:meth:`DistillationTask.student_of`), for ``visionzoo export`` and ``explain``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visionzoo.checkpoints import find_backbone, load_model, pretrained_cfg_of
from visionzoo.heads import Segmenter

from .classification import ClassificationTask
from .segmentation import SegmentationTask

__all__ = ["DistillationTask", "Distiller", "SegmentationDistillationTask", "distillation_kl"]

# the teacher's and the losses' arguments: a distillation's checkpoint rebuilds its student without them
DISTILLATION_ARGS = (
    "teacher",
    "teacher_checkpoint",
    "teacher_kwargs",
    "temperature",
    "task_weight",
    "logit_weight",
    "feature_weight",
    "feature_stages",
    "embed_weight",
)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))`` over the class dimension 1, averaged over
    samples (and pixels, for ``(B, classes, H, W)`` logits)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(student, teacher, reduction="none", log_target=True).sum(1).mean() * temperature**2


def _label(model: nn.Module) -> str:
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    return f"segmenter over {model.backbone.name}" if isinstance(model, Segmenter) else name


def _stages(model: nn.Module) -> tuple[list[int], list[int]]:
    """Strides and widths of the maps a model gives: a segmenter's backbone maps, a classifier's stages."""
    if isinstance(model, Segmenter):
        return list(model.backbone.strides), list(model.backbone.channels)
    info = getattr(model, "feature_info", None)
    entries = getattr(info, "info", info)
    if not entries or not hasattr(model, "forward_intermediates"):
        raise ValueError(f"{_label(model)} has no forward_intermediates, which feature distillation needs")
    return [e["reduction"] for e in entries], [e["num_chs"] for e in entries]


def _embedding_path(model: nn.Module) -> tuple[str, bool]:
    """Where a model's patch embedding is (its ``patch_embed`` or ``stem``) and whether it is channels-last."""
    path = "backbone.body" if isinstance(model, Segmenter) else ""
    owner = model.get_submodule(path)
    if isinstance(getattr(owner, "model", None), nn.Module):  # timm's FeatureGetterNet wraps the model
        path, owner = f"{path}.model".lstrip("."), owner.model
    for name in ("patch_embed", "stem"):
        if isinstance(getattr(owner, name, None), nn.Module):
            return f"{path}.{name}".lstrip("."), str(getattr(owner, "output_fmt", "NCHW")).endswith("NHWC")
    raise ValueError(f"{_label(model)} has no patch_embed or stem module, which patch-embedding alignment needs")


@dataclass
class Seen:
    """What a forward gave the distillation: the model's outputs, its maps at the matched stages (NCHW) and
    its patch embedding (NCHW) when asked for."""

    outputs: Any
    maps: list[torch.Tensor] = field(default_factory=list)
    embedding: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor:
        return self.outputs["out"] if isinstance(self.outputs, Mapping) else self.outputs


class _Taps:
    """Which maps to take from one model (stage indices, the patch embedding's module path), and taking them."""

    def __init__(self, indices: Sequence[int], embedding: tuple[str, bool] | None):
        self.indices = list(indices)
        self.embedding = embedding

    def __call__(self, model: nn.Module, images: torch.Tensor) -> Seen:
        captured: list[torch.Tensor] = []
        hooks = []
        if self.embedding is not None:
            module = model.get_submodule(self.embedding[0])
            hooks.append(module.register_forward_hook(lambda _module, _args, out: captured.append(out)))
        maps: list[torch.Tensor] = []
        try:
            if not self.indices:
                outputs = model(images)
            elif isinstance(model, Segmenter):
                hooks.append(model.backbone.register_forward_hook(lambda _module, _args, out: maps.extend(out)))
                outputs = model(images)
                maps = [maps[i] for i in self.indices]
            else:
                final, maps = model.forward_intermediates(images, indices=self.indices)
                outputs = model.forward_head(final)
        finally:
            for hook in hooks:
                hook.remove()
        embedding = None
        if captured:
            embedding = captured[0].permute(0, 3, 1, 2) if self.embedding[1] else captured[0]
        return Seen(outputs, maps, embedding)


def _matched(projection: nn.Module, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a student map, projected to the teacher's width and resized to its map."""
    student = projection(student)
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    return F.mse_loss(student.float(), teacher.float())


class Distiller(nn.Module):
    """The trainable part of a distillation: a 1x1 projection per matched stage (and for the patch
    embedding), and the losses between what the student and the teacher saw.

    Args:
        student, teacher: the two models (classifiers or segmenters).
        feature_stages: the student's stages distilled (indices into its maps; None: all), each matched to
            the teacher's map at the same stride; empty: no feature-map term.
        embed: also align the patch embeddings (the ``patch_embed``/``stem`` outputs).
        temperature: of the logit term; None: no logit term.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        feature_stages: Sequence[int] | None = None,
        embed: bool = False,
        temperature: float | None = 1.0,
    ):
        super().__init__()
        if temperature is not None and temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        student_indices, teacher_indices, projections = [], [], []
        if feature_stages is None or len(feature_stages):
            (student_strides, student_widths), (teacher_strides, teacher_widths) = _stages(student), _stages(teacher)
            for index in range(len(student_strides)) if feature_stages is None else feature_stages:
                if not 0 <= index < len(student_strides):
                    raise ValueError(f"feature stage {index} is not one of {_label(student)}'s {len(student_strides)}")
                stride = student_strides[index]
                if stride not in teacher_strides:
                    raise ValueError(
                        f"teacher {_label(teacher)} has no stride-{stride} map for the student's stage {index} "
                        f"(its strides: {', '.join(map(str, teacher_strides))})"
                    )
                match = teacher_strides.index(stride)
                student_indices.append(index)
                teacher_indices.append(match)
                projections.append(nn.Conv2d(student_widths[index], teacher_widths[match], 1))
        self.projections = nn.ModuleList(projections)
        embeddings = (_embedding_path(student), _embedding_path(teacher)) if embed else (None, None)
        self.student_taps = _Taps(student_indices, embeddings[0])
        self.teacher_taps = _Taps(teacher_indices, embeddings[1])
        self.embed_projection = self._embed_projection(student, teacher) if embed else None

    def _embed_projection(self, student: nn.Module, teacher: nn.Module) -> nn.Conv2d:
        """The patch embeddings' 1x1 projection, its widths read off one forward of each model."""
        widths = []
        for model, taps in ((student, self.student_taps), (teacher, self.teacher_taps)):
            size = pretrained_cfg_of(model)["input_size"][1:]
            images = torch.zeros(1, getattr(find_backbone(model), "in_chans", 3), *size)
            was_training = model.training
            with torch.no_grad():
                widths.append(_Taps([], taps.embedding)(model.eval(), images).embedding.shape[1])
            model.train(was_training)
        return nn.Conv2d(widths[0], widths[1], 1)

    @property
    def active(self) -> bool:
        """Whether any term is on (else the teacher need not run)."""
        return self.temperature is not None or len(self.projections) > 0 or self.embed_projection is not None

    def forward(self, student: Seen, teacher: Seen) -> dict[str, torch.Tensor]:
        """The unweighted terms: ``logit`` (KL), ``feature`` (mean over the matched stages), ``embed``."""
        terms = {}
        if self.temperature is not None:
            terms["logit"] = distillation_kl(student.logits, teacher.logits, self.temperature)
        if self.projections:
            terms["feature"] = torch.stack(
                [_matched(p, s, t) for p, s, t in zip(self.projections, student.maps, teacher.maps, strict=True)]
            ).mean()
        if self.embed_projection is not None:
            terms["embed"] = _matched(self.embed_projection, student.embedding, teacher.embedding)
        return terms


class _Distillation:
    """The teacher and the distillation losses, mixed in before a task (``training_loss`` stays the task's)."""

    def _setup_distillation(self, num_classes: int, segmentation: bool) -> None:
        hp = self.hparams
        if min(hp.task_weight, hp.logit_weight, hp.feature_weight, hp.embed_weight) < 0:
            raise ValueError("the distillation weights must be 0 or more")
        try:
            teacher = load_model(hp.teacher, hp.teacher_checkpoint, **(hp.teacher_kwargs or {}))
        except (ValueError, FileNotFoundError, RuntimeError) as error:
            raise ValueError(f"the teacher cannot be built: {error}") from None  # the whole story, in one line
        if hp.logit_weight > 0:
            segmenter = isinstance(teacher, Segmenter)
            teacher_classes = teacher.decoder.classifier.out_channels if segmenter else teacher.num_classes
            if segmenter != segmentation or teacher_classes != num_classes:
                kind = "a segmenter" if segmentation else "a classifier"
                raise ValueError(
                    f"logit distillation needs {kind} teacher of {num_classes} classes; teacher {_label(teacher)} "
                    f"gives {teacher_classes} (set logit_weight: 0 to distil features only)"
                )
        self._teacher = (teacher.requires_grad_(False).eval(),)  # a tuple: not a submodule, not saved
        stages = hp.feature_stages if hp.feature_weight > 0 else []
        temperature = hp.temperature if hp.logit_weight > 0 else None
        # checkpoints.TRAINING_ONLY_PREFIX: a rebuilt student leaves these weights out
        self.distiller = Distiller(self.model, teacher, stages, hp.embed_weight > 0, temperature)
        self._seen: tuple[torch.Tensor, Seen] | None = None

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    @classmethod
    def student_of(cls, hparams: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
        """The task class and arguments that rebuild the student alone from a distillation's hyper-parameters."""
        return cls.student_task, {k: v for k, v in hparams.items() if k not in DISTILLATION_ARGS}

    def train_forward(self, images: torch.Tensor) -> Any:
        seen = self.distiller.student_taps(self.model, images)
        self._seen = (images, seen)
        return seen.outputs

    def extra_param_groups(self) -> list[dict[str, Any]]:
        params = list(self.distiller.parameters())
        return [{"params": params}] if params else []

    def training_step(self, batch, batch_idx):
        hp = self.hparams
        task_loss = self.training_loss(batch)
        (images, student), self._seen = self._seen, None
        if not self.distiller.active:  # every distillation weight 0: the student trained alone
            self.log("train/loss", task_loss, prog_bar=True)
            return task_loss
        with torch.no_grad():
            teacher = self.distiller.teacher_taps(self.teacher.to(images.device), images)
        terms = self.distiller(student, teacher)
        weights = {"logit": hp.logit_weight, "feature": hp.feature_weight, "embed": hp.embed_weight}
        loss = hp.task_weight * task_loss + sum(weights[name] * term for name, term in terms.items())
        self.log_dict({f"train/{name}_loss": term for name, term in terms.items()})
        self.log("train/task_loss", task_loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss


_ARGS_DOC = """
        teacher: the teacher's timm model name (None with a ``visionzoo fit`` checkpoint, which rebuilds itself).
        teacher_checkpoint: its weights: a fit checkpoint, a ``.safetensors`` file, or an official release
            (mapped by its family's ``checkpoint_filter_fn``); None: ``teacher_kwargs`` decide
            (``pretrained: true`` for timm's published weights).
        teacher_kwargs: more arguments for ``timm.create_model`` of the teacher.
        temperature: softens both distributions in the logit term.
        task_weight: weight of the task's own loss.
        logit_weight: weight of the logit term (0: features only).
        feature_weight: weight of the feature-map term (0: none).
        feature_stages: the student's stages whose maps are distilled (None: all).
        embed_weight: weight of the patch-embedding alignment (0: none)."""


class DistillationTask(_Distillation, ClassificationTask):
    __doc__ = (
        """A classification student (:class:`ClassificationTask`'s arguments) trained against a frozen teacher.

    Args:"""
        + _ARGS_DOC
    )
    student_task = ClassificationTask

    def __init__(
        self,
        teacher: str | None = None,
        teacher_checkpoint: str | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        temperature: float = 4.0,
        task_weight: float = 0.5,
        logit_weight: float = 0.5,
        feature_weight: float = 0.0,
        feature_stages: list[int] | None = None,
        embed_weight: float = 0.0,
        **student: Any,
    ):
        super().__init__(**student)
        self._setup_distillation(self.hparams.num_classes, segmentation=False)


class SegmentationDistillationTask(_Distillation, SegmentationTask):
    __doc__ = (
        """A segmentation student (:class:`SegmentationTask`'s arguments) trained against a frozen teacher:
    the logit term per pixel (a segmenter teacher of the same classes), the feature term on the backbones' maps.

    Args:"""
        + _ARGS_DOC
    )
    student_task = SegmentationTask

    def __init__(
        self,
        teacher: str | None = None,
        teacher_checkpoint: str | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        temperature: float = 1.0,
        task_weight: float = 1.0,
        logit_weight: float = 1.0,
        feature_weight: float = 0.0,
        feature_stages: list[int] | None = None,
        embed_weight: float = 0.0,
        **student: Any,
    ):
        super().__init__(**student)
        self._setup_distillation(self.hparams.num_classes, segmentation=True)
