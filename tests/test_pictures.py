"""Pictures of test predictions: what is drawn where, and ``test_predictions.png`` after ``Trainer.test`` of
each task."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from visionzoo.data import ClassificationData, DetectionData, SegmentationData
from visionzoo.data.scenes import SCENE_CLASSES, SceneSpec, write_fashion_scenes
from visionzoo.pictures import (
    CORRECT,
    WRONG,
    PredictionsPicture,
    class_colours,
    draw_classification,
    draw_detections,
    draw_segmentation,
)
from visionzoo.tasks import ClassificationTask, DetectionTask, SegmentationTask

from tiny_datasets import write_garments_idx, write_idx

TINY_MIXVIT = dict(embed_dim=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), mixers="eca")
NAMES = ["__background__", "a", "b", "c"]


def _has(picture: Image.Image, colour) -> bool:
    return bool((np.asarray(picture) == np.array(colour, np.uint8)).all(-1).any())


def test_detections_above_the_threshold_and_not_covered_are_drawn_in_their_class_colour():
    image = np.zeros((32, 32, 3), np.uint8)
    detections = dict(
        boxes=torch.tensor([[4.0, 4.0, 20.0, 20.0], [2.0, 2.0, 30.0, 30.0], [4.0, 4.0, 20.0, 21.0]]),
        labels=torch.tensor([2, 3, 1]),
        scores=torch.tensor([0.9, 0.1, 0.8]),
    )
    picture = draw_detections(image, detections, NAMES, threshold=0.3, side=64)
    colours = class_colours(len(NAMES))
    pixels = np.asarray(picture)
    assert picture.size == (64, 64)  # upscaled x2: the box's left edge lies at x = 8
    assert (pixels[20:40, 8] == colours[2]).all()
    assert not _has(picture, colours[3]), "a box under the threshold was drawn"
    assert not _has(picture, colours[1]), "a box covering a better one (another class) was drawn"


def test_segmentation_panels_colour_each_class_and_grey_the_ignored():
    image = np.full((8, 8, 3), 50, np.uint8)
    predicted = np.zeros((8, 8), np.uint8)
    predicted[:, 4:] = 2
    truth = np.full((8, 8), 255, np.uint8)
    truth[:4] = 1
    picture = np.asarray(draw_segmentation(image, predicted, truth, num_classes=3, side=8))
    colours = class_colours(3)
    assert (colours[0] == 0).all() and len({tuple(c) for c in colours}) == 3
    assert len({tuple(c) for c in class_colours(151)}) == 151, "ADE20K's classes share colours"
    assert (picture[0, 12:16] == colours[0]).all() and (picture[0, 16:20] == colours[2]).all()
    assert (picture[0, 24:32] == colours[1]).all() and (picture[7, 24:32] == 128).all()


def test_classification_labels_are_green_when_right_and_red_when_wrong():
    image = np.zeros((28, 28, 3), np.uint8)
    right, wrong = draw_classification(image, "Bag", "Bag"), draw_classification(image, "Bag", "Coat")
    assert _has(right, CORRECT) and not _has(right, WRONG)
    assert _has(wrong, WRONG) and not _has(wrong, CORRECT)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    source = write_garments_idx(tmp_path_factory.mktemp("garments"))
    write_fashion_scenes(source, out, counts=dict(train=2, val=1, test=3), spec=SceneSpec(64, garment_size=(20, 32)))
    return str(out)


def _classification(tmp_path, _):
    data = ClassificationData(str(write_idx(tmp_path / "idx", train=8, test=5)), format="idx", image_size=32)
    return ClassificationTask("mixvit_tiny", 10, model_kwargs=TINY_MIXVIT), data


def _detection(_, root):
    split = dict(annotations="annotations/instances_{}.json", images="images/{}")
    paths = {f"{s}_{k}": v.format(d) for s, d in (("train", "training"), ("test", "testing")) for k, v in split.items()}
    data = DetectionData(root, **paths, batch_size=3)
    kwargs = dict(min_size=64, max_size=64, fpn_channels=32, backbone_kwargs=TINY_MIXVIT)
    return DetectionTask("mixvit_tiny", data.num_classes, detector="fcos", detector_kwargs=kwargs), data


def _segmentation(_, root):
    data = SegmentationData(root, reduce_zero_label=False, class_names=SCENE_CLASSES, image_size=64, batch_size=3)
    kwargs = dict(fpn_channels=16, channels=16, backbone_kwargs=TINY_MIXVIT)
    return SegmentationTask("mixvit_tiny", 11, decoder="semantic_fpn", aux_weight=0, segmenter_kwargs=kwargs), data


@pytest.mark.parametrize(
    "build, size",
    [(_classification, (5 * 140, 166)), (_detection, (3 * 262, 262)), (_segmentation, (2 * (3 * 192 + 8 + 6), None))],
    ids=["classification", "detection", "segmentation"],
)
def test_testing_writes_a_picture_of_the_first_test_images(build, size, scenes, tmp_path):
    torch.set_num_threads(1)
    task, data = build(tmp_path, scenes)
    logger = CSVLogger(tmp_path, name="logs")
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=logger,
        callbacks=[PredictionsPicture(count=8)],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(task, data, verbose=False)
    out = tmp_path / "logs" / "version_0" / "test_predictions.png"
    with Image.open(out) as picture:
        width, height = picture.size
    assert width == size[0]
    if size[1] is not None:
        assert height == size[1]
    else:  # two rows of panels and the key of the 11 classes
        assert height > 2 * (192 + 6)
