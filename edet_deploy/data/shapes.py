"""A small detection dataset we render ourselves: shapes of several classes in varied colours, sizes and
overlaps on textured backgrounds, written in COCO format. Deterministic for a given seed."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import EdetError, first_few
from ..io import staged_directory, write_json

SHAPE_CLASSES = ("circle", "square", "triangle", "cross")
DEFAULT_SPLITS = {"train": 3000, "val": 300, "calib": 500}
MARKER = ".edet-shapes.json"  # what make-shapes wrote in a directory: all that regenerating it may replace


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Textured background: a colour gradient, noise, and a few faint lines and blobs."""
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    base = c0 * (1 - t) + c1 * t + rng.normal(0, rng.uniform(4, 18), (h, w, 3))
    img = Image.fromarray(np.clip(np.broadcast_to(base, (h, w, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 8))):
        col = tuple(int(v) for v in np.clip(c0 + rng.normal(0, 40, 3), 0, 255))
        x0, y0, x1, y1 = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, h)
        draw.line([x0, y0, x1, y1], fill=col, width=int(rng.integers(1, 4)))
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 1.2))))


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    if kind == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * r / math.sqrt(2) * 1.2, y * r / math.sqrt(2) * 1.2) for x, y in pts]
    elif kind == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:  # cross: a plus sign of width r/3
        a, b = r, r / 3
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b),
               (-b, -b)]
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def render_image(rng: np.random.Generator, size: Tuple[int, int]) -> Tuple[Image.Image, List[Dict]]:
    """One image and its objects: [{'bbox': [x, y, w, h], 'category': index}]. Later shapes occlude earlier
    ones; an object less than half visible is not annotated (nobody could label it)."""
    h, w = size
    img = _background(rng, h, w)
    draw = ImageDraw.Draw(img)
    labels = Image.new("L", (w, h), 0)  # which object owns each pixel
    label_draw = ImageDraw.Draw(labels)
    candidates = []
    for index in range(int(rng.integers(1, 9))):
        kind = int(rng.integers(0, len(SHAPE_CLASSES)))
        r = float(rng.uniform(0.04, 0.2) * min(h, w))
        cx, cy = float(rng.uniform(r * 0.5, w - r * 0.5)), float(rng.uniform(r * 0.5, h - r * 0.5))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        name = SHAPE_CLASSES[kind]
        single = Image.new("L", (w, h), 0)
        if name == "circle":
            box = (cx - r, cy - r, cx + r, cy + r)
            draw.ellipse(box, fill=color, outline=(0, 0, 0) if rng.random() < 0.3 else None)
            label_draw.ellipse(box, fill=index + 1)
            ImageDraw.Draw(single).ellipse(box, fill=1)
        else:
            angle = float(rng.uniform(-0.25, 0.25)) if name != "cross" else float(rng.uniform(-0.2, 0.2))
            pts = _polygon(name, cx, cy, r, angle)
            draw.polygon(pts, fill=color)
            label_draw.polygon(pts, fill=index + 1)
            ImageDraw.Draw(single).polygon(pts, fill=1)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            box = (min(xs), min(ys), max(xs), max(ys))
        candidates.append((index + 1, kind, box, int(np.asarray(single).sum())))
    owner = np.asarray(labels)
    objects = []
    for label, kind, box, full in candidates:
        visible = int((owner == label).sum())
        x1, y1 = max(0.0, box[0]), max(0.0, box[1])
        x2, y2 = min(float(w), box[2]), min(float(h), box[3])
        if full and visible >= 0.5 * full and x2 - x1 >= 4 and y2 - y1 >= 4:
            objects.append({"bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                            "category": kind})
    return img, objects


def sample_image(path: Path, seed: int = 0, size: Tuple[int, int] = (480, 640)) -> Path:
    """A synthetic scene of the shape classes written as a JPEG: stands in for a photo, with no downloads."""
    img, _ = render_image(np.random.default_rng([seed, 99]), size)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=92)
    return path


def _entries(root: Path) -> Iterator[str]:
    """`root`'s files and folders as relative paths, each split's image folder (`images/<split>`) on its own."""
    for child in sorted(root.iterdir()):
        if child.name == "images" and child.is_dir() and not child.is_symlink():
            yield from (f"images/{c.name}" for c in sorted(child.iterdir()))
        else:
            yield child.name


def _generated(out: Path, force: bool) -> Set[str]:
    """What an earlier make-shapes wrote in `out` (relative paths). A non-empty `out` it did not write is
    refused unless `force`, so a user's dataset is never overwritten by mistake."""
    if not out.exists():
        return set()
    if not out.is_dir():
        raise EdetError(f"--out {out} is a file, not a directory")
    try:
        return set(json.loads((out / MARKER).read_text())["entries"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    # Written before the marker existed: every instances file is ours (our `info`), with its split's images.
    splits = [p.name[len("instances_"):-len(".json")] for p in out.glob("instances_*.json")]
    try:
        ours = bool(splits) and all(json.loads((out / f"instances_{s}.json").read_text())["info"]["description"]
                                    == "edet-deploy shapes" for s in splits)
    except (OSError, ValueError, KeyError, TypeError):
        ours = False
    if ours:
        return {f"instances_{s}.json" for s in splits} | {f"images/{s}" for s in splits}
    foreign = list(_entries(out))
    if foreign and not force:
        raise EdetError(f"{out} holds what make-shapes did not generate ({first_few(foreign)}); choose an empty "
                        f"--out or pass --force")
    return set()


def generate_shapes(out_dir: str | Path, splits: Dict[str, int] = DEFAULT_SPLITS, seed: int = 0,
                    min_size: int = 224, max_size: int = 352, progress: bool = True, force: bool = False) -> Path:
    """Write `images/<split>/*.jpg` and `instances_<split>.json` for each split of more than 0 images under
    `out_dir` (`progress`: one bar over every split's images). The set is built in a staging directory and moved
    into place when complete (`io.staged_directory`): a failure or Ctrl-C leaves `out_dir` as it was. A directory
    make-shapes generated is replaced whole (other files in it, such as eval reports, are kept); any other
    non-empty one is refused unless `force`, which replaces only the files generated."""
    from ..progress import job_bar, ticking

    out = Path(out_dir)
    if not any(splits.values()):
        raise EdetError("every split has 0 images: nothing to generate")
    replaced = _generated(out.resolve(), force)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)]
    bar = job_bar(progress, sum(splits.values()), "shapes")
    with bar, staged_directory(out, replaced, _entries) as tmp:
        for split_index, (split, count) in enumerate(splits.items()):
            if not count:  # "0: no such split": no empty instances file a consumer would take for a split
                continue
            img_dir = tmp / "images" / split
            img_dir.mkdir(parents=True)
            images, annotations = [], []
            for i in ticking(range(count), bar, split):
                rng = np.random.default_rng([seed, split_index, i])
                h, w = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
                img, objects = render_image(rng, (h, w))
                name = f"{i:06d}.jpg"
                img.save(img_dir / name, quality=92)
                images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
                for obj in objects:
                    bw, bh = obj["bbox"][2], obj["bbox"][3]
                    annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                        "category_id": obj["category"] + 1, "bbox": obj["bbox"],
                                        "area": round(bw * bh, 2), "iscrowd": 0})
            write_json(tmp / f"instances_{split}.json", {"info": {"description": "edet-deploy shapes", "seed": seed},
                                                        "images": images, "annotations": annotations,
                                                        "categories": categories})
        write_json(tmp / MARKER, {"generator": "edet-deploy make-shapes", "seed": seed, "splits": splits,
                                  "entries": list(_entries(tmp))})
    return out
