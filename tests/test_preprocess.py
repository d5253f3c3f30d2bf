import io

import numpy as np
import pytest
from PIL import Image

from conftest import encode
from edet_deploy import EdetError
from edet_deploy.configs import MEAN_RGB
from edet_deploy.postprocess import split_detections, to_original_pixels
from edet_deploy.preprocess import decode_image, letterbox, preprocess


def test_letterbox_scale_and_padding():
    img = np.full((100, 200, 3), 200, np.uint8)
    out, scale = letterbox(img, 128)
    assert scale == pytest.approx(0.64) and out.shape == (128, 128, 3)
    assert (out[:64] == 200).all()  # resized content: 200 * 0.64 = 128 columns, 64 rows
    assert (out[64:] == np.round(MEAN_RGB).astype(np.uint8)).all()  # bottom padding with the mean colour
    tall, s2 = letterbox(np.zeros((300, 30, 3), np.uint8), 60)
    assert s2 == pytest.approx(0.2) and (tall[:, 6:] == np.round(MEAN_RGB).astype(np.uint8)).all()


def test_decode_modes_and_sources(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode(rgb, "PNG")), rgb)
    path = tmp_path / "x.png"
    path.write_bytes(encode(rgb, "PNG"))
    np.testing.assert_array_equal(decode_image(path), rgb)
    gray = decode_image(encode(rgb[:, :, 0], "PNG"))
    assert gray.shape == (20, 30, 3)
    rgba = decode_image(Image.fromarray(np.dstack([rgb, rgb[:, :, :1]]), "RGBA"))
    np.testing.assert_array_equal(rgba, rgb)
    assert decode_image(encode(rgb, "JPEG")).shape == (20, 30, 3)


@pytest.mark.parametrize("data,match", [
    (b"", "empty"),
    (b"hello, I am text", "not a decodable image"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 20, "corrupt|not a decodable"),
])
def test_bad_bytes(data, match):
    with pytest.raises(EdetError, match=match):
        decode_image(data)


def test_truncated_png():
    data = encode(np.zeros((64, 64, 3), np.uint8), "PNG")
    with pytest.raises(EdetError):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_refused_before_decoding():
    # A tiny file that declares a huge image: the header is enough to refuse it.
    big = encode(np.zeros((1, 1, 3), np.uint8), "PNG")
    with pytest.raises(EdetError, match="too large"):
        decode_image(big, max_pixels=0)
    img = Image.new("L", (20000, 20000))  # 400 MP declared, a few KB encoded
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    with pytest.raises(EdetError, match="too large"):
        decode_image(buf.getvalue())


def test_missing_file():
    with pytest.raises(EdetError, match="not found"):
        decode_image("/nonexistent/x.jpg")


def test_reverse_mapping_and_clipping():
    batch, scales, sizes = preprocess([np.zeros((100, 200, 3), np.uint8)], 128)
    assert batch.shape == (1, 128, 128, 3) and sizes.tolist() == [[100, 200]]
    boxes = np.array([[[64, 32, 96, 48], [-10, -10, 200, 200]]], np.float32)
    out = to_original_pixels(boxes, scales, sizes)
    np.testing.assert_allclose(out[0, 0], [100, 50, 150, 75])
    np.testing.assert_allclose(out[0, 1], [0, 0, 200, 100])  # clipped to the image
    dets = split_detections({"num_detections": np.array([[1]]), "detection_boxes": boxes,
                             "detection_scores": np.array([[0.9, 0.5]]), "detection_classes": np.array([[2, 0]])},
                            scales, sizes, ["a", "b", "c"])
    assert len(dets[0]) == 1 and dets[0].to_records()[0]["label"] == "c"


def test_exif_orientation_applied():
    # Stored 40 wide x 20 high with orientation 6 (rotate 90 CW to display): displayed 20 wide x 40 high.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = 255  # a white band on the stored left edge ends up on the displayed top
    img = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(buf.getvalue())
    assert out.shape == (40, 20, 3)
    assert out[:8].mean() > 200 and out[-20:].mean() < 50
    _, _, sizes = preprocess([buf.getvalue()], 64)
    assert sizes.tolist() == [[40, 20]]  # boxes come back in the displayed frame


def test_16bit_and_float_scaled_not_clipped():
    ramp = np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)
    for fmt in ("PNG", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(ramp).save(buf, format=fmt)
        out = decode_image(buf.getvalue())
        np.testing.assert_array_equal(out[:, :, 0], np.round(ramp / 257.0).astype(np.uint8))
    buf = io.BytesIO()
    Image.fromarray((ramp / 65535.0).astype(np.float32)).save(buf, format="TIFF")
    out = decode_image(buf.getvalue())
    assert out[0, 0, 0] == 0 and out[15, 15, 0] == 254 and out.dtype == np.uint8


def test_palette_gif_webp_bmp_first_frame():
    rgb = np.random.default_rng(1).integers(0, 255, (12, 18, 3), dtype=np.uint8)
    for fmt in ("BMP", "WEBP"):
        assert decode_image(encode(rgb, fmt)).shape == (12, 18, 3)
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)).convert("P") for v in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buf.getvalue()).mean() < 50  # the first frame


