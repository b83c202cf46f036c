"""Object detection / instance segmentation data from COCO JSON files.

Batches are ``(images, targets)``, two lists as torchvision's detectors take them: images float (3, H, W)
in [0, 1] (not normalised: the detector's ``GeneralizedRCNNTransform`` normalises with the backbone's
mean/std and resizes), targets dicts with ``boxes`` float32 (N, 4) xyxy in pixels, ``labels`` int64 (N,),
``iscrowd`` int64 (N,), ``area`` float32 (N,), ``image_id`` int64 and, with masks, ``masks`` uint8 (N, H, W).

Label rule, one for every detector of ``create_detector``: COCO category ids are mapped in sorted order to
the contiguous labels 1..K and ``num_classes = K + 1``; label 0 is the background. The R-CNNs need exactly
that; RetinaNet and FCOS never see label 0 as a target and keep one unused logit, as torchvision's own COCO
RetinaNet/FCOS do (91 classes with 0 unused). ``label_to_category_id`` maps predictions back for COCO
evaluation.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from .base import Split, VisionDataModule, load_rgb
from .transforms import Pipeline, build_pipeline

__all__ = ["CocoDataset", "DetectionData", "collate_detection", "decode_segmentation"]


def decode_segmentation(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as a uint8 (H, W) mask."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        counts = segmentation["counts"]
        rle = {"size": segmentation["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(np.uint8)


def collate_detection(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list, list]:
    """Images and targets as two lists (images may differ in size)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class CocoDataset(Dataset):
    """The images of one COCO annotation file, empty ones included; crowd regions dropped when ``train``."""

    def __init__(
        self,
        annotation_file: Path,
        image_dir: Path,
        category_to_label: dict[int, int],
        transform: Pipeline,
        *,
        train: bool,
        with_masks: bool,
    ):
        document = json.loads(annotation_file.read_text())
        self.image_dir, self.transform = image_dir, transform
        self.train, self.with_masks = train, with_masks
        self.images = sorted(document.get("images", []), key=lambda record: record["id"])
        self.annotations: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for annotation in document.get("annotations", []):
            if annotation["category_id"] not in category_to_label:
                raise ValueError(
                    f"{annotation_file}: annotation {annotation.get('id')} has category_id "
                    f"{annotation['category_id']}, which is not among the train categories {sorted(category_to_label)}"
                )
            self.annotations[annotation["image_id"]].append(annotation)
        self.category_to_label = category_to_label

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record = self.images[i]
        path = self.image_dir / record["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"CocoDataset: image {str(path)!r} (image id {record['id']}) does not exist")
        image = load_rgb(path)
        height, width = image.shape[:2]
        objects = [
            a
            for a in self.annotations.get(record["id"], [])
            if a["bbox"][2] > 0 and a["bbox"][3] > 0 and not (self.train and a.get("iscrowd", 0))
        ]
        boxes = np.array([a["bbox"] for a in objects], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        objects, boxes = [a for a, k in zip(objects, keep) if k], boxes[keep]
        inputs: dict[str, Any] = dict(image=image, bboxes=boxes, indices=np.arange(len(objects)))
        if self.with_masks and objects:
            missing = [a.get("id") for a in objects if not a.get("segmentation")]
            if missing:
                raise ValueError(f"CocoDataset: with_masks, but annotations {missing} of {path.name} lack segmentation")
            inputs["masks"] = [decode_segmentation(a["segmentation"], height, width) for a in objects]
        out = self.transform(**inputs)
        image_t = out["image"]
        indices = np.asarray(out["indices"], dtype=np.int64)
        kept = [objects[j] for j in indices]
        target: dict[str, Any] = {
            "boxes": torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)),
            "labels": torch.tensor([self.category_to_label[a["category_id"]] for a in kept], dtype=torch.int64),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in kept], dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in kept], dtype=torch.float32),
            "image_id": torch.tensor(record["id"], dtype=torch.int64),
        }
        if self.with_masks:
            out_h, out_w = image_t.shape[-2:]
            masks = [np.asarray(out["masks"][j]) for j in indices] if objects else []
            stacked = np.stack(masks) if masks else np.zeros((0, out_h, out_w), np.uint8)
            target["masks"] = torch.as_tensor(stacked, dtype=torch.uint8)
        return image_t, target


