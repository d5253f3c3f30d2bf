"""Shapes dataset, COCO loading, COCO mAP (pycocotools) on hand-made cases, training pieces."""
import json

import numpy as np
import pytest
import torch

from edet_deploy import EdetError
from edet_deploy.data import CocoDataset, SHAPE_CLASSES, generate_shapes
from edet_deploy.eval import coco_map


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes"), {"train": 12, "val": 6, "calib": 4}, seed=3,
                           progress=False)


def test_deterministic_by_seed(shapes, tmp_path):
    again = generate_shapes(tmp_path, {"train": 12, "val": 6, "calib": 4}, seed=3, progress=False)
    for split in ("train", "val"):
        assert json.loads((shapes / f"instances_{split}.json").read_text()) == \
            json.loads((again / f"instances_{split}.json").read_text())
        a, b = CocoDataset(shapes, split), CocoDataset(again, split)
        np.testing.assert_array_equal(a.load_image(0), b.load_image(0))
    other = generate_shapes(tmp_path / "other", {"val": 6}, seed=4, progress=False)
    assert not np.array_equal(CocoDataset(other, "val").load_image(0), CocoDataset(shapes, "val").load_image(0))


def test_annotations_are_valid(shapes):
    for split in ("train", "val", "calib"):
        ds = CocoDataset(shapes, split)
        assert ds.class_names == list(SHAPE_CLASSES)
        total = 0
        for i in range(len(ds)):
            h, w = ds.load_image(i).shape[:2]
            info = ds.images[i]
            assert (info["height"], info["width"]) == (h, w)
            boxes, classes = ds.target(i)
            total += len(boxes)
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
            assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert ((classes >= 0) & (classes < len(SHAPE_CLASSES))).all()
        assert total > len(ds)  # several objects per image on average


def test_bad_dataset_errors(tmp_path):
    with pytest.raises(EdetError, match="not found"):
        CocoDataset(tmp_path / "nope", "val")
    (tmp_path / "instances_val.json").write_text("{not json")
    (tmp_path / "images" / "val").mkdir(parents=True)
    with pytest.raises(EdetError, match="not a COCO instances file"):
        CocoDataset(tmp_path, "val")
    (tmp_path / "instances_val.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(EdetError, match="no images"):
        CocoDataset(tmp_path, "val")


def _hand_dataset(tmp_path):
    """Two images, three ground-truth boxes of two classes."""
    ann = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100},
                      {"id": 2, "file_name": "b.png", "width": 100, "height": 100}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600,
                            "iscrowd": 0},
                           {"id": 2, "image_id": 1, "category_id": 2, "bbox": [60, 60, 30, 30], "area": 900,
                            "iscrowd": 0},
                           {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500,
                            "iscrowd": 0}],
           "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "instances_val.json").write_text(json.dumps(ann))
    return CocoDataset(tmp_path, "val")


def test_coco_map_hand_made_cases(tmp_path):
    ds = _hand_dataset(tmp_path)
    perfect = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
               {"image_id": 1, "category_id": 2, "bbox": [60, 60, 30, 30], "score": 0.8},
               {"image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50], "score": 0.7}]
    assert coco_map(ds, perfect)["AP"] == pytest.approx(1.0)
    # Class b missed entirely: AP(a) = 1, AP(b) = 0 -> mAP 0.5 at every IoU threshold.
    assert coco_map(ds, perfect[:1] + perfect[2:])["AP"] == pytest.approx(0.5)
    # Box of image 2 shifted to IoU 25/(2500+2500-...) : 50x50 box moved by 10 px -> IoU = 1600/3400 = 0.47:
    # a false positive at every threshold >= 0.5; class a then has recall 1/2 -> AP(a) = 0.5 (101-pt), AP(b) = 1.
    shifted = perfect[:2] + [{"image_id": 2, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.7}]
    stats = coco_map(ds, shifted)
    assert stats["AP50"] == pytest.approx(0.75, abs=0.01) and stats["AP"] == pytest.approx(0.75, abs=0.01)
    assert coco_map(ds, [])["AP"] == 0.0


def test_targets_and_augment():
    from edet_deploy.anchors import generate_anchors
    from edet_deploy.train import assign_targets, augment
    from edet_deploy.box_coding import decode_boxes

    anchors = torch.from_numpy(generate_anchors(256))
    gt = torch.tensor([[40.0, 40.0, 104.0, 104.0]])
    labels, codes = assign_targets(anchors, gt, torch.tensor([2]))
    pos = labels >= 0
    assert pos.any() and (labels[pos] == 2).all()
    np.testing.assert_allclose(decode_boxes(codes[pos], anchors[pos]).numpy(), gt.expand(int(pos.sum()), 4).numpy(),
                               atol=1e-3)
    rng = np.random.default_rng(0)
    img = np.zeros((200, 300, 3), np.uint8)
    img[50:100, 60:120] = 255
    out, boxes, classes = augment(img, np.array([[60, 50, 120, 100]], np.float32), np.array([1]), 256, rng)
    assert out.shape == (256, 256, 3) and len(boxes) <= 1
    if len(boxes):
        x1, y1, x2, y2 = boxes[0].astype(int)
        assert out[y1 + 2:y2 - 2, x1 + 2:x2 - 2].mean() > 200  # the box still covers the white patch
