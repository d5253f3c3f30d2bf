import io

import numpy as np
import pytest
from PIL import Image

from edet_deploy import EdetError
from edet_deploy.configs import MEAN_RGB
from edet_deploy.postprocess import split_detections, to_original_pixels
from edet_deploy.preprocess import decode_image, letterbox, preprocess


def encode(arr, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


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
    np.testing.assert_array_equal(decode_image(encode(rgb)), rgb)
    path = tmp_path / "x.png"
    path.write_bytes(encode(rgb))
    np.testing.assert_array_equal(decode_image(path), rgb)
    gray = decode_image(encode(rgb[:, :, 0]))
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
    data = encode(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(EdetError):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_refused_before_decoding():
    # A tiny file that declares a huge image: the header is enough to refuse it.
    big = encode(np.zeros((1, 1, 3), np.uint8))
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
