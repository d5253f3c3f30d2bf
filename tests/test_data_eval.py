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


def _hand_annotations():
    """Two images, three ground-truth boxes of two classes."""
    return {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100},
                       {"id": 2, "file_name": "b.png", "width": 100, "height": 100}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600,
                             "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [60, 60, 30, 30], "area": 900,
                             "iscrowd": 0},
                            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500,
                             "iscrowd": 0}],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def _hand_dataset(tmp_path, ann=None):
    (tmp_path / "images" / "val").mkdir(parents=True, exist_ok=True)
    (tmp_path / "instances_val.json").write_text(json.dumps(_hand_annotations() if ann is None else ann))
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


def _broken(edit):
    ann = _hand_annotations()
    edit(ann)
    return ann


@pytest.mark.parametrize("edit, message", [
    (lambda a: a["annotations"][2].update(bbox=[1, 2]),
     r"annotation 2: bbox must be 4 finite numbers \[x, y, w, h\] with w, h >= 0, got \[1, 2\]"),
    (lambda a: a["annotations"][0].update(bbox=[float("nan")] * 4), r"annotation 0: bbox .* got \[NaN, NaN"),
    (lambda a: a["annotations"][0].update(bbox=[0, 0, float("inf"), 5]), "annotation 0: bbox"),
    (lambda a: a["annotations"][1].update(bbox=[0, 0, -3, 5]), "annotation 1: bbox"),
    (lambda a: a["annotations"][1].update(bbox=[0, 0, "3", 5]), "annotation 1: bbox"),
    (lambda a: a["annotations"][0].pop("bbox"), "annotation 0: bbox .* got null"),
    (lambda a: a["annotations"][1].update(image_id=[1]), r"annotation 1: image_id must be an integer, got \[1\]"),
    (lambda a: a["annotations"][1].update(category_id="7"), "annotation 1: category_id must be an integer"),
    (lambda a: a["annotations"][1].update(iscrowd=2), "annotation 1: iscrowd must be 0 or 1, got 2"),
    (lambda a: a["annotations"].append("box"), "annotation 3: must be an object"),
    (lambda a: a["annotations"][0].pop("id"), "annotation 0: id must be an integer, got null"),
    (lambda a: a["annotations"][2].update(id=1), "annotation 2: duplicate id 1"),
    (lambda a: a["annotations"][1].update(area="x"), 'annotation 1: area must be a finite number >= 0, got "x"'),
    (lambda a: a["annotations"][1].update(area=float("nan")), "annotation 1: area must be"),
    (lambda a: a["images"][1].pop("file_name"), "image 1: file_name must be a non-empty string, got null"),
    (lambda a: a["images"][0].update(file_name=""), "image 0: file_name"),
    (lambda a: a["images"][1].update(file_name="../../../x.png"),
     'image 1: file_name "../../../x.png" leaves the split\'s image folder'),
    (lambda a: a["images"][0].update(file_name="/etc/hostname"), 'image 0: file_name "/etc/hostname" leaves'),
    (lambda a: a["images"][0].update(file_name="sub/../../a.png"), "image 0: file_name .* leaves"),
    (lambda a: a["images"][0].update(id="x"), 'image 0: id must be an integer, got "x"'),
    (lambda a: a["images"][1].update(id=1), "image 1: duplicate id 1"),
    (lambda a: a["images"][0].update(width=0), "image 0: width must be a positive integer"),
    (lambda a: a["images"][0].update(height=1.5), "image 0: height must be a positive integer"),
    (lambda a: a.update(categories=[]), "'categories' is empty"),
    (lambda a: a["categories"][0].update(id="1"), "category 0: id must be an integer"),
    (lambda a: a["categories"][1].pop("name"), "category 1: name must be a string"),
    (lambda a: a.update(images={"id": 1}), "'images' must be a list"),
    (lambda a: a.update(annotations=None), "'annotations' must be a list"),
    (lambda a: a.pop("categories"), "not a COCO instances file .no 'categories' list"),
])
def test_malformed_annotations_are_one_line_naming_the_entry(tmp_path, edit, message):
    with pytest.raises(EdetError, match=message) as e:
        _hand_dataset(tmp_path, _broken(edit))
    assert str(e.value).startswith(str(tmp_path / "instances_val.json") + ": ") and "\n" not in str(e.value)


