"""COCO-format detection datasets on disk: `instances_<split>.json` + an image folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

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


class CocoDataset:
    """Images with boxes (x1, y1, x2, y2, pixels) and 0-based contiguous class indices."""

    def __init__(self, root: str | Path, split: str):
        self.ann_file, self.image_dir = find_split(root, split)
        try:
            data = json.loads(self.ann_file.read_text())
            cats = sorted(data["categories"], key=lambda c: c["id"])
            images = data["images"]
            annotations = data.get("annotations", [])
        except (ValueError, KeyError, TypeError) as e:
            raise EdetError(f"{self.ann_file}: not a COCO instances file ({e})") from None
        if not images:
            raise EdetError(f"{self.ann_file}: the split has no images")
        self.split = split
        self.category_ids: List[int] = [c["id"] for c in cats]
        self.class_names: List[str] = [c["name"] for c in cats]
        index_of = {cid: i for i, cid in enumerate(self.category_ids)}
        self.images = sorted(images, key=lambda im: im["id"])
        boxes: Dict[int, list] = {im["id"]: [] for im in self.images}
        for a in annotations:
            if a.get("iscrowd", 0):
                continue
            x, y, w, h = a["bbox"]
            if w <= 0 or h <= 0 or a["image_id"] not in boxes or a["category_id"] not in index_of:
                continue
            boxes[a["image_id"]].append((x, y, x + w, y + h, index_of[a["category_id"]]))
        self._targets = {k: np.asarray(v, np.float32).reshape(-1, 5) for k, v in boxes.items()}

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, i: int) -> Path:
        return self.image_dir / self.images[i]["file_name"]

    def image_id(self, i: int) -> int:
        return int(self.images[i]["id"])

    def target(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """(boxes [n, 4] x1, y1, x2, y2, classes [n] int64 0-based)."""
        t = self._targets[self.images[i]["id"]]
        return t[:, :4].copy(), t[:, 4].astype(np.int64)

    def load_image(self, i: int) -> np.ndarray:
        from ..preprocess import decode_image
        return decode_image(self.image_path(i))
