"""What every visionzoo data module shares: the model's input settings, splits built on demand, loaders."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from .transforms import DataConfig, resolve_data_config

warnings.filterwarnings("ignore", "'set_vital' is deprecated", UserWarning)  # torchdata 0.11 on torch 2.14

__all__ = ["Split", "VisionDataModule", "load_rgb"]

Split = Literal["train", "val", "test"]


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as a uint8 (H, W, 3) array; grayscale, palette and RGBA images converted to RGB."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class VisionDataModule(pl.LightningDataModule):
    """Base class: subclasses set ``num_classes``/``class_names`` in ``__init__`` and implement
    :meth:`build_dataset` (raising :class:`ValueError` for a split that does not exist).

    Args:
        root: the dataset's folder.
        model_name: a timm model whose pretrained cfg gives mean, std, input size and eval crop.
        image_size: input size (H, W) or a side; None: the model's.
        mean, std: override the model's normalisation.
        batch_size: samples per batch; None: the module's ``default_batch_size``.
        num_workers: loader processes (persistent when > 0).
        pin_memory: None: when CUDA is available.
        train_transforms, eval_transforms: albumentations pipelines as ``[{name: ..., **args}]``; None: the
            task's defaults. Normalisation and tensor conversion are appended by the module.
        predict_split: which split ``predict_dataloader`` serves; None: the module's ``default_predict_split``.
    """

    layout: str = ""
    default_batch_size: int = 32
    default_predict_split: Split = "test"

    def __init__(
        self,
        root: str,
        *,
        model_name: str | None = None,
        image_size: int | tuple[int, int] | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        train_transforms: list[dict[str, Any]] | None = None,
        eval_transforms: list[dict[str, Any]] | None = None,
        predict_split: Split | None = None,
    ):
        super().__init__()
        batch_size = self.default_batch_size if batch_size is None else batch_size
        predict_split = predict_split or self.default_predict_split
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"{type(self).__name__}: data root {str(self.root)!r} does not exist; {self.layout}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 or more, got {num_workers}")
        self.model_name = model_name
        self.data_config: DataConfig = resolve_data_config(model_name, image_size, mean, std)
        if min(self.data_config.input_size) < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if min(self.data_config.std) <= 0:
            raise ValueError(f"std must be positive (images are divided by it), got {std}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.train_transforms = train_transforms
        self.eval_transforms = eval_transforms
        self.predict_split = predict_split
        self.datasets: dict[str, Dataset] = {}
        self.num_classes: int = 0
        self.class_names: list[str] = []

    def build_dataset(self, split: Split) -> Dataset:
        raise NotImplementedError

    def collate_fn(self) -> Callable[[list[Any]], Any] | None:
        return None

    def dataset(self, split: Split) -> Dataset:
        """The dataset of ``split`` (built once); a clear error when the split is missing or empty."""
        if split not in self.datasets:
            dataset = self.build_dataset(split)
            if len(dataset) == 0:
                raise ValueError(f"{type(self).__name__}: the {split} split under {str(self.root)!r} is empty")
            self.datasets[split] = dataset
        return self.datasets[split]

    def setup(self, stage: str) -> None:
        splits: dict[str, tuple[Split, ...]] = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": (self.predict_split,),
        }
        for split in splits[stage]:
            self.dataset(split)

    def _loader(self, split: Split, train: bool = False) -> DataLoader:
        """The training loader is stateful: a checkpoint keeps its place in the epoch's order, so a run resumed
        mid-epoch sees the rest of that order (Lightning saves and restores the state)."""
        dataset = self.dataset(split)
        return (StatefulDataLoader if train else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=self.collate_fn(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_split)
