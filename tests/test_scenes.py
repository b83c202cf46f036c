"""``visionzoo data fashion-scenes``: the canvases, their COCO instances and label PNGs agree, the splits use
disjoint source images, the data modules read them, and the untrained baselines are what they claim."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from visionzoo.cli import main
from visionzoo.data import DetectionData, SegmentationData
from visionzoo.data.scenes import SCENE_CLASSES, SceneSpec, garment_mask, scene_baselines, write_fashion_scenes

from tiny_datasets import write_garments_idx

COUNTS = dict(train=24, val=6, test=8)
SPEC = SceneSpec(size=64, garment_size=(20, 32))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    source = write_garments_idx(tmp_path_factory.mktemp("fashion"))
    out = tmp_path_factory.mktemp("scenes")
    write_fashion_scenes(source, out, counts=COUNTS, spec=SPEC)
    return source, out


def _digest(folder) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    contents = b"".join(p.relative_to(folder).as_posix().encode() + p.read_bytes() for p in files)
    return hashlib.sha256(contents).hexdigest()


def test_garment_mask_fills_holes_and_drops_the_faint_halo():
    image = np.zeros((28, 28), np.uint8)
    image[3:25, 5:23] = 5
    image[4:24, 6:22] = 180
    image[12:14, 13:15] = 0
    mask = garment_mask(image)
    assert mask.sum() == 20 * 16 and mask[12:14, 13:15].all() and not mask[3].any()


def test_writer_is_deterministic_by_seed(scenes, tmp_path):
    source, out = scenes
    write_fashion_scenes(source, tmp_path / "again", counts=COUNTS, spec=SPEC)
    write_fashion_scenes(source, tmp_path / "other", counts=COUNTS, spec=SPEC, seed=1)
    assert _digest(tmp_path / "again") == _digest(out)
    assert _digest(tmp_path / "other") != _digest(out)
    fewer_val = tmp_path / "fewer"
    write_fashion_scenes(source, fewer_val, counts={**COUNTS, "val": 2}, spec=SPEC)
    assert _digest(fewer_val / "images" / "training") == _digest(out / "images" / "training")


def test_instances_labels_and_images_agree(scenes):
    _, out = scenes
    for directory, count in (("training", 24), ("validation", 6), ("testing", 8)):
        document = json.loads((out / "annotations" / f"instances_{directory}.json").read_text())
        assert [c["name"] for c in document["categories"]] == SCENE_CLASSES[1:]
        assert len(document["images"]) == count
        by_image: dict[int, list] = {}
        for annotation in document["annotations"]:
            by_image.setdefault(annotation["image_id"], []).append(annotation)
        for record in document["images"]:
            labels = np.asarray(Image.open(out / "annotations" / directory / record["file_name"]))
            image = np.asarray(Image.open(out / "images" / directory / record["file_name"]))
            assert labels.shape == image.shape == (64, 64)
            instances = by_image.get(record["id"], [])
            assert 2 <= len(instances) <= 5
            union = np.zeros_like(labels, bool)
            for annotation in instances:
                mask = mask_utils.decode(annotation["segmentation"]).astype(bool)
                assert not (union & mask).any(), "instances overlap in the visible masks"
                union |= mask
                assert (labels[mask] == annotation["category_id"]).all()
                assert annotation["area"] == mask.sum() > 0
                rows, cols = np.nonzero(mask)
                x, y, w, h = annotation["bbox"]
                assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
                values = np.bincount(image[mask])  # one source garment: one brightness, softened at the edges
                assert values.argmax() >= 100 and values.max() >= 0.5 * mask.sum()
            assert ((labels > 0) == union).all()
            assert image[~union].max() <= 90, "the background stays below every garment's brightness"


def test_splits_draw_on_disjoint_source_images(scenes):
    """Train images have brightness 100 + i, test images 255: the brightnesses inside the masks name the sources."""
    _, out = scenes

    def brightness(directory: str) -> set[int]:
        document = json.loads((out / "annotations" / f"instances_{directory}.json").read_text())
        names = {r["id"]: r["file_name"] for r in document["images"]}
        found = set()
        for annotation in document["annotations"]:
            image = np.asarray(Image.open(out / "images" / directory / names[annotation["image_id"]]))
            mask = mask_utils.decode(annotation["segmentation"]).astype(bool)
            found.add(int(np.bincount(image[mask]).argmax()))
        return found

    train, val, test = brightness("training"), brightness("validation"), brightness("testing")
    assert test == {255} and 255 not in train | val
    assert train and val and not train & val


def test_data_modules_read_the_scenes(scenes):
    _, out = scenes
    detection = DetectionData(
        str(out),
        train_annotations="annotations/instances_training.json",
        train_images="images/training",
        test_annotations="annotations/instances_testing.json",
        test_images="images/testing",
        with_masks=True,
    )
    assert detection.num_classes == 11 and detection.class_names[1:] == SCENE_CLASSES[1:]
    image, target = detection.dataset("test")[0]
    assert image.shape == (3, 64, 64) and target["masks"].shape[1:] == (64, 64) and len(target["boxes"]) >= 2
    segmentation = SegmentationData(
        str(out), layout="ade20k", reduce_zero_label=False, class_names=SCENE_CLASSES, image_size=64
    )
    assert segmentation.num_classes == 11 and segmentation.class_names == SCENE_CLASSES
    _, mask, _ = segmentation.dataset("test")[0]
    stored = np.asarray(Image.open(out / "annotations" / "testing" / "000001.png"))
    assert torch.equal(mask, torch.from_numpy(stored.copy()).long())


def test_baselines_score_what_they_claim(scenes):
    _, out = scenes
    baselines = scene_baselines(out, "test")
    labels = np.stack([np.asarray(Image.open(p)) for p in sorted((out / "annotations" / "testing").glob("*.png"))])
    # all background: IoU of the background is its share of pixels; every present garment class scores 0
    expected = (labels == 0).mean() / len(np.unique(labels))
    assert baselines["background_miou"] == pytest.approx(expected, rel=1e-5)
    assert 0 < baselines["blob_box_map"] < baselines["blob_box_map_any_class"] <= 1
    assert 0 < baselines["blob_miou"] < 1


def test_cli_writes_and_reports_baselines(tmp_path, capsys):
    source = write_garments_idx(tmp_path / "fashion", train=60, test=20)
    out = tmp_path / "scenes"
    args = ["data", "fashion-scenes", "--out", str(out), "--source", str(source)]
    assert main([*args, "--train", "4", "--val", "2", "--test", "3"]) == 0
    printed = capsys.readouterr().out
    assert "test: 3 canvases" in printed and "background_miou" in printed
    assert len(list((out / "images" / "testing").glob("*.png"))) == 3
    assert main(["data", "fashion-scenes", "--out", str(out), "--source", str(tmp_path / "missing")]) == 2
    assert "no Fashion-MNIST train IDX files" in capsys.readouterr().err
