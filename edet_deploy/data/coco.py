"""COCO-format detection datasets on disk: `instances_<split>.json` + an image folder."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import EdetError


def find_split(root: str | Path, split: str) -> Tuple[Path, Path]:
    """Locate (annotation file, image dir) for `split` under `root`, in our layout (`instances_<split>.json`,
    `images/<split>/`) or COCO's (`annotations/instances_<split>.json`, `<split>/`)."""
    root = Path(root)
    if not root.is_dir():
        raise EdetError(f"dataset directory not found: {root}")
    for ann in (root / f"instances_{split}.json", root / "annotations" / f"instances_{split}.json"):
        if ann.is_file():
            for images in (root / "images" / split, root / split, root / "images"):
                if images.is_dir():
                    return ann, images
            raise EdetError(f"{ann} found but no image folder for split {split!r} under {root}")
    raise EdetError(f"no annotations for split {split!r} under {root} (expected instances_{split}.json)")


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)  # NaN and Infinity show as JSON writes them
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_bbox(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            and value[2] >= 0 and value[3] >= 0)


def _leaves_folder(name: str) -> bool:
    """Whether a file_name points outside the folder it is joined to: absolute, or climbing out with '..'.
    Checked on the text alone, so a symlink the user placed inside the folder still works."""
    norm = os.path.normpath(name)
    return os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep)


def decoded_sizes(paths: Sequence[Path], what: str) -> List[Tuple[int, int]]:
    """(height, width) of each image as the detector sees it (decoded, EXIF orientation applied), or one line
    naming the unreadable ones (`what`: "calibration", "val", ...). Decoding everything is the only check that
    finds a truncated file, and it is cheap next to inference (500 shapes images: 0.35-0.46 s on 2 cores)."""
    from ..preprocess import decode_image

    sizes: List[Tuple[int, int]] = []
    bad: List[str] = []
    for p in paths:
        try:
            h, w = decode_image(p).shape[:2]
            sizes.append((h, w))
        except EdetError as e:
            bad.append(str(e))
    if bad:
        raise EdetError(f"{len(bad)} unreadable {what} image(s): {'; '.join(bad[:3])}")
    return sizes


def _entry_problem(kind: str, i: int, entry: Any, seen: set) -> Optional[str]:
    """An image, category or annotation: an object whose integer id is not in `seen` (then added to it)."""
    if not isinstance(entry, dict):
        return f"{kind} {i}: must be an object, got {_shown(entry)}"
    if not _is_int(entry.get("id")):
        return f"{kind} {i}: id must be an integer, got {_shown(entry.get('id'))}"
    if entry["id"] in seen:
        return f"{kind} {i}: duplicate id {entry['id']}"
    seen.add(entry["id"])
    return None


def _instances_problem(data: Any) -> Optional[str]:
    """What makes `data` (a parsed instances file) unusable, naming the first bad entry; None if it is fine.
    Checked once, at load: a bad file is then one clear line before any work, instead of a crash midway or,
    for NaN boxes, a score computed against nothing."""
    if not isinstance(data, dict):
        return f"not a COCO instances file (a JSON {type(data).__name__}, not an object)"
    for key in ("images", "categories"):
        if key not in data:
            return f"not a COCO instances file (no {key!r} list)"
    for key in ("images", "annotations", "categories"):  # annotations may be absent (an unlabelled split)
        if key in data and not isinstance(data[key], list):
            return f"{key!r} must be a list, got {_shown(data[key])}"
    if not data["images"]:
        return "the split has no images"
    image_ids: set = set()
    for i, im in enumerate(data["images"]):
        problem = _entry_problem("image", i, im, image_ids)
        if problem:
            return problem
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            return f"image {i}: file_name must be a non-empty string, got {_shown(im.get('file_name'))}"
        if _leaves_folder(im["file_name"]):  # eval would read (and score) any file the process can open
            return f"image {i}: file_name {_shown(im['file_name'])} leaves the split's image folder"
        for key in ("width", "height"):
            if key in im and not (_is_int(im[key]) and im[key] > 0):
                return f"image {i}: {key} must be a positive integer, got {_shown(im[key])}"
    if not data["categories"]:
        return "'categories' is empty: a detection dataset needs at least one class"
    category_ids: set = set()
    for i, c in enumerate(data["categories"]):
        problem = _entry_problem("category", i, c, category_ids)
        if problem:
            return problem
        if not isinstance(c.get("name"), str):
            return f"category {i}: name must be a string, got {_shown(c.get('name'))}"
    annotation_ids: set = set()
    for i, a in enumerate(data.get("annotations", [])):
        # pycocotools finds an annotation by its id: with a duplicate id it would score against the wrong boxes.
        problem = _entry_problem("annotation", i, a, annotation_ids)
        if problem:
            return problem
        for key in ("image_id", "category_id"):  # one naming no image or category is skipped, as pycocotools does
            if not _is_int(a.get(key)):
                return f"annotation {i}: {key} must be an integer, got {_shown(a.get(key))}"
        if not _is_bbox(a.get("bbox")):
            return (f"annotation {i}: bbox must be 4 finite numbers [x, y, w, h] with w, h >= 0, "
                    f"got {_shown(a.get('bbox'))}")
        area = a.get("area", 0)  # optional: `coco_ground_truth` fills in w * h
        if not (isinstance(area, (int, float)) and not isinstance(area, bool) and math.isfinite(area) and area >= 0):
            return f"annotation {i}: area must be a finite number >= 0, got {_shown(area)}"
        if a.get("iscrowd", 0) not in (0, 1):
            return f"annotation {i}: iscrowd must be 0 or 1, got {_shown(a.get('iscrowd'))}"
    return None