def test_annotations_naming_nothing_or_without_area_and_iscrowd_are_scored_as_pycocotools_would(tmp_path):
    """Subset files keep annotations of images they left out, and many files omit area / iscrowd: the orphans
    are skipped (as pycocotools does) and COCOeval gets area w * h and iscrowd 0 instead of a KeyError at the
    end of an evaluation."""
    ann = _hand_annotations()
    for a in ann["annotations"]:
        del a["area"], a["iscrowd"]
    ann["annotations"] += [{"id": 7, "image_id": 9, "category_id": 1, "bbox": [0, 0, 5, 5]},
                           {"id": 8, "image_id": 1, "category_id": 7, "bbox": [0, 0, 5, 5]}]
    ds = _hand_dataset(tmp_path, ann)
    assert [len(ds.target(i)[0]) for i in range(len(ds))] == [2, 1]
    perfect = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
               {"image_id": 1, "category_id": 2, "bbox": [60, 60, 30, 30], "score": 0.8},
               {"image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50], "score": 0.7}]
    assert coco_map(ds, perfect)["AP"] == pytest.approx(1.0)
    assert coco_map(ds, perfect[:1] + perfect[2:])["AP"] == pytest.approx(0.5)


def test_annotations_not_an_object(tmp_path):
    with pytest.raises(EdetError, match="not a COCO instances file .a JSON list, not an object"):
        _hand_dataset(tmp_path, [])


def test_real_coco_file_with_extra_keys_loads(tmp_path):
    ann = _hand_annotations()
    ann.update(info={"year": 2017}, licenses=[{"id": 1, "name": "x"}])
    for a in ann["annotations"]:
        a["segmentation"] = [[0, 0, 1, 0, 1, 1]]
    ann["annotations"] += [{"id": 4, "image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 20], "iscrowd": 1,
                            "segmentation": {"counts": "abc", "size": [100, 100]}, "area": 400},
                           {"id": 5, "image_id": 2, "category_id": 2, "bbox": [5, 5, 0, 20], "iscrowd": 0,
                            "area": 0}]
    ann["categories"][0]["supercategory"] = "thing"
    ds = _hand_dataset(tmp_path, ann)
    assert len(ds) == 2 and ds.class_names == ["a", "b"]
    boxes, classes = ds.target(1)  # the crowd region and the empty box are no targets
    np.testing.assert_array_equal(boxes, [[0, 0, 50, 50]])
    assert classes.tolist() == [0]


def test_nan_boxes_give_exit_2_not_a_score(tmp_path, capsys):
    from edet_deploy.cli import main

    data = generate_shapes(tmp_path / "ds", {"val": 2}, seed=1, progress=False)
    ann = json.loads((data / "instances_val.json").read_text())
    assert ann["annotations"]
    for a in ann["annotations"]:
        a["bbox"] = [float("nan")] * 4
    (data / "instances_val.json").write_text(json.dumps(ann))  # json writes NaN, as json.dump does
    report = tmp_path / "r.json"
    # The dataset is refused before the graph is even looked for.
    assert main(["-q", "eval", "--onnx", str(tmp_path / "g.onnx"), "--data", str(data), "--report",
                 str(report)]) == 2
    out, err = capsys.readouterr()
    assert "AP" not in out and not report.exists()
    assert len(err.strip().splitlines()) == 1
    assert "instances_val.json: annotation 0: bbox must be 4 finite numbers" in err and "internal" not in err


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_zero_image_split_writes_nothing(tmp_path):
    data = generate_shapes(tmp_path / "ds", {"train": 0, "val": 2, "calib": 0}, progress=False)
    assert not (data / "instances_train.json").exists() and not (data / "images" / "train").exists()
    assert sorted(p.name for p in (data / "images").iterdir()) == ["val"]
    with pytest.raises(EdetError, match="no annotations for split 'train'"):
        CocoDataset(data, "train")
    with pytest.raises(EdetError, match="nothing to generate"):
        generate_shapes(tmp_path / "none", {"train": 0, "val": 0}, progress=False)
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_generation_leaves_out_as_it_was(tmp_path, monkeypatch, error):
    from PIL import Image

    fresh, old = tmp_path / "fresh", tmp_path / "old"
    generate_shapes(old, {"train": 3, "val": 2}, seed=0, progress=False)
    before = _files(old)
    save, calls = Image.Image.save, []

    def failing_save(self, *args, **kwargs):  # the third image written fails
        calls.append(1)
        if len(calls) == 3:
            raise error
        return save(self, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", failing_save)
    for out in (fresh, old):
        calls.clear()
        with pytest.raises(type(error)):
            generate_shapes(out, {"train": 3, "val": 2}, seed=7, progress=False)
        assert len(calls) == 3
    assert not fresh.exists() and _files(old) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no temporary directory behind


def test_failed_move_into_place_restores_out(tmp_path, monkeypatch):
    from edet_deploy import io

    out = generate_shapes(tmp_path / "ds", {"train": 2, "val": 2}, seed=0, progress=False)
    (out / "eval_val.json").write_text("{}")
    before = _files(out)
    rename, moved = io.os.rename, []

    def failing_rename(src, dst):
        if ".edet-staging." in str(src):  # a finished entry moving into `out`: the second one fails
            moved.append(src)
            if len(moved) == 2:
                raise OSError(5, "Input/output error", str(dst))
        return rename(src, dst)
    monkeypatch.setattr(io.os, "rename", failing_rename)
    with pytest.raises(OSError):
        generate_shapes(out, {"train": 1, "val": 3}, seed=7, progress=False)
    assert len(moved) == 2
    assert _files(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".edet-shapes.json"]


def test_refuses_a_foreign_dir_unless_force(tmp_path, capsys):
    from edet_deploy.cli import main

    user = tmp_path / "coco"
    _hand_dataset(user)
    (user / "images" / "val" / "a.png").write_bytes(b"mine")
    (user / "images" / "train2017").mkdir()
    (user / "images" / "train2017" / "b.png").write_bytes(b"mine too")
    before = _files(user)
    with pytest.raises(EdetError, match="holds what make-shapes did not generate .*pass --force"):
        generate_shapes(user, {"val": 2}, progress=False)
    args = ["-q", "make-shapes", "--out", str(user), "--train", "0", "--val", "2", "--calib", "0", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "did not generate" in err
    assert _files(user) == before and sorted(p.name for p in tmp_path.iterdir()) == ["coco"]

    assert main(args + ["--force"]) == 0
    after = _files(user)
    # Ours replace theirs of the same name; the rest of the user's files stay.
    assert after["images/train2017/b.png"] == b"mine too" and "images/val/a.png" not in after
    assert sorted(p.name for p in (user / "images" / "val").iterdir()) == ["000000.jpg", "000001.jpg"]
    assert CocoDataset(user, "val").class_names == list(SHAPE_CLASSES)
    assert main(args) == 0  # now make-shapes' own: regenerating needs no --force, and keeps the user's files
    assert _files(user)["images/train2017/b.png"] == b"mine too"


def test_regenerating_replaces_the_set_whole(tmp_path):
    out = generate_shapes(tmp_path / "ds", {"train": 3, "val": 4}, seed=0, progress=False)
    (out / "eval_val_g_onnxruntime.json").write_text("{}")  # an eval report written beside the data
    generate_shapes(out, {"train": 0, "val": 2}, seed=7, progress=False)
    expected = _files(generate_shapes(tmp_path / "ref", {"train": 0, "val": 2}, seed=7, progress=False))
    assert _files(out) == {**expected, "eval_val_g_onnxruntime.json": b"{}"}  # no stale split, image or label
    # A set written before make-shapes left its marker is recognised by its instances files.
    (out / ".edet-shapes.json").unlink()
    generate_shapes(out, {"val": 1}, seed=0, progress=False)
    assert sorted(_files(out / "images")) == ["val/000000.jpg"]


# -- eval: what it checks before inference, and how it pairs the model's classes with the categories --------


class _Oracle:
    """A stand-in detector that 'detects' the ground truth of `truth` (a split labelled independently of the one
    scored), calling each box by the model class its category's name has in `names`; counts its calls."""

    def __init__(self, truth, names, num_classes=None):
        from types import SimpleNamespace
        self.truth, self.names, self.calls = truth, names, 0
        self.class_names = list(names) if num_classes is None else []  # num_classes: a graph without names
        self.runner = SimpleNamespace(max_batch=4, name="oracle",
                                      metadata={"num_classes": num_classes or len(names)})

    def detect(self, paths):
        from pathlib import Path

        from edet_deploy.postprocess import Detections
        self.calls += 1
        by_name = {im["file_name"]: i for i, im in enumerate(self.truth.images)}
        out = []
        for path in paths:
            boxes, classes = self.truth.target(by_name[Path(path).name])
            named = [self.truth.class_names[c] for c in classes]
            known = np.asarray([n in self.names for n in named], bool)  # what the model does not detect is missed
            model = np.asarray([self.names.index(n) for n in named if n in self.names], np.int64)
            out.append(Detections(boxes[known], np.linspace(0.9, 0.5, len(model), dtype=np.float32), model))
        return out


def _with_images(root, ann, split="val"):
    """A split on disk: `ann` plus a PNG of each entry's size (grey)."""
    from PIL import Image
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    for im in ann["images"]:
        Image.new("RGB", (im.get("width", 64), im.get("height", 64)), (90, 90, 90)).save(folder / im["file_name"])
    (root / f"instances_{split}.json").write_text(json.dumps(ann))
    return CocoDataset(root, split)


def _swapped(ann):
    """The same labels with the two categories' ids swapped (names follow, annotations remapped)."""
    ann = json.loads(json.dumps(ann))
    ann["categories"] = [{"id": 1, "name": "b"}, {"id": 2, "name": "a"}]
    for a in ann["annotations"]:
        a["category_id"] = 3 - a["category_id"]
    return ann


def test_eval_pairs_classes_by_name_and_by_index_only_when_asked(tmp_path):
    """The reported case: categories whose ids are swapped but named to match score as the original does
    (pycocotools on the original: 1.0); pairing by position would score them 0."""
    from edet_deploy.eval import evaluate
    truth = _with_images(tmp_path / "truth", _hand_annotations())
    oracle = _Oracle(truth, ["a", "b"])
    perfect = evaluate(oracle, truth, progress=False)["stats"]["AP"]
    assert perfect == pytest.approx(1.0)
    swapped = _with_images(tmp_path / "swapped", _swapped(_hand_annotations()))
    assert evaluate(oracle, swapped, progress=False)["stats"]["AP"] == pytest.approx(perfect)
    assert evaluate(oracle, swapped, progress=False, match_by_index=True)["stats"]["AP"] == pytest.approx(0.0)
    # Names that share nothing: refused, both lists named, unless pairing by position is asked for.
    other = _with_images(tmp_path / "other", {**_hand_annotations(), "categories": [{"id": 1, "name": "x"},
                                                                                     {"id": 2, "name": "y"}]})
    calls = oracle.calls
    with pytest.raises(EdetError, match=r"model's classes \(a, b\) share no name .* \(x, y\)") as e:
        evaluate(oracle, other, progress=False)
    assert "\n" not in str(e.value) and oracle.calls == calls  # before any inference
    assert evaluate(oracle, other, progress=False, match_by_index=True)["stats"]["AP"] == pytest.approx(1.0)


def test_eval_refuses_fewer_categories_than_classes_before_inference(tmp_path, caplog):
    """A dataset without one of the model's classes (or with fewer categories than a graph without names has
    classes) is one line, not an IndexError after the inference; extra categories score as missed, with a
    warning."""
    from edet_deploy.eval import evaluate
    ann = _hand_annotations()
    ann["categories"] = ann["categories"][:1]
    one = _with_images(tmp_path / "one", ann)
    oracle = _Oracle(one, ["a", "b"])
    with pytest.raises(EdetError, match=r"has no category named b of the model's classes \(a, b\)"):
        evaluate(oracle, one, progress=False)
    unnamed = _Oracle(one, ["a", "b"], num_classes=2)
    with pytest.raises(EdetError, match="the model detects 2 classes but .* has 1 categories"):
        evaluate(unnamed, one, progress=False)
    assert oracle.calls == unnamed.calls == 0
    full = _with_images(tmp_path / "full", _hand_annotations())
    with caplog.at_level("WARNING", logger="edet_deploy"):
        stats = evaluate(_Oracle(full, ["a"]), full, progress=False)["stats"]
    assert [r.getMessage() for r in caplog.records] == [
        f"the model detects no b: those categories of {full.ann_file} score as missed"]
    assert stats["AP"] == pytest.approx(0.5)  # pycocotools: a found, b missed


def _jpeg_with_orientation(path, size, orientation):
    from PIL import Image
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", size, (200, 50, 50)).save(path, exif=exif)


def test_eval_refuses_images_whose_size_differs_from_their_entry(tmp_path):
    """A photo stored rotated with EXIF orientation 6 and annotated in the stored frame: the detector sees it
    turned, so its boxes would score near 0 in silence; refused naming the image and how EXIF is handled. An
    entry in the displayed frame is fine."""
    ann = {"images": [{"id": 1, "file_name": "ok.png", "width": 50, "height": 50},
                      {"id": 2, "file_name": "turned.jpg", "width": 60, "height": 40}],
           "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "images" / "val").mkdir(parents=True)
    from PIL import Image
    Image.new("RGB", (50, 50)).save(tmp_path / "images" / "val" / "ok.png")
    _jpeg_with_orientation(tmp_path / "images" / "val" / "turned.jpg", (60, 40), 6)
    (tmp_path / "instances_val.json").write_text(json.dumps(ann))
    with pytest.raises(EdetError, match=r"image 2 \(.*turned.jpg\): its entry gives 60x40 \(width x height\), the "
                                        r"stored frame; the detector sees the displayed one, 40x60 after EXIF "
                                        r"orientation 6") as e:
        CocoDataset(tmp_path, "val").check_images()
    assert "\n" not in str(e.value)
    CocoDataset(tmp_path, "val").check_images(1)  # the first image alone is fine
    ann["images"][1].update(width=40, height=60)
    (tmp_path / "instances_val.json").write_text(json.dumps(ann))
    CocoDataset(tmp_path, "val").check_images()
    ann["images"][0].update(width=51)
    (tmp_path / "instances_val.json").write_text(json.dumps(ann))
    with pytest.raises(EdetError, match=r"image 1 .* gives 51x50 .* but the file decodes to 50x50"):
        CocoDataset(tmp_path, "val").check_images()


def test_eval_finds_a_truncated_last_image_before_inference(tmp_path):
    """One bad image at the end of the split: refused naming it before the others run, not after."""
    from edet_deploy.eval import evaluate
    ds = _with_images(tmp_path, _hand_annotations())
    last = ds.image_path(len(ds) - 1)
    last.write_bytes(last.read_bytes()[:60])
    oracle = _Oracle(ds, ["a", "b"])
    with pytest.raises(EdetError, match=f"1 unreadable val image.*{last.name}") as e:
        evaluate(oracle, ds, progress=False)
    assert oracle.calls == 0 and "\n" not in str(e.value)


def test_eval_of_a_split_without_annotations_warns_instead_of_scoring(tmp_path, caplog):
    from edet_deploy.eval import evaluate
    ds = _with_images(tmp_path, {**_hand_annotations(), "annotations": []})
    with caplog.at_level("WARNING", logger="edet_deploy"):
        report = evaluate(_Oracle(ds, ["a", "b"]), ds, progress=False)
    assert report["targets"] == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"nothing to score: the 2 evaluated image(s) of {ds.ann_file} have no annotations"]


def _cut_categories(data, n):
    ann = json.loads((data / "instances_val.json").read_text())
    keep = {c["id"] for c in ann["categories"][:n]}
    ann["categories"] = ann["categories"][:n]
    ann["annotations"] = [a for a in ann["annotations"] if a["category_id"] in keep]
    (data / "instances_val.json").write_text(json.dumps(ann))


def _truncate_last(data):
    ann = json.loads((data / "instances_val.json").read_text())
    last = data / "images" / "val" / ann["images"][-1]["file_name"]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])


def _no_annotations(data):
    ann = json.loads((data / "instances_val.json").read_text())
    (data / "instances_val.json").write_text(json.dumps({**ann, "annotations": []}))


@pytest.mark.parametrize("edit, rc, line", [
    (lambda d: _cut_categories(d, 3), 2, "has no category named cross of the model's classes"),
    (lambda d: _cut_categories(d, 1), 2, "has no category named square, triangle, cross"),
    (_truncate_last, 2, "1 unreadable val image(s): "),
    (_no_annotations, 0, "nothing to score: the 3 evaluated image(s) of "),
], ids=["3-categories", "1-category", "truncated-last", "no-annotations"])
def test_eval_cli_bad_splits_are_one_line_before_inference(bundled_d0, tmp_path, monkeypatch, capsys, edit, rc,
                                                           line):
    """The reported cases through `eval` with the bundled shapes model: exit 2 and one line before any image
    is run, no report; a split without annotations: one warning, no statistics printed."""
    from edet_deploy.cli import main
    from edet_deploy.detector import Detector
    data = generate_shapes(tmp_path / "ds", {"val": 3}, seed=2, progress=False)
    edit(data)
    if rc:
        def no_inference(self, images):
            raise AssertionError("inference started")
        monkeypatch.setattr(Detector, "detect", no_inference)
    report = tmp_path / "r.json"
    assert main(["eval", "--onnx", str(bundled_d0), "--backend", "onnxruntime", "--data", str(data),
                 "--report", str(report), "--no-progress"]) == rc
    out, err = capsys.readouterr()
    err = [e for e in err.strip().splitlines() if "WARNING" in e or "error" in e]
    assert len(err) == 1 and line in err[0] and "internal" not in err[0], err
    assert "AP " not in out and report.exists() == (rc == 0)


def test_training_that_diverges_says_so(tmp_path, capsys):
    """A learning rate that makes the model diverge: one line naming the cause and the rate (the NaN scores it
    led to were refused by validation's NMS as 'scores contain NaN', blaming the input)."""
    from edet_deploy.cli import main

    generate_shapes(tmp_path / "d", {"train": 16, "val": 4}, progress=False)
    code = main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "w.safetensors"), "--epochs", "3",
                 "--image-size", "128", "--batch-size", "2", "--lr", "10", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert "training diverged in epoch" in err and "lower --lr (it is 10)" in err, err
    assert not (tmp_path / "w.safetensors").exists()
