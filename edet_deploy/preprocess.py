"""Image decoding and letterboxing, written once for every backend and the Triton Python models.

numpy and Pillow only (no torch). Output is what the detection graph takes: uint8 RGB, resized keeping the
aspect ratio with scale = min(S/h, S/w) (bilinear), padded bottom/right to S x S with the mean colour.
The mean colour is the variant's (VariantConfig.mean, carried by every graph's metadata as `mean`): callers
pass `fill=meta["mean"]` so that the padding normalises to zero for D0 (ImageNet mean) and Lite (127.5) alike.
"""
from __future__ import annotations

import contextlib
import io
import os
import struct
import warnings
import zlib
from typing import Iterable, Iterator, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .configs import MEAN_RGB
from .errors import EdetError
from .io import existing_file
from .log import logger

# Bounded cost per image and per request, checked from the headers before any pixel is decoded
# (decompression-bomb protection: a few KB of PNG can declare gigapixels).
MAX_IMAGE_PIXELS = 6000 * 4000  # 24 MP: larger photos buy nothing at EfficientDet's <= 1536 px input
MAX_REQUEST_PIXELS = 100_000_000  # all images of one request together
MAX_ENCODED_BYTES = 64 * 1024 * 1024
# Pillow may open only these (some of the formats it knows call external programs or have fragile parsers).
# GIF (and animated WebP/TIFF): the first frame.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")

def image_suffixes() -> frozenset:
    """The file name suffixes of the formats this module decodes (.jpg, .jpeg, .png, .webp, .tif, ...): what a
    folder of images given for calibration is searched for."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in ALLOWED_FORMATS)


ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Image.Image]
IMAGE_SOURCE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Image.Image)
# PNG's colour types -> samples per pixel (grey, RGB, palette, grey + alpha, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7 interlacing: (first column, first row, column step, row step) of each of the seven passes.
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def check_source(src: object, label: str) -> None:
    """One line when `src` is no kind of image this module reads (None, a number, an open file...): before
    anything is read or allocated from it (bytes(n) of an int n would allocate n bytes)."""
    if not isinstance(src, IMAGE_SOURCE_TYPES):
        raise EdetError(f"{label}: expected an image file path, encoded bytes, a PIL image or an HxWx3 uint8 "
                        f"array, got {type(src).__name__}")


def _read_source(src: ImageSource, label: str) -> bytes:
    check_source(src, label)
    if isinstance(src, (str, os.PathLike)):
        path = existing_file(src, "image")
        try:
            if path.stat().st_size > MAX_ENCODED_BYTES:
                raise EdetError(f"{path}: file larger than {MAX_ENCODED_BYTES >> 20} MiB")
            data = path.read_bytes()
        except OSError as e:
            raise EdetError(f"cannot read {path}: {e.strerror}") from None
    else:
        data = bytes(src)
    if not data:
        raise EdetError(f"{label}: empty image data")
    if len(data) > MAX_ENCODED_BYTES:
        raise EdetError(f"{label}: encoded image larger than {MAX_ENCODED_BYTES >> 20} MiB")
    return data


def open_image(src: ImageSource, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None) -> Image.Image:
    """Open encoded bytes or a file lazily: format and size come from the header, nothing is decoded yet.
    Refuses formats outside ALLOWED_FORMATS and images above `max_pixels`."""
    label = name or (str(src) if isinstance(src, (str, os.PathLike)) else type(src).__name__)
    data = _read_source(src, label)
    try:
        with _pillow_warnings(label):
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise EdetError(f"{label}: image too large (decompression-bomb protection: {e})") from None
    except UnidentifiedImageError:
        raise EdetError(f"{label}: not a decodable image (accepted: {', '.join(ALLOWED_FORMATS)})") from None
    except (OSError, ValueError, SyntaxError, struct.error) as e:  # truncated or corrupt header
        raise EdetError(f"{label}: corrupt image ({e})") from None
    _check_size(img, label, max_pixels)
    return img


def _check_size(img: Image.Image, label: str, max_pixels: int) -> int:
    w, h = img.size  # from the header: checked before any pixel is decoded
    if w <= 0 or h <= 0:
        raise EdetError(f"{label}: image has no pixels")
    if w * h > max_pixels:
        raise EdetError(f"{label}: image too large ({w}x{h} = {w * h} pixels; the limit is {max_pixels})")
    return w * h


def check_request_pixels(images: Sequence[Image.Image], max_request_pixels: int = MAX_REQUEST_PIXELS) -> int:
    """Refuse a request whose opened (not yet decoded) images declare more pixels together than the budget."""
    total = sum(img.size[0] * img.size[1] for img in images)
    if total > max_request_pixels:
        raise EdetError(f"request too large: its {len(images)} image(s) declare {total} pixels together; "
                        f"the limit is {max_request_pixels}")
    return total


def decode_image(src: ImageSource, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None) -> np.ndarray:
    """Decode a file path, encoded bytes, a PIL image or an HxWx3 / HxW array into uint8 RGB HxWx3.

    The EXIF orientation is applied: the result (and every box computed on it) is in the frame a viewer
    displays, not the stored one. 16-bit and float images are scaled to 8 bits; grayscale, palette and alpha
    images become RGB (alpha dropped)."""
    label = name or (str(src) if isinstance(src, (str, os.PathLike)) else type(src).__name__)
    check_source(src, label)
    if isinstance(src, np.ndarray):
        return _from_array(src, label)
    if isinstance(src, Image.Image):
        _check_size(src, label, max_pixels)
        return to_rgb(src, label)
    return to_rgb(open_image(src, max_pixels, label), label)


def to_rgb(img: Image.Image, label: str = "image") -> np.ndarray:
    """Decode an opened image (first frame) into uint8 RGB in its displayed orientation."""
    try:
        png = _encoded_png(img)  # now: once decoded, Pillow lets go of the file
        with _pillow_warnings(label):
            img.load()
            if png is not None:
                _check_png_complete(png, label)
            img = ImageOps.exif_transpose(img)
    except EdetError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise EdetError(f"{label}: image too large (decompression-bomb protection: {e})") from None
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as e:  # truncated or corrupt data
        raise EdetError(f"{label}: corrupt image ({e})") from None
    return _pil_to_rgb(img, label)


@contextlib.contextmanager
def _pillow_warnings(label: str) -> Iterator[None]:
    """Pillow at work with DecompressionBombWarning an error (the caller refuses the image) and its other warnings
    (corrupt EXIF data: one multi-line warning per bad field, the image still decoded as stored) one debug line:
    `detect` decodes an image up to three times, a server once per request."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield
    if caught:
        more = f" (and {len(caught) - 1} more warning(s))" if len(caught) > 1 else ""
        logger.debug("%s: %s%s", label, " ".join(str(caught[0].message).split()), more)