class CocoDataset:
    """Images with boxes (x1, y1, x2, y2, pixels) and 0-based contiguous class indices."""

    def __init__(self, root: str | Path, split: str):
        self.ann_file, self.image_dir = find_split(root, split)
        try:
            data = json.loads(self.ann_file.read_text())
        except ValueError as e:
            raise EdetError(f"{self.ann_file}: not a COCO instances file (not JSON: {e})") from None
        problem = _instances_problem(data)
        if problem:
            raise EdetError(f"{self.ann_file}: {problem}")
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.split = split
        self.category_ids: List[int] = [c["id"] for c in cats]
        self.class_names: List[str] = [c["name"] for c in cats]
        index_of = {cid: i for i, cid in enumerate(self.category_ids)}
        self.images = sorted(data["images"], key=lambda im: im["id"])
        boxes: Dict[int, list] = {im["id"]: [] for im in self.images}
        # What pycocotools scores against (`coco_ground_truth`): the annotations of known images and categories,
        # area and iscrowd filled in where the file leaves them out (COCOeval reads both).
        self._annotations = [{**a, "area": a.get("area", a["bbox"][2] * a["bbox"][3]),
                              "iscrowd": a.get("iscrowd", 0)} for a in data.get("annotations", [])
                             if a["image_id"] in boxes and a["category_id"] in index_of]
        for a in self._annotations:
            x, y, w, h = a["bbox"]
            if a["iscrowd"] or w <= 0 or h <= 0:  # crowd regions and empty boxes are no targets
                continue
            boxes[a["image_id"]].append((x, y, x + w, y + h, index_of[a["category_id"]]))
        self._targets = {k: np.asarray(v, np.float32).reshape(-1, 5) for k, v in boxes.items()}
        self._categories = cats
        self._checked = 0  # how many leading images `check_images` found good (training re-evaluates each epoch)

    def __len__(self) -> int:
        return len(self.images)

    def coco_ground_truth(self) -> Dict[str, Any]:
        """The split as a COCO dataset dict for pycocotools (see __init__): the checked file, normalised."""
        return {"images": self.images, "annotations": self._annotations, "categories": self._categories}

    def image_path(self, i: int) -> Path:
        return self.image_dir / self.images[i]["file_name"]

    def image_id(self, i: int) -> int:
        return int(self.images[i]["id"])

    def target(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """(boxes [n, 4] x1, y1, x2, y2, classes [n] int64 0-based)."""
        t = self._targets[self.images[i]["id"]]
        return t[:, :4].copy(), t[:, 4].astype(np.int64)

    def check_images(self, n: Optional[int] = None) -> None:
        """Decode the first `n` images (default: all) before any work is spent on them: one line naming the
        unreadable ones, or the first whose decoded size differs from the width / height its entry gives. The
        detector works in the displayed frame (EXIF orientation applied), so boxes drawn in the stored frame of
        a rotated photo would score near 0 in silence."""
        n = len(self) if n is None else min(n, len(self))
        if n <= self._checked:
            return
        sizes = decoded_sizes([self.image_path(i) for i in range(n)], self.split)
        for i, (h, w) in enumerate(sizes):
            im = self.images[i]
            if im.get("width", w) == w and im.get("height", h) == h:
                continue
            from ..preprocess import open_image
            stored = open_image(self.image_path(i))
            orientation = stored.getexif().get(0x0112, 1)  # the EXIF Orientation tag
            given = f"{im.get('width', w)}x{im.get('height', h)}"
            why = (f"the stored frame; the detector sees the displayed one, {w}x{h} after EXIF orientation "
                   f"{orientation}: annotate that frame (boxes too) or drop the tag"
                   if orientation != 1 and given == "{}x{}".format(*stored.size) else
                   f"but the file decodes to {w}x{h}: the annotations do not describe it")
            raise EdetError(f"{self.ann_file}: image {im['id']} ({self.image_path(i)}): its entry gives {given} "
                            f"(width x height), {why}")
        self._checked = n

    def load_image(self, i: int) -> np.ndarray:
        from ..preprocess import decode_image
        return decode_image(self.image_path(i))
