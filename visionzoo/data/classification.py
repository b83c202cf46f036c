"""Image classification data: ImageFolder trees and IDX (MNIST / Fashion-MNIST) files.

Batches are ``(images, labels)``: float (B, 3, H, W) normalised with the model's mean/std, int64 (B,).
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import albumentations as A
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .base import Split, VisionDataModule, load_rgb
from .transforms import Pipeline, build_pipeline, eval_resize

__all__ = ["FASHION_MNIST_CLASSES", "ClassificationData", "find_idx_file", "read_idx"]

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type byte -> numpy dtype (big-endian, as the format stores multi-byte values)
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or not): 2 zero bytes, a type byte, the number of dims, then each dim as a
    big-endian int32, then the data. Raises ValueError on a bad header or a truncated file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:  # a truncated .gz fails while decompressing
        raise ValueError(f"{path}: cannot read the IDX file ({err})") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES or data[3] == 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, {ndim} dims need {header})")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        state = "truncated" if found < expected else "too long"
        raise ValueError(f"{path}: {state} IDX file: shape {shape} needs {expected} data bytes, found {found}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx_file(root: Path, stem: str) -> Path | None:
    """``stem`` or ``stem.gz`` under ``root`` (also the ``t10k-images.idx3-ubyte`` spelling some mirrors use)."""
    for name in (stem, stem.replace("-idx", ".idx")):
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


class ArrayDataset(Dataset):
    """Images already in memory as uint8 (N, H, W) or (N, H, W, 3); grayscale is replicated to 3 channels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, transform: Pipeline):
        self.images, self.labels, self.indices, self.transform = images, labels, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        index = self.indices[i]
        image = self.images[index]
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        return self.transform(image=image)["image"], int(self.labels[index])