def _encoded_png(img: Image.Image) -> bytes | None:
    """The encoded file of a PNG image not decoded yet (None for other formats, or a PNG already loaded)."""
    fp = getattr(img, "fp", None)
    if img.format != "PNG" or fp is None:
        return None
    if isinstance(fp, io.BytesIO):  # what open_image makes
        return fp.getvalue()
    try:
        where = fp.tell()
        fp.seek(0)
        data = fp.read(MAX_ENCODED_BYTES + 1)
        fp.seek(where)
    except (OSError, ValueError, AttributeError):  # not a file we can read twice: decoded as Pillow does
        return None
    return data


def _check_png_complete(data: bytes, label: str) -> None:
    """Refuse a PNG whose compressed pixel data ends before its last row. Pillow decodes it without a word and
    leaves the missing rows black (libImaging/ZipDecode.c has that check commented out): 93 bytes could declare
    4800x4800 pixels and bring one row. The data is inflated once more here, in pieces, and only counted."""
    if data[12:16] != b"IHDR" or len(data) < 33:
        return  # not at the start of the file: nothing to count against (Pillow has read the header already)
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    bits = depth * _PNG_CHANNELS.get(colour, 0)
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    expected = 0  # each row: a filter byte, then its pixels packed to whole bytes
    for x0, y0, dx, dy in passes:
        cols, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if cols > 0 and rows > 0:
            expected += rows * (1 + (cols * bits + 7) // 8)
    inflate, got, pos, in_idat = zlib.decompressobj(), 0, 8, False
    while pos + 8 <= len(data) and got < expected and not inflate.eof:
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind != b"IDAT" and in_idat:
            break  # the image data is one run of IDAT chunks
        if kind == b"IDAT":
            in_idat, chunk = True, data[pos + 8:pos + 8 + length]
            while chunk and got < expected and not inflate.eof:
                try:
                    got += len(inflate.decompress(chunk, 1 << 20))
                except zlib.error:
                    return  # not what Pillow decoded without an error: not ours to judge
                chunk = inflate.unconsumed_tail
        pos += 12 + length
    if got < expected:
        raise EdetError(f"{label}: corrupt image (image file is truncated: its pixel data ends after {got} of "
                        f"{expected} bytes)")


def _pil_to_rgb(img: Image.Image, label: str) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Scale, never clip: Pillow's own I/F -> RGB conversion clips 16-bit values at 255.
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif mode == "I":  # 32-bit integer; PNG/TIFF 16-bit grayscale arrives in this mode too
            top = float(arr.max()) if arr.size else 0.0
            arr = arr / 257.0 if top > 255 and top <= 65535 else (arr * (255.0 / top) if top > 65535 else arr)
        else:  # float: [0, 1] is the usual convention, else values are taken as 0..255
            finite = arr[np.isfinite(arr)]
            top = float(finite.max()) if finite.size else 0.0
            arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0) * (255.0 if top <= 1.0 else 1.0)
        gray = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode != "RGB":
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
    # Padding row by row from one pre-tiled row: broadcasting the 3-value colour over [S,S,3] is a strided
    # inner loop of 3 (0.5 ms of a 1.6 ms letterbox at 256 px on a 2-core EPYC); whole rows copy like memcpy.
    out.reshape(size, size * 3)[:] = np.tile(np.asarray(np.round(fill), np.uint8), size)
    resized = image if (nh, nw) == (h, w) else np.asarray(
        Image.fromarray(image).resize((nw, nh), Image.BILINEAR), np.uint8)
    out[:nh, :nw] = resized
    return out, scale


def preprocess(images: Iterable[ImageSource], size: int, max_pixels: int = MAX_IMAGE_PIXELS,
               fill: Sequence[float] = MEAN_RGB) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode and letterbox images into the graph input (original size = the displayed, EXIF-rotated frame).
    Returns (batch uint8 [B,S,S,3], scales float32 [B], original sizes int32 [B,2] as (height, width))."""
    batch: List[np.ndarray] = []
    scales, sizes = [], []
    for src in images:
        img = decode_image(src, max_pixels)
        boxed, scale = letterbox(img, size, fill)
        batch.append(boxed)
        scales.append(scale)
        sizes.append(img.shape[:2])
    if not batch:
        raise EdetError("no images given")
    return np.stack(batch), np.asarray(scales, np.float32), np.asarray(sizes, np.int32).reshape(-1, 2)
