"""Fashion-MNIST scenes: several real garment images per canvas, written as COCO and ADE20K-style datasets.

``write_fashion_scenes(source, out)`` pastes 2-5 Fashion-MNIST garments (random scale, position and flip,
later ones partly covering earlier ones) on a dim, noisy canvas and writes, under ``out``:

- ``images/{training,validation,testing}/NNNNNN.png``: the canvases (greyscale; the loaders read them as RGB);
- ``annotations/{training,validation,testing}/NNNNNN.png``: label PNGs, 0 the background and 1..10 the
  Fashion-MNIST classes (``SegmentationData(layout="ade20k", reduce_zero_label=False)``: 11 classes);
- ``annotations/instances_{training,validation,testing}.json``: COCO instances, category ids 1..10, each
  garment's visible pixels as an RLE ``segmentation``, its tight ``bbox`` and ``area`` (``DetectionData``).

A garment's mask is its pixels above :data:`GARMENT_THRESHOLD` with the holes filled. Garments covered
below half of their area by later ones are not placed. Training and validation canvases draw from
disjoint parts of the Fashion-MNIST train split, testing canvases from its test split; the whole dataset
is a function of ``seed`` and the counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .classification import FASHION_MNIST_CLASSES, IDX_FILES, find_idx_file, read_idx

__all__ = ["GARMENT_THRESHOLD", "SCENE_CLASSES", "SceneSpec", "garment_mask", "scene_baselines", "write_fashion_scenes"]

GARMENT_THRESHOLD = 12  # of 255: Fashion-MNIST's backgrounds are 0 with faint halos around the garments
BASELINE_THRESHOLD = 100  # of 255: above every canvas background (at most 90)
SCENE_CLASSES = ["background", *FASHION_MNIST_CLASSES]
SPLIT_DIRS = {"train": "training", "val": "validation", "test": "testing"}
VAL_SHARE = 0.1  # of the Fashion-MNIST train images, kept for the validation canvases (6,000)


@dataclass(frozen=True)
class SceneSpec:
    """How canvases are drawn: side in pixels, garments per canvas, garment side in pixels, and the least
    visible share of a garment once later ones cover it."""

    size: int = 128
    objects: tuple[int, int] = (2, 5)
    garment_size: tuple[int, int] = (28, 64)
    min_visible: float = 0.5
    attempts: int = 20


def garment_mask(image: np.ndarray) -> np.ndarray:
    """The garment's pixels of a uint8 (H, W) Fashion-MNIST image: above the threshold, holes filled."""
    mask = (image > GARMENT_THRESHOLD).astype(np.uint8)
    outside = np.pad(1 - mask, 1, constant_values=1)
    flood = np.zeros((outside.shape[0] + 2, outside.shape[1] + 2), np.uint8)
    cv2.floodFill(outside, flood, (0, 0), 2)
    return ((outside[1:-1, 1:-1] != 2) | mask.astype(bool)).astype(np.uint8)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dim canvas: a random grey level, a smooth gradient and pixel noise (never as bright as a garment)."""
    level = rng.uniform(0, 40)
    ramp = np.linspace(-1, 1, size)
    gradient = rng.uniform(-15, 15) * ramp[None, :] + rng.uniform(-15, 15) * ramp[:, None]
    noise = rng.normal(0, 6, (size, size))
    return np.clip(level + gradient + noise, 0, 90).astype(np.uint8)


def _canvas(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, pool: np.ndarray, spec: SceneSpec):
    """One canvas: the uint8 image, the label map and the instances (category id, visible mask)."""
    canvas = _background(rng, spec.size)
    owner = np.zeros((spec.size, spec.size), np.int32)  # instance index + 1 per pixel
    placed: list[tuple[int, int]] = []  # (category id, full area)
    for _ in range(int(rng.integers(spec.objects[0], spec.objects[1] + 1))):
        for _ in range(spec.attempts):
            index = int(pool[rng.integers(len(pool))])
            side = int(rng.integers(spec.garment_size[0], spec.garment_size[1] + 1))
            garment = cv2.resize(images[index], (side, side), interpolation=cv2.INTER_LINEAR)
            mask = cv2.resize(garment_mask(images[index]), (side, side), interpolation=cv2.INTER_NEAREST)
            if rng.random() < 0.5:
                garment, mask = garment[:, ::-1], mask[:, ::-1]
            top, left = (int(v) for v in rng.integers(0, spec.size - side + 1, 2))
            window = (slice(top, top + side), slice(left, left + side))
            covered = np.bincount(owner[window][mask.astype(bool)], minlength=len(placed) + 1)[1:]
            visible = np.bincount(owner.ravel(), minlength=len(placed) + 1)[1:] - covered
            if all(v >= spec.min_visible * area for v, (_, area) in zip(visible, placed)):
                break
        else:
            continue
        on = mask.astype(bool)
        canvas[window][on] = garment[on]
        owner[window][on] = len(placed) + 1
        placed.append((int(labels[index]) + 1, int(on.sum())))
    label_map = np.zeros_like(owner, np.uint8)
    instances = []
    for i, (category, _) in enumerate(placed, start=1):
        visible = owner == i
        label_map[visible] = category
        instances.append((category, visible))
    return canvas, label_map, instances


def _coco_annotation(mask: np.ndarray, category: int, image_id: int, annotation_id: int) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    rle["counts"] = rle["counts"].decode("ascii")
    return dict(
        id=annotation_id,
        image_id=image_id,
        category_id=category,
        bbox=[x, y, w, h],
        area=float(mask.sum()),
        iscrowd=0,
        segmentation=rle,
    )


def write_fashion_scenes(
    source: str | Path,
    out: str | Path,
    *,
    counts: dict[str, int] | None = None,
    seed: int = 0,
    spec: SceneSpec = SceneSpec(),
) -> dict[str, int]:
    """Write the scenes dataset (see the module docstring) from the Fashion-MNIST IDX files in ``source``.

    Args:
        counts: canvases per split, default ``{"train": 6000, "val": 500, "test": 1000}``.
        seed: every canvas follows from it (each split has its own stream, so changing one count leaves
            the other splits as they were).
    Returns:
        garments written per split.
    """
    source, out = Path(source), Path(out)
    counts = {"train": 6000, "val": 500, "test": 1000} if counts is None else counts
    if unknown := set(counts) - set(SPLIT_DIRS):
        raise ValueError(f"unknown splits {sorted(unknown)}; valid: {sorted(SPLIT_DIRS)}")
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"canvas counts must not be negative, got {counts}")
    arrays = {}
    for split, stems in IDX_FILES.items():
        files = [find_idx_file(source, stem) for stem in stems]
        if None in files:
            raise FileNotFoundError(
                f"fashion-scenes: no Fashion-MNIST {split} IDX files ({', '.join(stems)}, optionally .gz) in "
                f"{str(source)!r}"
            )
        arrays[split] = tuple(read_idx(f) for f in files)
    order = np.random.default_rng(seed).permutation(len(arrays["train"][1]))
    held_out = max(1, round(VAL_SHARE * len(order)))
    pools = {"train": order[held_out:], "val": order[:held_out], "test": np.arange(len(arrays["test"][1]))}
    streams = dict(zip(SPLIT_DIRS, np.random.SeedSequence(seed).spawn(len(SPLIT_DIRS))))
    categories = [dict(id=i, name=name, supercategory="garment") for i, name in enumerate(SCENE_CLASSES) if i]
    written = {}
    for split, count in counts.items():
        directory = SPLIT_DIRS[split]
        images, labels = arrays["test" if split == "test" else "train"]
        rng = np.random.default_rng(streams[split])
        for sub in ("images", "annotations"):
            (out / sub / directory).mkdir(parents=True, exist_ok=True)
        records, annotations = [], []
        for image_id in range(1, count + 1):
            canvas, label_map, instances = _canvas(rng, images, labels, pools[split], spec)
            name = f"{image_id:06d}.png"
            cv2.imwrite(str(out / "images" / directory / name), canvas)
            cv2.imwrite(str(out / "annotations" / directory / name), label_map)
            records.append(dict(id=image_id, file_name=name, height=spec.size, width=spec.size))
            for category, mask in instances:
                annotations.append(_coco_annotation(mask, category, image_id, len(annotations) + 1))
        document = dict(images=records, annotations=annotations, categories=categories)
        (out / "annotations" / f"instances_{directory}.json").write_text(json.dumps(document))
        written[split] = len(annotations)
    return written


def _threshold_components(image: np.ndarray, min_area: int = 40) -> list[np.ndarray]:
    """Masks of the bright connected blobs of a canvas: what a detector that knows no garment finds."""
    bright = cv2.morphologyEx((image > BASELINE_THRESHOLD).astype(np.uint8), cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    count, components = cv2.connectedComponents(bright)
    blobs = [components == i for i in range(1, count)]
    return [blob for blob in blobs if blob.sum() >= min_area]


def scene_baselines(root: str | Path, split: str = "test") -> dict[str, float]:
    """Scores of untrained rules on a written split, with the metrics the demo recipes report.

    - ``blob_box_map``: box mAP of the bright connected blobs, each called the train split's most frequent
      class with score 1 (localisation without recognition); ``blob_box_map_any_class``: the same with
      every class taken as one (how well the blobs alone find the garments);
    - ``background_miou``: mIoU of a map that is background everywhere (the most frequent pixel label);
    - ``blob_miou``: mIoU of the bright blobs labelled with the most frequent class, background elsewhere.
    """
    import torch

    from visionzoo.metrics import detection_map, segmentation_metrics

    root, directory = Path(root), SPLIT_DIRS[split]
    train = json.loads((root / "annotations" / "instances_training.json").read_text())
    common = int(np.bincount([a["category_id"] for a in train["annotations"]]).argmax())
    document = json.loads((root / "annotations" / f"instances_{directory}.json").read_text())
    truths: dict[int, list[dict]] = {record["id"]: [] for record in document["images"]}
    for annotation in document["annotations"]:
        truths[annotation["image_id"]].append(annotation)
    boxes, any_class = detection_map("bbox"), detection_map("bbox")
    background = segmentation_metrics(len(SCENE_CLASSES), ignore_index=None)
    blobs_seg = segmentation_metrics(len(SCENE_CLASSES), ignore_index=None)
    for record in document["images"]:
        image = cv2.imread(str(root / "images" / directory / record["file_name"]), cv2.IMREAD_GRAYSCALE)
        labels = cv2.imread(str(root / "annotations" / directory / record["file_name"]), cv2.IMREAD_GRAYSCALE)
        blobs = _threshold_components(image)
        predicted = [cv2.boundingRect(blob.astype(np.uint8)) for blob in blobs]
        xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in predicted], dtype=torch.float32).reshape(-1, 4)
        true_xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in truths[record["id"]])]
        true_boxes = torch.tensor(true_xyxy, dtype=torch.float32).reshape(-1, 4)
        true_labels = torch.tensor([a["category_id"] for a in truths[record["id"]]], dtype=torch.int64)
        found = dict(boxes=xyxy, scores=torch.ones(len(xyxy)), labels=torch.full((len(xyxy),), common))
        boxes.update([found], [dict(boxes=true_boxes, labels=true_labels)])
        any_class.update([found], [dict(boxes=true_boxes, labels=torch.full_like(true_labels, common))])
        target = torch.from_numpy(labels).long()[None]
        background.update(torch.zeros_like(target), target)
        blob_map = torch.zeros_like(target)
        for blob in blobs:
            blob_map[0][torch.from_numpy(blob)] = common
        blobs_seg.update(blob_map, target)
    return dict(
        blob_box_map=float(boxes.compute()["map"]),
        blob_box_map_any_class=float(any_class.compute()["map"]),
        background_miou=float(background.compute()["miou"]),
        blob_miou=float(blobs_seg.compute()["miou"]),
    )
