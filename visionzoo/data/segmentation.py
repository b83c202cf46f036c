"""Semantic segmentation data from image + label-PNG folders in the ADE20K or PASCAL VOC layout.

Batches are ``(images, masks)``: float (B, 3, H, W) normalised with the model's mean/std, int64 (B, H, W)
with ``ignore_index`` where there is no label (padding included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .base import Split, VisionDataModule, load_rgb
from .transforms import Pipeline, build_pipeline

__all__ = ["ADE20K_CLASSES", "VOC_CLASSES", "PadCollate", "SegmentationData", "SegmentationDataset", "to_label_size"]

# the 150 classes of the ADE20K scene-parsing benchmark (SceneParsing objectInfo150), label 1..150 on disk
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]  # fmt: skip
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
LAYOUTS = {
    "ade20k": "expected root/images/{training,validation}/*.jpg and root/annotations/{training,validation}/*.png",
    "voc": "expected root/JPEGImages/*.jpg, root/SegmentationClass/*.png and "
    "root/ImageSets/Segmentation/{train,val}.txt",
}
ADE20K_SPLITS = {"train": "training", "val": "validation", "test": "testing"}


class PadCollate:
    """Stack (image, mask) pairs of different sizes: pad each to the batch's largest height and width at the
    bottom/right, images with 0 and masks with ``ignore_index`` (so padding counts nowhere). Samples at the
    label's size, (image, original mask, content box), keep their masks as a list and stack the boxes."""

    def __init__(self, ignore_index: int):
        self.ignore_index = ignore_index

    def __call__(self, batch: list[tuple[torch.Tensor, ...]]) -> tuple:
        height = max(sample[0].shape[-2] for sample in batch)
        width = max(sample[0].shape[-1] for sample in batch)
        images = torch.zeros(len(batch), batch[0][0].shape[0], height, width, dtype=batch[0][0].dtype)
        for i, sample in enumerate(batch):
            images[i, :, : sample[0].shape[-2], : sample[0].shape[-1]] = sample[0]
        if len(batch[0]) == 3:
            return images, [sample[1] for sample in batch], torch.stack([sample[2] for sample in batch])
        masks = torch.full((len(batch), height, width), self.ignore_index, dtype=torch.int64)
        for i, (_, mask) in enumerate(batch):
            masks[i, : mask.shape[-2], : mask.shape[-1]] = mask
        return images, masks


def content_box(content: torch.Tensor) -> torch.Tensor:
    """``(top, left, bottom, right)`` of the true pixels of ``content``: where a transformed image's content lies."""
    rows, cols = content.any(1).nonzero().flatten(), content.any(0).nonzero().flatten()
    if len(rows) == 0:
        raise ValueError("the eval transforms leave nothing of the image (a crop outside it?)")
    return torch.stack([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1])


def to_label_size(maps: torch.Tensor, box: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) maps of a transformed image (logits, or the image) cropped to its content ``box`` and resized
    bilinearly to the stored label's ``size``, as mmsegmentation scores a prediction."""
    top, left, bottom, right = box.tolist()
    content = maps[None, :, top:bottom, left:right]
    return torch.nn.functional.interpolate(content, size=tuple(size), mode="bilinear", align_corners=False)[0]


class SegmentationDataset(Dataset):
    """(image, label PNG) pairs; ``label_table`` maps stored values to training labels (uint8 lookup)."""

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        transform: Pipeline,
        label_table: np.ndarray,
        num_classes: int,
        ignore_index: int,
        at_label_size: bool = False,
    ):
        self.pairs, self.transform, self.label_table = pairs, transform, label_table
        self.num_classes, self.ignore_index, self.at_label_size = num_classes, ignore_index, at_label_size

    def __len__(self) -> int:
        return len(self.pairs)

    def load_mask(self, path: Path) -> np.ndarray:
        if not path.is_file():
            raise FileNotFoundError(f"SegmentationDataset: label file {str(path)!r} does not exist")
        with Image.open(path) as image:
            if image.mode not in ("L", "P"):
                raise ValueError(f"{path}: a label PNG must be single-channel (mode L or P), got mode {image.mode}")
            mask = self.label_table[np.asarray(image)]
        bad = (mask >= self.num_classes) & (mask != self.ignore_index)
        if bad.any():
            raise ValueError(
                f"{path}: label value {int(mask[bad].max())} is out of range for {self.num_classes} classes "
                f"(ignore_index {self.ignore_index}); check num_classes and layout"
            )
        return mask

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[i]
        image, mask = load_rgb(image_path), self.load_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise ValueError(f"{mask_path}: mask size {mask.shape} differs from image size {image.shape[:2]}")
        if not self.at_label_size:
            out = self.transform(image=image, mask=mask)
            return out["image"], out["mask"].long()
        # the image alone is transformed; a mask of ones marks where its content lands (padding is not 1)
        out = self.transform(image=image, mask=np.ones_like(mask))
        return out["image"], torch.from_numpy(mask).long(), content_box(out["mask"] == 1)