class FileDataset(Dataset):
    """Image files decoded on access, converted to RGB."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Pipeline):
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(image=load_rgb(path))["image"], label


def image_extensions() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()}


class ClassificationData(VisionDataModule):
    """Classification from an ImageFolder tree or IDX files.

    Layouts:
        ``imagefolder``: ``root/train/<class>/*.<any PIL extension>``, optional ``root/val/<class>/*`` and
        ``root/test/<class>/*``; classes are the sorted folder names of ``train``.
        ``idx``: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
        ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``); t10k is the test split. Arrays are decoded once
        and kept in memory. Class names are Fashion-MNIST's when the root's path says "fashion", else digits.

    Without a ``val`` split on disk, a seeded ``val_fraction`` of train is held out (0 means no val split).

    Args:
        format: ``imagefolder`` or ``idx``.
        val_fraction: share of train held out for validation when there is no val split on disk.
        seed: seed of that hold-out.
        **kwargs: see :class:`~visionzoo.data.base.VisionDataModule`.
    """

    def __init__(
        self,
        root: str,
        format: Literal["imagefolder", "idx"] = "imagefolder",
        val_fraction: float = 0.1,
        seed: int = 0,
        **kwargs: Any,
    ):
        if format not in ("imagefolder", "idx"):
            raise ValueError(f"format must be 'imagefolder' or 'idx', got {format!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.layout = (
            "expected IDX files train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]"
            if format == "idx"
            else "expected an ImageFolder tree root/train/<class>/<image>, optional root/val/ and root/test/"
        )
        super().__init__(root, **kwargs)
        self.save_hyperparameters()
        self.format = format
        self.val_fraction = val_fraction
        self.seed = seed
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if format == "idx":
            labels = self._idx_labels("train")
            self.num_classes = int(labels.max()) + 1
            if "fashion" in str(self.root.resolve()).lower() and self.num_classes == len(FASHION_MNIST_CLASSES):
                self.class_names = list(FASHION_MNIST_CLASSES)
            else:
                self.class_names = [str(i) for i in range(self.num_classes)]
        else:
            train = self.root / "train"
            classes = sorted(p.name for p in train.iterdir() if p.is_dir()) if train.is_dir() else []
            if not classes:
                raise FileNotFoundError(f"ClassificationData: no class folders in {str(train)!r}; {self.layout}")
            self.class_names = classes
            self.num_classes = len(classes)

    # IDX

    def _idx_path(self, split: str, kind: int) -> Path:
        stem = IDX_FILES[split][kind]
        path = find_idx_file(self.root, stem)
        if path is None:
            raise FileNotFoundError(f"ClassificationData: {stem}[.gz] not found in {str(self.root)!r}; {self.layout}")
        return path

    def _idx_labels(self, split: str) -> np.ndarray:
        labels = read_idx(self._idx_path(split, 1))
        if labels.ndim != 1:
            raise ValueError(f"{self._idx_path(split, 1)}: labels must be 1-D, got shape {labels.shape}")
        return labels.astype(np.int64)

    def _idx_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in self._arrays:
            images_path = self._idx_path(split, 0)
            images = read_idx(images_path)
            labels = self._idx_labels(split)
            if images.ndim not in (3, 4) or images.dtype != np.uint8:
                raise ValueError(
                    f"{images_path}: expected uint8 images (N, H, W[, 3]), got {images.dtype} {images.shape}"
                )
            if len(images) != len(labels):
                raise ValueError(f"{images_path}: {len(images)} images but {len(labels)} labels")
            self._arrays[split] = (images, labels)
        return self._arrays[split]

    # ImageFolder

    def _folder_samples(self, split: str) -> list[tuple[Path, int]]:
        folder = self.root / split
        extensions = image_extensions()
        index = {name: i for i, name in enumerate(self.class_names)}
        samples = []
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            if class_dir.name not in index:
                raise ValueError(
                    f"ClassificationData: class folder {str(class_dir)!r} is not one of the train classes "
                    f"{self.class_names}"
                )
            files = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in extensions)
            samples.extend((p, index[class_dir.name]) for p in files)
        return samples

    # splits

    def _has_split(self, split: str) -> bool:
        if self.format == "idx":
            return split in IDX_FILES and find_idx_file(self.root, IDX_FILES[split][0]) is not None
        return (self.root / split).is_dir()

    def _train_val_indices(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Train and held-out val indices of the on-disk train split (all of it when val exists on disk)."""
        if self._has_split("val") or self.val_fraction == 0:
            return np.arange(count), np.arange(0)
        order = np.random.default_rng(self.seed).permutation(count)
        num_val = max(1, round(count * self.val_fraction))
        return np.sort(order[num_val:]), np.sort(order[:num_val])

    def transform(self, train: bool) -> Pipeline:
        config = self.data_config
        if train:
            default = [
                A.RandomResizedCrop(size=config.input_size, interpolation=config.cv2_interpolation),
                A.HorizontalFlip(p=0.5),
            ]
            return build_pipeline(self.train_transforms, default, config)
        return build_pipeline(self.eval_transforms, eval_resize(config), config)

    def build_dataset(self, split: Split) -> Dataset:
        held_out = split == "val" and not self._has_split("val")
        if held_out and self.val_fraction == 0:
            raise ValueError(
                f"ClassificationData: no val split under {str(self.root)!r} and val_fraction is 0 "
                "(fit and validate need one: set val_fraction above 0 or add a val split)"
            )
        source = "train" if split == "train" or held_out else split
        if not self._has_split(source):
            raise ValueError(f"ClassificationData: no {split} split under {str(self.root)!r}; {self.layout}")
        transform = self.transform(train=split == "train")
        if self.format == "idx":
            images, labels = self._idx_arrays(source)
            if source == "train":
                train_idx, val_idx = self._train_val_indices(len(labels))
                indices = train_idx if split == "train" else val_idx
            else:
                indices = np.arange(len(labels))
            if len(labels) and labels.max() >= self.num_classes:
                raise ValueError(
                    f"ClassificationData: {split} labels go up to {labels.max()}, "
                    f"but train has {self.num_classes} classes"
                )
            return ArrayDataset(images, labels, indices, transform)
        samples = self._folder_samples(source)
        if source == "train":
            train_idx, val_idx = self._train_val_indices(len(samples))
            samples = [samples[i] for i in (train_idx if split == "train" else val_idx)]
        return FileDataset(samples, transform)
