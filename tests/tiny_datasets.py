"""Test fixtures: tiny datasets written in the real on-disk formats, for the data, task and recipe tests.

Every image carries content that depends on its labels (a class-coloured shape over low noise), so a model
can learn from them. Each writer returns the paths a recipe's ``data:`` section needs.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "class_color",
    "write_ade20k",
    "write_coco",
    "write_garments_idx",
    "write_idx",
    "write_imagefolder",
    "write_voc",
]


def class_color(label: int) -> tuple[int, int, int]:
    """A distinct RGB colour per class."""
    rng = np.random.default_rng(1000 + label)
    return tuple(int(c) for c in rng.integers(40, 256, size=3))


def _noise(rng: np.random.Generator, height: int, width: int, channels: int = 3) -> np.ndarray:
    return rng.integers(0, 40, size=(height, width, channels), dtype=np.uint8)


def _class_image(rng: np.random.Generator, label: int, num_classes: int, height: int, width: int) -> np.ndarray:
    """Noise with a class-coloured square whose column also depends on the class."""
    image = _noise(rng, height, width)
    side = max(2, min(height, width) // 2)
    left = (width - side) * label // max(1, num_classes - 1)
    top = int(rng.integers(0, height - side + 1))
    image[top : top + side, left : left + side] = class_color(label)
    return image


def write_imagefolder(
    root: str | Path,
    num_classes: int = 3,
    per_class: int = 4,
    size: tuple[int, int] = (32, 32),
    splits: Sequence[str] = ("train", "val", "test"),
    seed: int = 0,
) -> Path:
    """``root/<split>/class_<k>/<n>.{png,jpg}``; every third image is stored grayscale and every fourth as
    RGBA, to exercise the conversion to RGB. Returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    height, width = size
    for split in splits:
        for label in range(num_classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                image = Image.fromarray(_class_image(rng, label, num_classes, height, width))
                if n % 3 == 2:
                    image.convert("L").save(folder / f"{n}.png")
                elif n % 4 == 3:
                    image.convert("RGBA").save(folder / f"{n}.png")
                else:
                    image.save(folder / f"{n}.jpg" if n % 2 else folder / f"{n}.png")
    return root


def _write_idx_file(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_idx(
    root: str | Path,
    train: int = 60,
    test: int = 20,
    size: int = 28,
    num_classes: int = 10,
    compress: bool = True,
    seed: int = 0,
) -> Path:
    """MNIST-format files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` of grayscale images with a
    class-dependent bright bar. Labels cycle through every class. Returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = np.arange(count) % num_classes
        images = rng.integers(0, 40, size=(count, size, size), dtype=np.uint8)
        for i, label in enumerate(labels):
            row = (size - 4) * int(label) // max(1, num_classes - 1)
            images[i, row : row + 4, 2:-2] = 200 + int(rng.integers(0, 56))
        _write_idx_file(root / f"{prefix}-images-idx3-ubyte", images, compress)
        _write_idx_file(root / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), compress)
    return root


def write_garments_idx(root: str | Path, train: int = 120, test: int = 30, num_classes: int = 10) -> Path:
    """Fashion-MNIST-like IDX files: a class-wide rectangle on a black background (a faint 1-pixel halo
    around it, a dark hole inside), each train image at its own brightness ``100 + i`` (mod 150) and every
    test image at 255, so a canvas's pixels tell which source images it used. Returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = np.arange(count) % num_classes
        images = np.zeros((count, 28, 28), np.uint8)
        for i, label in enumerate(labels):
            half = 3 + int(label)
            images[i, 3:25, 13 - half : 15 + half] = 5  # halo, under the garment threshold
            images[i, 4:24, 14 - half : 14 + half] = 255 if prefix == "t10k" else 100 + i % 150
            images[i, 12:14, 13:15] = 0  # a hole: part of the garment's mask
        _write_idx_file(root / f"{prefix}-images-idx3-ubyte", images, compress=True)
        _write_idx_file(root / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), compress=True)
    return root


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def write_coco(
    root: str | Path,
    images: int = 4,
    size: tuple[int, int] = (64, 80),
    num_classes: int = 2,
    with_masks: bool = True,
    seed: int = 0,
) -> dict[str, str]:
    """COCO detection/instance files for a ``train`` and a ``val`` split: ``root/images/{split}/*.jpg`` and
    ``root/annotations/instances_{split}.json``.

    Category ids are not contiguous (1, 3, 5, ...); each image but the last holds one or two class-coloured
    rectangles (polygon segmentations, the first object of the split as an RLE); the last image is empty;
    the first image also holds a crowd region (``iscrowd: 1``, RLE). Returns the ``DetectionData`` arguments
    (``root``, ``train_annotations``, ``train_images``, ``val_annotations``, ``val_images``).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    height, width = size
    categories = [{"id": 2 * k + 1, "name": f"class_{k}", "supercategory": "shape"} for k in range(num_classes)]
    paths = {"root": str(root)}
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        records, annotations = [], []
        for i in range(images):
            image = _noise(rng, height, width)
            file_name = f"{i:06d}.jpg"
            image_id = i + 1
            objects = [] if i == images - 1 else range(1 + i % 2)
            for k in objects:
                label = (i + k) % num_classes
                box_w, box_h = int(rng.integers(width // 5, width // 2)), int(rng.integers(height // 5, height // 2))
                x0 = int(rng.integers(0, width - box_w)) if k == 0 else width - box_w
                y0 = int(rng.integers(0, height - box_h))
                image[y0 : y0 + box_h, x0 : x0 + box_w] = class_color(label)
                annotation: dict[str, Any] = {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": categories[label]["id"],
                    "bbox": [x0, y0, box_w, box_h],
                    "area": box_w * box_h,
                    "iscrowd": 0,
                }
                if with_masks:
                    if not annotations:
                        mask = np.zeros((height, width), np.uint8)
                        mask[y0 : y0 + box_h, x0 : x0 + box_w] = 1
                        annotation["segmentation"] = _rle(mask)
                    else:
                        x1, y1 = x0 + box_w, y0 + box_h
                        annotation["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
                annotations.append(annotation)
            if i == 0:
                crowd = np.zeros((height, width), np.uint8)
                crowd[: height // 4, : width // 4] = 1
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": categories[0]["id"],
                        "bbox": [0, 0, width // 4, height // 4],
                        "area": int(crowd.sum()),
                        "iscrowd": 1,
                        "segmentation": _rle(crowd),
                    }
                )
            Image.fromarray(image).save(root / "images" / split / file_name, quality=95)
            records.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        document = {"images": records, "annotations": annotations, "categories": categories}
        annotation_file = root / "annotations" / f"instances_{split}.json"
        annotation_file.write_text(json.dumps(document))
        paths[f"{split}_annotations"] = f"annotations/instances_{split}.json"
        paths[f"{split}_images"] = f"images/{split}"
    return paths


def _label_map(rng: np.random.Generator, labels: Sequence[int], height: int, width: int) -> np.ndarray:
    """A map of ``labels[0]`` with a rectangle of each further label."""
    label_map = np.full((height, width), labels[0], np.uint8)
    for label in labels[1:]:
        h, w = int(rng.integers(height // 4, height // 2)), int(rng.integers(width // 4, width // 2))
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        label_map[y : y + h, x : x + w] = label
    return label_map


def _scene(rng: np.random.Generator, num_labels: int, size: tuple[int, int]) -> tuple[np.ndarray, Image.Image]:
    """A label map of background 0 with rectangles of two labels out of ``1..num_labels - 1``, and its image
    painted with each label's colour over noise."""
    labels = [0, *(int(v) for v in rng.choice(np.arange(1, num_labels), size=2, replace=False))]
    label_map = _label_map(rng, labels, *size)
    image = _noise(rng, *label_map.shape)
    for label in np.unique(label_map):
        image[label_map == label] = class_color(int(label))
    return label_map, Image.fromarray(image)


def write_ade20k(
    root: str | Path,
    images: int = 4,
    size: tuple[int, int] = (64, 64),
    num_classes: int = 150,
    seed: int = 0,
) -> Path:
    """ADEChallengeData2016 layout: ``images/{training,validation}/ADE_*.jpg`` and
    ``annotations/{training,validation}/ADE_*.png`` (0 = other, 1..num_classes). Returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, prefix in (("training", "ADE_train"), ("validation", "ADE_val")):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(images):
            label_map, image = _scene(rng, num_classes + 1, size)
            name = f"{prefix}_{i + 1:08d}"
            image.save(root / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(label_map).save(root / "annotations" / split / f"{name}.png")
    return root


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved label index), 256 RGB triplets flattened."""
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def write_voc(
    root: str | Path,
    images: int = 4,
    size: tuple[int, int] = (64, 64),
    num_classes: int = 21,
    seed: int = 0,
) -> Path:
    """PASCAL VOC layout: ``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` (palette PNGs, 0 = background,
    255 = object borders / ignore) and ``ImageSets/Segmentation/{train,val}.txt``. Returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    for split in ("train", "val"):
        names = []
        for i in range(images):
            name = f"2007_{split}_{i:06d}"
            label_map, image = _scene(rng, num_classes, size)
            image.save(root / "JPEGImages" / f"{name}.jpg", quality=95)
            border = label_map.copy()
            border[1:-1, 1:-1][np.diff(label_map, axis=1)[1:-1, 1:] != 0] = 255
            mask = Image.frombytes("P", (border.shape[1], border.shape[0]), border.tobytes())
            mask.putpalette(palette)
            mask.save(root / "SegmentationClass" / f"{name}.png")
            names.append(name)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root
