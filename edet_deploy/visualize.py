"""Draw detections on an image (Pillow)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from PIL import Image, ImageDraw

from .errors import EdetError
from .io import atomic_path
from .postprocess import Detections
from .preprocess import ImageSource, decode_image

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


DRAW_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def draw_targets(draw: str | Path, images: Sequence[str | Path]) -> List[Path]:
    """Where `detect --draw` writes, checked before any work: a .png/.jpg file (the first image's detections)
    in an existing directory, or an existing directory (`draw_files` names a file in it per image). Nothing is
    created."""
    out = Path(draw)
    if out.suffix:
        if out.suffix.lower() not in DRAW_FORMATS:
            raise EdetError(f"--draw {out}: {out.suffix} is not an image format this writes; use "
                            f"{', '.join(DRAW_FORMATS)} or a directory")
        if not out.parent.is_dir():
            raise EdetError(f"--draw: cannot write {out}: {out.parent} is not an existing directory")
    elif not out.is_dir():
        raise EdetError(f"--draw {out}: no such directory (create it, or give a .png/.jpg file)")
    return draw_files(out, images)


def draw_files(draw: str | Path, images: Sequence[str | Path]) -> List[Path]:
    """The files `detect --draw` writes, by name only (never an error: `draw_targets` checks them): `draw`
    itself when it names a file, <image>_det.png for each image in an existing directory (<image>_2_det.png for a
    second image of that name), nothing for a directory that does not exist."""
    out = Path(draw)
    if out.suffix:
        return [out]
    if not out.is_dir():
        return []
    targets: List[Path] = []
    for img in images:  # images sharing a name (a/x.jpg, b/x.jpg, x.png) get x_det.png, x_2_det.png, ...
        stem, k = Path(img).stem, 1
        while (name := out / (f"{stem}_det.png" if k == 1 else f"{stem}_{k}_det.png")) in targets:
            k += 1
        targets.append(name)
    return targets


def draw_detections(image: ImageSource, detections: Detections, out: str | Path) -> Path:
    img = Image.fromarray(decode_image(image))
    draw = ImageDraw.Draw(img)
    for i in range(len(detections)):
        color = _PALETTE[int(detections.classes[i]) % len(_PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in detections.boxes[i])
        draw.rectangle([x1, y1, x2, y2], outline=color, width=2)
        text = f"{detections.label(i)} {float(detections.scores[i]):.2f}"
        tw = draw.textlength(text)
        draw.rectangle([x1, max(0, y1 - 12), x1 + tw + 4, max(12, y1)], fill=color)
        draw.text((x1 + 2, max(0, y1 - 12)), text, fill=(0, 0, 0))
    out = Path(out)
    with atomic_path(out) as tmp:
        img.save(tmp, format=DRAW_FORMATS.get(out.suffix.lower(), "PNG"))
    return out