class SegmentationData(VisionDataModule):
    """Semantic segmentation from the ADE20K or the VOC layout.

    ``ade20k``: label 0 ("other") becomes ``ignore_index`` and the others shift down by one (mmseg's
    ``reduce_zero_label``), 150 classes; with ``reduce_zero_label=False`` the stored values are the labels
    (0 a class of its own, e.g. the background of ``visionzoo data fashion-scenes``). ``voc``: palette PNGs
    whose indices are the labels, 255 ignored, 21 classes. A stored value that maps to neither a class nor
    ``ignore_index`` raises a ValueError naming the file.

    Default pipelines at ``image_size`` (H, W): train: short side to min(H, W), random rescale x0.5-2.0, pad
    (label ``ignore_index``), random crop H x W, horizontal flip; eval: long side to max(H, W) and pad to
    H x W. Batches of different sizes (e.g. a short-side-only eval resize) are padded to the largest, with
    ``ignore_index`` in the masks, so padding counts nowhere.

    Args:
        layout: ``ade20k`` or ``voc``.
        num_classes: None: the layout's (150 / 21).
        reduce_zero_label: None: the layout's (``ade20k`` True, ``voc`` False).
        class_names: names of the labels 0..num_classes-1; None: the layout's (``class_i`` past them).
        ignore_index: label of unlabelled pixels, 0..255.
        eval_at_label_size: val and test batches keep each label at its stored size, ``(images, [masks],
            boxes)`` with the box of each image's content in the transformed image, so that the task scores
            its prediction resized to the label, as mmsegmentation evaluates; False: labels transformed with
            the images.
        **kwargs: see :class:`~visionzoo.data.base.VisionDataModule`.
    """

    default_batch_size = 8
    default_predict_split = "val"

    def __init__(
        self,
        root: str,
        layout: Literal["ade20k", "voc"] = "ade20k",
        num_classes: int | None = None,
        ignore_index: int = 255,
        eval_at_label_size: bool = True,
        reduce_zero_label: bool | None = None,
        class_names: list[str] | None = None,
        **kwargs: Any,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        if not 0 <= ignore_index <= 255:
            raise ValueError(f"ignore_index must be in 0..255 (masks are uint8 in the pipeline), got {ignore_index}")
        self.layout = LAYOUTS[layout]
        super().__init__(root, **kwargs)
        self.save_hyperparameters(ignore=["num_classes"])  # the task logs the resolved count
        self.layout_name = layout
        self.ignore_index, self.eval_at_label_size = ignore_index, eval_at_label_size
        self.reduce_zero_label = layout == "ade20k" if reduce_zero_label is None else reduce_zero_label
        names = class_names or (ADE20K_CLASSES if layout == "ade20k" else VOC_CLASSES)
        if num_classes is None and class_names:
            num_classes = len(class_names)
        self.num_classes = len(names) if num_classes is None else num_classes
        if not 1 <= self.num_classes <= 255:
            raise ValueError(f"num_classes must be in 1..255, got {self.num_classes}")
        if self.num_classes > ignore_index:
            raise ValueError(f"ignore_index {ignore_index} collides with a class (num_classes {self.num_classes})")
        self.class_names = [
            names[i] if i < len(names) and self.num_classes <= len(names) else f"class_{i}"
            for i in range(self.num_classes)
        ]
        if not self._split_pairs_root("train").exists():
            raise FileNotFoundError(f"SegmentationData: no train split in {str(self.root)!r}; {self.layout}")

    def label_table(self) -> np.ndarray:
        """Stored value -> label: shifted down by one with 0 -> ignore under ``reduce_zero_label``, else kept."""
        table = np.arange(256, dtype=np.int64)
        if self.reduce_zero_label:
            table = table - 1
            table[0] = self.ignore_index
        return table.astype(np.uint8)

    def _split_pairs_root(self, split: Split) -> Path:
        if self.layout_name == "ade20k":
            return self.root / "images" / ADE20K_SPLITS[split]
        return self.root / "ImageSets" / "Segmentation" / f"{split}.txt"

    def pairs(self, split: Split) -> list[tuple[Path, Path]]:
        source = self._split_pairs_root(split)
        if not source.exists():
            raise ValueError(f"SegmentationData: no {split} split ({str(source)!r} is missing); {self.layout}")
        if self.layout_name == "ade20k":
            images = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            labels = self.root / "annotations" / ADE20K_SPLITS[split]
            return [(p, labels / f"{p.stem}.png") for p in images]
        names = [line.strip() for line in source.read_text().splitlines() if line.strip()]
        return [(self.root / "JPEGImages" / f"{n}.jpg", self.root / "SegmentationClass" / f"{n}.png") for n in names]

    def transform(self, train: bool) -> Pipeline:
        height, width = self.data_config.input_size
        interpolation = self.data_config.cv2_interpolation
        pad = dict(border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=self.ignore_index)
        if train:
            default = [
                A.SmallestMaxSize(max_size=min(height, width), interpolation=interpolation),
                A.RandomScale(scale_limit=(-0.5, 1.0), interpolation=interpolation, p=1.0),
                A.PadIfNeeded(min_height=height, min_width=width, position="top_left", **pad),
                A.RandomCrop(height, width),
                A.HorizontalFlip(p=0.5),
            ]
            return build_pipeline(self.train_transforms, default, self.data_config)
        default = [
            A.LongestMaxSize(max_size=max(height, width), interpolation=interpolation),
            A.PadIfNeeded(min_height=height, min_width=width, position="top_left", **pad),
        ]
        return build_pipeline(self.eval_transforms, default, self.data_config)

    def collate_fn(self) -> PadCollate:
        return PadCollate(self.ignore_index)

    def build_dataset(self, split: Split) -> Dataset:
        return SegmentationDataset(
            self.pairs(split),
            self.transform(train=split == "train"),
            self.label_table(),
            self.num_classes,
            self.ignore_index,
            at_label_size=self.eval_at_label_size and split != "train",
        )
