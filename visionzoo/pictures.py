"""Pictures of a task's test predictions: labels on classified images, boxes and labels on detections,
class-coloured masks beside the ground truth for segmentation.

``PredictionsPicture`` (a Lightning callback that ``visionzoo fit|test`` adds) draws the first images of the
test split at the end of testing into ``test_predictions.png`` beside the CSV log.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from PIL import Image, ImageDraw

__all__ = ["PredictionsPicture", "class_colours", "draw_classification", "draw_detections", "draw_segmentation"]

CORRECT, WRONG = (40, 200, 80), (230, 50, 50)


def class_colours(num_classes: int) -> np.ndarray:
    """uint8 (num_classes, 3): black for label 0 (a scene's background), distinct colours after (tab20's up to
    21 classes, hues spread around the colour wheel beyond)."""
    import matplotlib

    table = matplotlib.colormaps["tab20" if num_classes <= 21 else "hsv"].resampled(max(num_classes - 1, 1))
    hues = [table(i)[:3] for i in range(max(num_classes - 1, 1))]
    return (np.array([(0, 0, 0), *hues][:num_classes]) * 255).astype(np.uint8)


def find_csv_logger(trainer: Trainer) -> CSVLogger | None:
    """The run's CSV logger (beside whose ``metrics.csv`` the pictures go), if it has one."""
    return next((logger for logger in trainer.loggers if isinstance(logger, CSVLogger)), None)


def to_uint8(image: torch.Tensor, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> np.ndarray:
    """A (3, H, W) image tensor, normalised by ``mean``/``std``, as uint8 (H, W, 3)."""
    pixels = image.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def _upscaled(image: np.ndarray, side: int) -> Image.Image:
    """At least ``side`` pixels on the short side (nearest neighbour: the pixels stay visible)."""
    factor = max(1, round(side / min(image.shape[:2])))
    return Image.fromarray(image).resize((image.shape[1] * factor, image.shape[0] * factor), Image.NEAREST)


def draw_classification(image: np.ndarray, predicted: str, truth: str, side: int = 128) -> Image.Image:
    """The image framed and captioned with the predicted class: green when it is the true one, red (with the
    truth under it) when not."""
    picture = _upscaled(image, side)
    right = predicted == truth
    colour = CORRECT if right else WRONG
    canvas = Image.new("RGB", (picture.width + 6, picture.height + 32), "white")
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, picture.width + 5, picture.height + 5), fill=colour)
    canvas.paste(picture, (3, 3))
    draw.text((3, picture.height + 7), predicted, fill=colour)
    if not right:
        draw.text((3, picture.height + 19), f"true: {truth}", fill=(90, 90, 90))
    return canvas


def draw_detections(
    image: np.ndarray,
    detections: dict[str, torch.Tensor],
    names: list[str],
    threshold: float = 0.5,
    overlap: float = 0.6,
    side: int = 256,
) -> Image.Image:
    """Boxes scoring at least ``threshold`` with their class and score, a colour per class. A box that overlaps
    a higher-scoring one of any class by more than ``overlap`` (IoU) is left out: the detector's own NMS is per
    class, which leaves a garment's second-guess classes on the picture."""
    from torchvision.ops import nms

    picture = _upscaled(image, side)
    scale = picture.width / image.shape[1]
    colours = class_colours(len(names))
    draw = ImageDraw.Draw(picture)
    boxes, scores = detections["boxes"].float(), detections["scores"].float()
    keep = nms(boxes, scores, overlap)
    keep = keep[scores[keep] >= threshold]
    for box, label, score in zip(boxes[keep], detections["labels"][keep], scores[keep]):
        x0, y0, x1, y1 = (float(v) * scale for v in box)
        colour = tuple(int(c) for c in colours[int(label)])
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        draw.text((x0 + 2, max(y0 - 11, 0)), f"{names[int(label)]} {float(score):.2f}", fill=colour)
    return picture


