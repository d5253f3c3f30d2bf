"""Image decoding and letterboxing, written once for every backend and the Triton Python models.

numpy and Pillow only (no torch). Output is what the detection graph takes: uint8 RGB, resized keeping the
aspect ratio with scale = min(S/h, S/w) (bilinear), padded bottom/right to S x S with the mean colour.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .configs import MEAN_RGB
from .errors import EdetError

# Refuse images above this many pixels before decoding them (decompression-bomb protection): 8192 x 8192.
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_ENCODED_BYTES = 64 * 1024 * 1024

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Image.Image]


def decode_image(src: ImageSource, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None) -> np.ndarray:
    """Decode a file path, encoded bytes, a PIL image or an HxWx3 / HxW array into uint8 RGB HxWx3."""
    label = name or (str(src) if isinstance(src, (str, os.PathLike)) else type(src).__name__)
    if isinstance(src, np.ndarray):
        return _from_array(src, label)
    if isinstance(src, Image.Image):
        return _from_pil(src, label, max_pixels)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise EdetError(f"image not found: {path}")
        if path.stat().st_size > MAX_ENCODED_BYTES:
            raise EdetError(f"{path}: file larger than {MAX_ENCODED_BYTES >> 20} MiB")
        data = path.read_bytes()
    else:
        data = bytes(src)
    if not data:
        raise EdetError(f"{label}: empty image data")
    if len(data) > MAX_ENCODED_BYTES:
        raise EdetError(f"{label}: encoded image larger than {MAX_ENCODED_BYTES >> 20} MiB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            return _from_pil(img, label, max_pixels)
    except EdetError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise EdetError(f"{label}: image too large (decompression-bomb protection: {e})") from None
    except UnidentifiedImageError as e:
        raise EdetError(f"{label}: not a decodable image ({type(e).__name__})") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise EdetError(f"{label}: corrupt image ({e})") from None


def _from_pil(img: Image.Image, label: str, max_pixels: int) -> np.ndarray:
    w, h = img.size  # from the header: checked before any pixel is decoded
    if w <= 0 or h <= 0:
        raise EdetError(f"{label}: image has no pixels")
    if w * h > max_pixels:
        raise EdetError(f"{label}: image too large ({w}x{h} = {w * h} pixels; the limit is {max_pixels})")
    img.load()
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _from_array(arr: np.ndarray, label: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or 0 in arr.shape:
        raise EdetError(f"{label}: expected an HxWx3 image array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise EdetError(f"{label}: expected a uint8 image array, got {arr.dtype}")
    return np.ascontiguousarray(arr[:, :, :3])


def letterbox(image: np.ndarray, size: int, fill: Sequence[float] = MEAN_RGB) -> Tuple[np.ndarray, float]:
    """Resize keeping aspect ratio (scale = min(S/h, S/w), bilinear) and pad bottom/right to S x S.
    Returns (uint8 SxSx3, scale); a box in the padded image divided by `scale` is in original pixels."""
    h, w = image.shape[:2]
    scale = min(size / h, size / w)
    nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
    out = np.empty((size, size, 3), np.uint8)
    out[...] = np.asarray(np.round(fill), np.uint8)
    resized = image if (nh, nw) == (h, w) else np.asarray(
        Image.fromarray(image).resize((nw, nh), Image.BILINEAR), np.uint8)
    out[:nh, :nw] = resized
    return out, scale


def preprocess(images: Iterable[ImageSource], size: int, max_pixels: int = MAX_IMAGE_PIXELS
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode and letterbox images into the graph input.
    Returns (batch uint8 [B,S,S,3], scales float32 [B], original sizes int32 [B,2] as (height, width))."""
    batch: List[np.ndarray] = []
    scales, sizes = [], []
    for src in images:
        img = decode_image(src, max_pixels)
        boxed, scale = letterbox(img, size)
        batch.append(boxed)
        scales.append(scale)
        sizes.append(img.shape[:2])
    if not batch:
        raise EdetError("no images given")
    return np.stack(batch), np.asarray(scales, np.float32), np.asarray(sizes, np.int32).reshape(-1, 2)