@pytest.mark.parametrize("fmt", ["PCX", "TGA", "PPM"])
def test_formats_outside_the_allowlist_refused(fmt):
    data = encode(np.zeros((8, 8, 3), np.uint8), fmt)
    with pytest.raises(EdetError, match="not a decodable image"):
        decode_image(data)


def test_request_pixel_budget_checked_from_headers():
    from edet_deploy.preprocess import check_request_pixels, open_image
    big = io.BytesIO()
    Image.new("L", (5000, 4000)).save(big, format="PNG")  # 20 MP each, under the per-image limit
    opened = [open_image(big.getvalue()) for _ in range(6)]
    assert all(im._im is None for im in opened)  # nothing decoded yet
    with pytest.raises(EdetError, match="request too large"):
        check_request_pixels(opened)
    assert check_request_pixels(opened[:2]) == 40_000_000


def _png(width: int, height: int, rows: bytes, interlace: int = 0, depth: int = 8, colour: int = 2) -> bytes:
    """A PNG file around `rows` (filter byte + pixels per row, Adam7 order when interlaced), as written: Pillow
    writes no interlaced PNGs and never a short one."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) +
            chunk(b"IEND", b""))


def _adam7_rows(arr: np.ndarray) -> bytes:
    from edet_deploy.preprocess import _ADAM7
    h, w = arr.shape[:2]
    return b"".join(b"\x00" + arr[y, x0::dx].tobytes()
                    for x0, y0, dx, dy in _ADAM7 if x0 < w for y in range(y0, h, dy))


def test_png_whose_pixel_data_ends_early_is_refused(tmp_path):
    """Pillow decodes a PNG whose compressed data ends on a row boundary before the last row and leaves the rest
    black: 90-odd bytes declaring 4800x4800 with one row went through detection (a server answered 200). It is
    refused as a truncated JPEG is, from bytes, a path, a PIL image and the Triton model's open-then-decode."""
    from edet_deploy.preprocess import open_image, to_rgb
    one_row = _png(4800, 4800, b"\x00" + bytes(4800 * 3))
    assert len(one_row) < 120
    truncated = r"corrupt image \(image file is truncated: its pixel data ends after 14401 of 69124800 bytes\)"
    with pytest.raises(EdetError, match=rf"^bytes: {truncated}$"):
        decode_image(one_row)
    (tmp_path / "one_row.png").write_bytes(one_row)
    with pytest.raises(EdetError, match=truncated):
        decode_image(tmp_path / "one_row.png")
    with Image.open(tmp_path / "one_row.png") as img, pytest.raises(EdetError, match=truncated):
        decode_image(img)
    with pytest.raises(EdetError, match=rf"^IMAGE\[0\]: {truncated}$"):
        to_rgb(open_image(one_row, name="IMAGE[0]"), "IMAGE[0]")


def test_interlaced_png_counted_pass_by_pass():
    arr = np.random.default_rng(0).integers(0, 255, (13, 11, 3), dtype=np.uint8)
    rows = _adam7_rows(arr)
    np.testing.assert_array_equal(decode_image(_png(11, 13, rows, interlace=1)), arr)
    last_pass_row = 1 + 11 * 3
    with pytest.raises(EdetError, match="image file is truncated: its pixel data ends after 421 of 455 bytes"):
        decode_image(_png(11, 13, rows[:-last_pass_row], interlace=1))


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "RGBA", "I;16"])
def test_complete_pngs_of_every_bit_depth_pass_the_row_count(mode):
    rgb = np.random.default_rng(1).integers(0, 255, (7, 13, 3), dtype=np.uint8)
    img = Image.fromarray(rgb).convert(mode) if mode != "I;16" else \
        Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert decode_image(buf.getvalue()).shape == (7, 13, 3)


def test_corrupt_exif_is_one_debug_line_not_pillows_warnings(caplog):
    """Pillow warned on stderr in several lines per bad EXIF field of an image that decodes fine."""
    import logging
    import warnings
    caplog.set_level(logging.DEBUG, logger="edet_deploy")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="JPEG")
    payload = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05"  # an IFD that claims 5 entries and has none
    data = buf.getvalue()
    data = data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert decode_image(data).shape == (8, 8, 3)
    assert caught == []
    lines = [r.getMessage() for r in caplog.records if "EXIF" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("bytes: Corrupt EXIF data") and "\n" not in lines[0]
    assert [r.levelname for r in caplog.records] == ["DEBUG"]


@pytest.mark.parametrize("src,kind", [(None, "NoneType"), (2**62, "int"), (3.5, "float"), ([b"\x89PNG"], "list")])
def test_what_is_no_image_is_named_before_it_is_read(src, kind):
    """An int n was passed to bytes(), which allocates n bytes, before the image was refused."""
    with pytest.raises(EdetError, match=rf"^{kind}: expected an image file path, encoded bytes, a PIL image or an "
                                        rf"HxWx3 uint8 array, got {kind}$"):
        decode_image(src)


def test_a_file_object_is_no_image(tmp_path):
    (tmp_path / "x.png").write_bytes(encode(np.zeros((4, 4, 3), np.uint8), "PNG"))
    with open(tmp_path / "x.png", "rb") as f, pytest.raises(EdetError, match="got BufferedReader$"):
        preprocess([f], 64)