class DetectionData(VisionDataModule):
    """COCO-format detection data (paths relative to ``root``); see the module docstring for the targets.

    ``image_size`` is not used by the default pipelines: torchvision's detectors resize every image
    themselves (``min_size``/``max_size`` of ``create_detector``). Defaults: train HorizontalFlip(p=0.5),
    eval nothing. Boxes are carried through the pipeline as ``pascal_voc`` (clipped; boxes under a pixel
    wide or high after it are dropped with their masks).

    Args:
        train_annotations, train_images: the train split's JSON file and image folder.
        val_annotations, val_images, test_annotations, test_images: optional further splits.
        with_masks: decode ``segmentation`` polygons / RLE into ``masks`` (Mask R-CNN).
        **kwargs: see :class:`~visionzoo.data.base.VisionDataModule`.
    """

    layout = "expected COCO JSON files and image folders at the annotation/image paths given (relative to root)"
    default_batch_size = 2

    def __init__(
        self,
        root: str,
        train_annotations: str,
        train_images: str,
        val_annotations: str | None = None,
        val_images: str | None = None,
        test_annotations: str | None = None,
        test_images: str | None = None,
        with_masks: bool = False,
        **kwargs: Any,
    ):
        super().__init__(root, **kwargs)
        self.save_hyperparameters()
        self.with_masks = with_masks
        self.splits: dict[str, tuple[str, str]] = {"train": (train_annotations, train_images)}
        optional = (("val", val_annotations, val_images), ("test", test_annotations, test_images))
        for split, annotation_path, image_path in optional:
            if (annotation_path is None) != (image_path is None):
                raise ValueError(f"DetectionData: give both {split}_annotations and {split}_images, or neither")
            if annotation_path is not None:
                self.splits[split] = (annotation_path, image_path)
        train_file = self._path(train_annotations, "train_annotations")
        categories = sorted(json.loads(train_file.read_text()).get("categories", []), key=lambda c: c["id"])
        if not categories:
            raise ValueError(f"DetectionData: {str(train_file)!r} lists no categories")
        self.category_ids: list[int] = [c["id"] for c in categories]
        self.class_names = ["__background__", *(c["name"] for c in categories)]
        self.num_classes = len(categories) + 1

    @property
    def label_to_category_id(self) -> dict[int, int]:
        """Contiguous label (1..K) -> COCO category id, for COCO-style evaluation."""
        return {label: cid for label, cid in enumerate(self.category_ids, start=1)}

    def annotation_file(self, split: Split) -> Path:
        """The JSON file of ``split`` (for pycocotools' ``COCO``/``COCOeval``)."""
        if split not in self.splits:
            raise ValueError(f"DetectionData: no {split} split (give {split}_annotations and {split}_images)")
        return self._path(self.splits[split][0], f"{split}_annotations")

    def _path(self, relative: str, argument: str) -> Path:
        path = self.root / relative
        if not path.exists():
            raise FileNotFoundError(f"DetectionData: {argument} {str(path)!r} does not exist; {self.layout}")
        return path

    def transform(self, train: bool) -> Pipeline:
        bbox_params = A.BboxParams(
            format="pascal_voc",
            label_fields=["indices"],
            clip=True,
            filter_invalid_bboxes=True,
            min_width=1,
            min_height=1,
        )
        specs, default = (self.train_transforms, [A.HorizontalFlip(p=0.5)]) if train else (self.eval_transforms, [])
        return build_pipeline(specs, default, self.data_config, normalize=False, bbox_params=bbox_params)

    def collate_fn(self):
        return collate_detection

    def build_dataset(self, split: Split) -> Dataset:
        annotation_file = self.annotation_file(split)
        image_dir = self._path(self.splits[split][1], f"{split}_images")
        return CocoDataset(
            annotation_file,
            image_dir,
            {cid: label for label, cid in self.label_to_category_id.items()},
            self.transform(train=split == "train"),
            train=split == "train",
            with_masks=self.with_masks,
        )
