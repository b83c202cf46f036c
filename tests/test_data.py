"""Data modules on tiny datasets written in the real on-disk formats (tests/tiny_datasets.py)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionzoo.data import (
    ADE20K_CLASSES,
    FASHION_MNIST_CLASSES,
    ClassificationData,
    DetectionData,
    SegmentationData,
    make_transform,
    read_idx,
    resolve_data_config,
)
from visionzoo.data.detection import decode_segmentation

from tiny_datasets import write_ade20k, write_coco, write_idx, write_imagefolder, write_voc

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FLIP = [{"name": "HorizontalFlip", "p": 1.0}]


def test_resolve_data_config_from_model_and_overrides():
    config = resolve_data_config("mixvit_tiny")
    assert config.input_size == (224, 224) and config.crop_pct == 0.9 and config.interpolation == "bicubic"
    assert config.mean == (0.485, 0.456, 0.406)
    config = resolve_data_config("mixvit_tiny", image_size=(32, 48), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert config.input_size == (32, 48) and config.mean == (0.5,) * 3 and config.std == (0.25,) * 3
    assert resolve_data_config().input_size == (224, 224)
    with pytest.raises(ValueError, match=r"unknown model_name 'mixvit_tinny'.*mixvit_tiny"):
        resolve_data_config("mixvit_tinny")


def test_transform_specs_and_their_errors():
    one_of = make_transform({"name": "OneOf", "p": 0.5, "transforms": [{"name": "Blur"}, {"name": "HorizontalFlip"}]})
    assert len(one_of.transforms) == 2 and one_of.p == 0.5
    with pytest.raises(ValueError, match=r"unknown transform 'HorizontalFlp'.*close names: HorizontalFlip"):
        make_transform({"name": "HorizontalFlp"})
    with pytest.raises(ValueError, match=r"transform HorizontalFlip: unknown argument 'prob'.*valid: p"):
        make_transform({"name": "HorizontalFlip", "prob": 0.5})
    with pytest.raises(ValueError, match=r"transform HorizontalFlip: bad arguments .*p"):
        make_transform({"name": "HorizontalFlip", "p": "often"})
    with pytest.raises(ValueError, match="Normalize: the data module appends normalisation"):
        make_transform({"name": "Normalize"})
    with pytest.raises(ValueError, match="'name' key"):
        make_transform({"HorizontalFlip": {"p": 0.5}})


def test_transform_errors_surface_from_the_data_module(tmp_path):
    root = write_imagefolder(tmp_path, num_classes=2, per_class=2, splits=("train",))
    data = ClassificationData(str(root), train_transforms=[{"name": "RandomCrop", "heigth": 8, "width": 8}])
    with pytest.raises(ValueError, match="transform RandomCrop: unknown argument 'heigth'; did you mean height"):
        data.train_dataloader()


# classification


def test_imagefolder_batches_class_names_and_normalisation(tmp_path):
    root = write_imagefolder(tmp_path, num_classes=3, per_class=4, size=(32, 32))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    data = ClassificationData(str(root), image_size=32, batch_size=5, mean=mean, std=std, eval_transforms=[])
    assert data.num_classes == 3 and data.class_names == ["class_0", "class_1", "class_2"]
    data.setup("fit")
    assert len(data.dataset("train")) == 12 and len(data.dataset("val")) == 12  # val on disk: nothing held out
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (5,) and labels.dtype == torch.int64
    # eval with no transforms: exactly (RGB / 255 - mean) / std, for PNG, JPEG, grayscale and RGBA files alike
    images, labels = next(iter(data.test_dataloader()))
    dataset = data.dataset("test")
    for i in range(5):
        path, label = dataset.samples[i]
        rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
        expected = (torch.from_numpy(rgb).permute(2, 0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[
            :, None, None
        ]
        torch.testing.assert_close(images[i], expected, atol=1e-5, rtol=1e-5)
        assert labels[i] == label
    assert {Image.open(p).mode for p, _ in dataset.samples} >= {"RGB", "L", "RGBA"}


def test_default_pipelines_follow_the_model_cfg(tmp_path):
    root = write_imagefolder(tmp_path, num_classes=2, per_class=2, size=(40, 30), splits=("train",))
    data = ClassificationData(str(root), model_name="mixvit_tiny", image_size=(48, 64), batch_size=4, val_fraction=0.5)
    train_images, _ = next(iter(data.train_dataloader()))
    val_images, _ = next(iter(data.val_dataloader()))
    assert train_images.shape[1:] == (3, 48, 64) and val_images.shape[1:] == (3, 48, 64)
    assert ClassificationData(str(root), model_name="nat_mini").data_config.crop_pct == 0.875


def test_held_out_val_split_is_seeded(tmp_path):
    root = write_imagefolder(tmp_path, num_classes=4, per_class=10, splits=("train",))

    def split(seed: int) -> tuple[set, set]:
        data = ClassificationData(str(root), val_fraction=0.25, seed=seed)
        return {p for p, _ in data.dataset("train").samples}, {p for p, _ in data.dataset("val").samples}

    train, val = split(0)
    assert len(val) == 10 and len(train) == 30 and not train & val
    assert split(0) == (train, val)
    assert split(1)[1] != val
    data = ClassificationData(str(root), val_fraction=0.0)
    with pytest.raises(ValueError, match=r"no val split under .* and val_fraction is 0"):
        data.val_dataloader()
    with pytest.raises(ValueError, match="no test split under"):
        data.test_dataloader()


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; expected an ImageFolder tree root/train/<class>"):
        ClassificationData(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"no class folders in .*root/train/<class>/<image>"):
        ClassificationData(str(tmp_path))
    (tmp_path / "train" / "cat").mkdir(parents=True)
    data = ClassificationData(str(tmp_path))
    with pytest.raises(ValueError, match=r"the train split under .* is empty"):
        data.setup("fit")
    write_imagefolder(tmp_path / "other", num_classes=2, per_class=1, splits=("train", "val"))
    (tmp_path / "other" / "val" / "dog").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*dog' is not one of the train classes"):
        ClassificationData(str(tmp_path / "other")).val_dataloader()


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files(tmp_path, compress):
    root = write_idx(tmp_path / "digits", train=40, test=10, size=28, compress=compress)
    suffix = ".gz" if compress else ""
    images = read_idx(root / f"train-images-idx3-ubyte{suffix}")
    assert images.shape == (40, 28, 28) and images.dtype == np.uint8
    labels = read_idx(root / f"train-labels-idx1-ubyte{suffix}")
    assert labels.tolist() == [i % 10 for i in range(40)]
    data = ClassificationData(
        str(root), format="idx", image_size=28, batch_size=8, eval_transforms=[], mean=(0.5,) * 3, std=(0.5,) * 3
    )
    assert data.num_classes == 10 and data.class_names == [str(i) for i in range(10)]
    data.setup("fit")
    data.setup("test")
    assert (len(data.dataset("train")), len(data.dataset("val")), len(data.dataset("test"))) == (36, 4, 10)
    batch, targets = next(iter(data.test_dataloader()))
    assert batch.shape == (8, 3, 28, 28) and targets.tolist() == list(range(8))
    # grayscale replicated to 3 channels; the class's bright bar sits where write_idx put it
    assert torch.equal(batch[:, 0], batch[:, 1]) and torch.equal(batch[:, 0], batch[:, 2])
    assert batch[3, 0].mean(1).argmax() in range(8, 12)


def test_idx_header_validation(tmp_path):
    root = write_idx(tmp_path, train=10, test=5, compress=False)
    data = (root / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "truncated").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"truncated IDX file: shape \(10, 28, 28\) needs 7840 data bytes, found 7740"):
        read_idx(tmp_path / "truncated")
    (tmp_path / "header").mkdir()
    (tmp_path / "header" / "train-images-idx3-ubyte").write_bytes(data[:9])
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx(tmp_path / "header" / "train-images-idx3-ubyte")
    (tmp_path / "magic").write_bytes(b"\x12\x34" + data[2:])
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "magic")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(data)[:200])
    with pytest.raises(ValueError, match="cannot read the IDX file"):
        read_idx(tmp_path / "cut.gz")
    (root / "train-images-idx3-ubyte").write_bytes(data[:-1])
    with pytest.raises(ValueError, match="truncated IDX file"):
        ClassificationData(str(root), format="idx").setup("fit")
    with pytest.raises(FileNotFoundError, match=r"train-labels-idx1-ubyte\[.gz\] not found .*expected IDX files"):
        ClassificationData(str(tmp_path / "header"), format="idx")


def test_idx_fashion_names(tmp_path):
    root = write_idx(tmp_path / "fashion-mnist", train=20, test=10)
    assert ClassificationData(str(root), format="idx").class_names == FASHION_MNIST_CLASSES


def test_loader_options(tmp_path):
    root = write_imagefolder(tmp_path, num_classes=2, per_class=3, splits=("train",))
    data = ClassificationData(str(root), num_workers=2, batch_size=2, val_fraction=0.0, pin_memory=False)
    loader = data.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2 and loader.drop_last and not loader.pin_memory
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        ClassificationData(str(root), batch_size=0)


def test_cli_parses_the_signatures(tmp_path):
    from jsonargparse import ArgumentParser

    root = write_imagefolder(tmp_path, num_classes=2, per_class=2, splits=("train",))
    for cls in (ClassificationData, DetectionData, SegmentationData):
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "data")
    parser = ArgumentParser()
    parser.add_class_arguments(ClassificationData, "data")
    config = parser.parse_args(
        [
            f"--data.root={root}",
            "--data.image_size=[24, 32]",
            '--data.train_transforms=[{"name": "HorizontalFlip", "p": 0.5}]',
        ]
    )
    data = parser.instantiate(config).data
    assert data.data_config.input_size == (24, 32) and data.num_classes == 2
    assert next(iter(data.train_dataloader()))[0].shape[1:] == (3, 32, 32)  # a flip only: the files' size
    assert next(iter(data.val_dataloader()))[0].shape[1:] == (3, 24, 32)


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_smoke():
    data = ClassificationData(str(FASHION_MNIST), format="idx", image_size=28, batch_size=128, val_fraction=0.1)
    assert data.num_classes == 10 and data.class_names == FASHION_MNIST_CLASSES
    data.setup("fit")
    data.setup("test")
    assert len(data.dataset("train")) + len(data.dataset("val")) == 60000 and len(data.dataset("test")) == 10000
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (128, 3, 28, 28) and labels.max() < 10


# detection


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco"), images=4, size=(64, 80), num_classes=2, with_masks=True)


def test_detection_targets_under_a_flip(coco):
    document = json.loads((Path(coco["root"]) / coco["train_annotations"]).read_text())
    data = DetectionData(**coco, with_masks=True, batch_size=4, train_transforms=FLIP, eval_transforms=[])
    assert data.num_classes == 3 and data.class_names == ["__background__", "class_0", "class_1"]
    assert data.label_to_category_id == {1: 1, 2: 3}
    train = data.dataset("train")
    image, target = train[0]
    assert image.shape == (3, 64, 80) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    objects = [a for a in document["annotations"] if a["image_id"] == 1 and not a["iscrowd"]]
    assert len(objects) == 1 and target["labels"].tolist() == [1 if objects[0]["category_id"] == 1 else 2]
    x, y, w, h = objects[0]["bbox"]
    torch.testing.assert_close(target["boxes"], torch.tensor([[80.0 - x - w, y, 80.0 - x, y + h]]), atol=1e-3, rtol=0)
    assert target["masks"].shape == (1, 64, 80) and target["masks"].dtype == torch.uint8
    box_mask = torch.zeros(64, 80, dtype=torch.uint8)
    box_mask[y : y + h, 80 - x - w : 80 - x] = 1
    assert torch.equal(target["masks"][0], box_mask)  # the RLE mask, flipped with the image
    plain, _ = DetectionData(**coco, train_transforms=[]).dataset("train")[0]
    assert torch.equal(image, plain.flip(-1))


def test_detection_crowd_empty_images_and_polygons(coco):
    data = DetectionData(**coco, with_masks=True, batch_size=4, eval_transforms=[])
    images, targets = next(iter(data.val_dataloader()))
    assert isinstance(images, list) and len(images) == 4 and len(targets) == 4
    assert targets[0]["iscrowd"].tolist() == [0, 1]  # crowd kept for evaluation
    assert targets[-1]["boxes"].shape == (0, 4) and targets[-1]["masks"].shape == (0, 64, 80)
    train_targets = [data.dataset("train")[i][1] for i in range(4)]
    assert all(t["iscrowd"].sum() == 0 for t in train_targets)  # crowd dropped for training
    assert [int(t["image_id"]) for t in train_targets] == [1, 2, 3, 4]
    assert train_targets[-1]["labels"].numel() == 0  # the empty image is kept
    for t in train_targets[:-1]:
        areas = (t["boxes"][:, 2] - t["boxes"][:, 0]) * (t["boxes"][:, 3] - t["boxes"][:, 1])
        torch.testing.assert_close(t["masks"].sum((1, 2)).float(), areas, atol=1e-3, rtol=0)
    assert decode_segmentation([[0, 0, 4, 0, 4, 4, 0, 4]], 8, 8)[:4, :4].all()
    assert "masks" not in DetectionData(**coco).dataset("train")[0][1]


def test_detection_batch_trains_a_torchvision_detector(coco):
    from visionzoo.heads.detection import create_detector

    data = DetectionData(**coco, with_masks=True, batch_size=2)
    images, targets = next(iter(data.train_dataloader()))
    few_proposals = dict(rpn_pre_nms_top_n_train=50, rpn_post_nms_top_n_train=20, box_batch_size_per_image=16)
    model = create_detector("mask_rcnn", "mixvit_mini", data.num_classes, min_size=64, max_size=96, **few_proposals)
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_detection_errors(coco):
    with pytest.raises(FileNotFoundError, match=r"train_annotations .*missing.json' does not exist"):
        DetectionData(coco["root"], "missing.json", coco["train_images"])
    with pytest.raises(ValueError, match="give both val_annotations and val_images"):
        DetectionData(**{**coco, "val_images": None})
    data = DetectionData(coco["root"], coco["train_annotations"], coco["train_images"])
    with pytest.raises(ValueError, match="no val split"):
        data.val_dataloader()
    document = json.loads((Path(coco["root"]) / coco["train_annotations"]).read_text())
    del document["annotations"][0]["segmentation"]
    (Path(coco["root"]) / "no_masks.json").write_text(json.dumps(document))
    data = DetectionData(coco["root"], "no_masks.json", coco["train_images"], with_masks=True)
    with pytest.raises(ValueError, match=r"annotations \[1\] of 000000.jpg lack segmentation"):
        data.dataset("train")[0]
    with pytest.raises(FileNotFoundError, match=r"test_images .*nowhere' does not exist"):
        DetectionData(**coco, test_annotations=coco["val_annotations"], test_images="nowhere").test_dataloader()


# segmentation


@pytest.mark.parametrize("layout", ["ade20k", "voc"])
def test_segmentation_batches(tmp_path, layout):
    root = (write_ade20k if layout == "ade20k" else write_voc)(tmp_path, images=4, size=(40, 56))
    data = SegmentationData(str(root), layout=layout, image_size=32, batch_size=2, eval_at_label_size=False)
    assert data.num_classes == (150 if layout == "ade20k" else 21)
    assert data.class_names[0] == ("wall" if layout == "ade20k" else "background")
    for loader in (data.train_dataloader(), data.val_dataloader()):
        images, masks = next(iter(loader))
        assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
        assert masks.shape == (2, 32, 32) and masks.dtype == torch.int64
        valid = masks[masks != 255]
        assert valid.numel() and valid.max() < data.num_classes
    _, masks = next(iter(data.val_dataloader()))
    assert (masks[:, 23:] == 255).all()  # eval: long side to 32, padding at the bottom ignored
    with pytest.raises(ValueError, match="no test split"):
        data.test_dataloader()


def test_segmentation_batches_of_different_sizes_are_padded(tmp_path):
    root = write_ade20k(tmp_path / "a", images=1, size=(24, 40))
    write_ade20k(tmp_path / "b", images=1, size=(40, 24), seed=1)
    for folder in ("images", "annotations"):
        for path in (tmp_path / "b" / folder / "validation").iterdir():
            path.rename(root / folder / "validation" / path.name.replace("00000001", "00000002"))
    smallest_24 = [{"name": "SmallestMaxSize", "max_size": 24}]
    data = SegmentationData(str(root), batch_size=2, eval_transforms=smallest_24, eval_at_label_size=False)
    images, masks = next(iter(data.val_dataloader()))
    assert images.shape == (2, 3, 40, 40) and masks.shape == (2, 40, 40)
    assert (images[0, :, 24:] == 0).all() and (masks[0, 24:] == 255).all() and (masks[0, :24] != 255).any()
    assert (images[1, :, :, 24:] == 0).all() and (masks[1, :, 24:] == 255).all()


def test_eval_batches_keep_labels_at_their_stored_size(tmp_path):
    root = write_ade20k(tmp_path, images=2, size=(40, 56))
    data = SegmentationData(str(root), image_size=32, batch_size=2)
    images, masks, boxes = next(iter(data.val_dataloader()))
    assert images.shape == (2, 3, 32, 32)  # long side to 32 (40x56 -> 23x32), padded to 32x32
    assert [tuple(m.shape) for m in masks] == [(40, 56)] * 2 and boxes.tolist() == [[0, 0, 23, 32]] * 2
    raw = torch.from_numpy(np.asarray(Image.open(data.dataset("val").pairs[0][1])).astype(np.int64))
    torch.testing.assert_close(masks[0], torch.where(raw == 0, 255, raw - 1))
    _, train_masks = next(iter(data.train_dataloader()))  # training batches stay transformed
    assert train_masks.shape == (2, 32, 32)


def test_ade20k_reduce_zero_label_and_flip(tmp_path):
    root = write_ade20k(tmp_path, images=2, size=(24, 32))
    data = SegmentationData(str(root), image_size=(24, 32), train_transforms=FLIP, eval_transforms=[])
    _, mask, _ = data.dataset("val")[0]
    mask_path = data.dataset("val").pairs[0][1]
    raw = torch.from_numpy(np.asarray(Image.open(mask_path)).astype(np.int64))
    torch.testing.assert_close(mask, torch.where(raw == 0, 255, raw - 1))
    image_path, mask_path = data.dataset("train").pairs[0]
    flipped_image, flipped_mask = data.dataset("train")[0]
    raw = torch.from_numpy(np.asarray(Image.open(mask_path)).astype(np.int64))
    torch.testing.assert_close(flipped_mask, torch.where(raw == 0, 255, raw - 1).flip(-1))
    rgb = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = torch.tensor(data.data_config.mean)[:, None, None], torch.tensor(data.data_config.std)[:, None, None]
    torch.testing.assert_close(flipped_image, ((rgb - mean) / std).flip(-1), atol=1e-5, rtol=1e-5)


def test_segmentation_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; expected root/JPEGImages/\*.jpg"):
        SegmentationData(str(tmp_path / "missing"), layout="voc")
    with pytest.raises(FileNotFoundError, match=r"no train split .*expected root/images/\{training,validation\}"):
        SegmentationData(str(tmp_path))
    root = write_voc(tmp_path / "voc", images=2, size=(16, 16))
    with pytest.raises(ValueError, match="ignore_index 10 collides"):
        SegmentationData(str(root), layout="voc", ignore_index=10)
    mask_path = root / "SegmentationClass" / "2007_train_000000.png"
    mask = Image.open(mask_path)
    values = np.asarray(mask).copy()
    values[0, 0] = 42
    bad = Image.frombytes("P", mask.size, values.tobytes())
    bad.putpalette(mask.getpalette())
    bad.save(mask_path)
    data = SegmentationData(str(root), layout="voc")
    with pytest.raises(ValueError, match=r"2007_train_000000.png: label value 42 is out of range for 21 classes"):
        data.dataset("train")[0]
    ade = write_ade20k(tmp_path / "ade", images=1, size=(16, 16))
    (ade / "annotations" / "validation" / "ADE_val_00000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"ADE_val_00000001.png' does not exist"):
        SegmentationData(str(ade)).dataset("val")[0]
    few = SegmentationData(str(ade), num_classes=5)
    assert few.class_names == ADE20K_CLASSES[:5]
    with pytest.raises(ValueError, match="out of range for 5 classes"):
        few.dataset("train")[0]