def draw_segmentation(image: np.ndarray, predicted: np.ndarray, truth: np.ndarray, num_classes: int, side: int = 192):
    """Image, prediction and ground truth side by side, the maps coloured by class (ignored pixels grey)."""
    colours = np.vstack([class_colours(num_classes), np.full((256 - num_classes, 3), 128, np.uint8)])
    panels = [_upscaled(image, side), _upscaled(colours[predicted], side), _upscaled(colours[truth], side)]
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 8, panels[0].height), "white")
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * (panel.width + 4), 0))
    return canvas


def grid(pictures: list[Image.Image], columns: int) -> Image.Image:
    columns = min(columns, len(pictures))
    width, height = max(p.width for p in pictures), max(p.height for p in pictures)
    rows = -(-len(pictures) // columns)
    canvas = Image.new("RGB", (columns * (width + 6), rows * (height + 6)), "white")
    for i, picture in enumerate(pictures):
        canvas.paste(picture, ((i % columns) * (width + 6), (i // columns) * (height + 6)))
    return canvas


def with_legend(picture: Image.Image, names: list[str], colours: np.ndarray) -> Image.Image:
    """``picture`` above a key of the class colours."""
    per_row = max(1, picture.width // 150)
    rows = -(-len(names) // per_row)
    canvas = Image.new("RGB", (picture.width, picture.height + 16 * rows + 4), "white")
    canvas.paste(picture)
    draw = ImageDraw.Draw(canvas)
    for i, (name, colour) in enumerate(zip(names, colours)):
        x, y = (i % per_row) * 150 + 2, picture.height + 4 + (i // per_row) * 16
        draw.rectangle((x, y, x + 12, y + 12), fill=tuple(int(c) for c in colour), outline=(90, 90, 90))
        draw.text((x + 16, y), name, fill=(0, 0, 0))
    return canvas


@torch.no_grad()
def draw_predictions(task: LightningModule, batch, data, count: int) -> Image.Image:
    """The first ``count`` images of ``batch`` with ``task``'s predictions, drawn for its kind of task."""
    from visionzoo.data.segmentation import to_label_size
    from visionzoo.tasks import ClassificationTask, DetectionTask, SegmentationTask

    config = data.data_config
    names = list(data.class_names)
    task.eval()
    if isinstance(task, DetectionTask):
        images = [image.to(task.device) for image in batch[0][:count]]
        outputs = task(images)
        return grid([draw_detections(to_uint8(i), o, names) for i, o in zip(images, outputs)], columns=4)
    images = batch[0][:count].to(task.device)
    if isinstance(task, SegmentationTask):
        logits = task(images)
        boxes = batch[2] if len(batch) == 3 else [None] * len(images)
        pictures = []
        for image, image_logits, truth, box in zip(images, logits, batch[1], boxes):
            if box is not None:  # the label at its stored size: the image and logits brought to it
                image, image_logits = (to_label_size(maps, box, truth.shape) for maps in (image, image_logits))
            predicted = image_logits.argmax(0).byte().cpu().numpy()
            picture = draw_segmentation(
                to_uint8(image, config.mean, config.std), predicted, truth.byte().cpu().numpy(), len(names)
            )
            pictures.append(picture)
        return with_legend(grid(pictures, columns=2), names, class_colours(len(names)))
    if isinstance(task, ClassificationTask):
        predicted = task(images).argmax(-1).tolist()
        pictures = [
            draw_classification(to_uint8(image, config.mean, config.std), names[p], names[int(t)])
            for image, p, t in zip(images, predicted, batch[1])
        ]
        return grid(pictures, columns=8)
    raise TypeError(f"no picture for the task {type(task).__name__}")


class PredictionsPicture(Callback):
    """At the end of ``test``, ``test_predictions.png`` beside the CSV log: the first ``count`` images of the
    first test batch with the model's predictions (the EMA weights when there are any)."""

    def __init__(self, count: int = 16):
        self.count = count

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger, data = find_csv_logger(trainer), trainer.datamodule
        if logger is None or not trainer.is_global_zero or not hasattr(data, "data_config"):
            return
        batch = next(iter(data.test_dataloader()))
        out = Path(logger.log_dir) / "test_predictions.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        draw_predictions(pl_module, batch, data, self.count).save(out)
        print(f"test predictions: {out}")
