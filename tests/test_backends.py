"""The runner registry: every backend registers itself, options a runner does not take are refused in one line,
and the base class checks each batch before the runner sees it."""
import numpy as np
import pytest

from edet_deploy import EdetError
from edet_deploy.backends import BACKENDS, RUNNERS, Runner, bf16_options, create_runner


def test_registry_lists_every_backend():
    assert sorted(RUNNERS) == sorted(BACKENDS)
    assert all(issubclass(cls, Runner) and cls.name == name for name, cls in RUNNERS.items())
    assert RUNNERS["tensorrt"].__module__ == "edet_deploy.backends.tensorrt"


@pytest.mark.parametrize("backend, source", [("onnxruntime", {"onnx_path": "g.onnx"}),
                                             ("openvino", {"onnx_path": "g.onnx"}),
                                             ("tensorrt", {"engine_path": "m.plan"}),
                                             ("torch", {"model_name": "d0"})])
def test_unknown_option_refused_in_one_line(backend, source):
    with pytest.raises(EdetError) as e:
        create_runner(backend, **source, cuda_grpah=True)
    message = str(e.value)
    assert len(message.splitlines()) == 1 and "cuda_grpah" in message and backend in message


def test_another_backends_option_is_refused():
    """Once silently dropped: an OpenVINO option given to ONNX Runtime, an ONNX graph given to TensorRT."""
    with pytest.raises(EdetError, match="the onnxruntime backend has no option hint"):
        create_runner("onnxruntime", onnx_path="g.onnx", hint="LATENCY")
    with pytest.raises(EdetError, match="the tensorrt backend has no option onnx_path"):
        create_runner("tensorrt", onnx_path="g.onnx")


def test_missing_artifact_and_unknown_backend():
    with pytest.raises(EdetError, match="needs an engine"):
        create_runner("tensorrt")
    with pytest.raises(EdetError, match="needs a model name"):
        create_runner("torch")
    with pytest.raises(EdetError, match="unknown backend 'tflite'"):
        create_runner("tflite", onnx_path="g.onnx")


def test_bf16_is_one_rule():
    assert bf16_options("openvino") == {"inference_precision": "bf16"}
    with pytest.raises(EdetError, match="--bf16 runs on the openvino backend, not onnxruntime"):
        bf16_options("onnxruntime", "--bf16")


class Echo(Runner):
    name = "echo"

    def __init__(self):
        super().__init__({"image_size": 8, "batch": {"dynamic": True, "max": 2}})
        self.seen = []

    def infer_impl(self, images):
        self.seen.append(images)
        return {"images": images}


def test_infer_checks_the_batch_before_the_runner_sees_it():
    runner = Echo()
    with pytest.raises(EdetError, match="expected uint8"):
        runner.infer(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(EdetError, match="outside"):
        runner.infer(np.zeros((3, 8, 8, 3), np.uint8))
    assert runner.seen == []
    strided = np.zeros((1, 8, 16, 3), np.uint8)[:, :, ::2]
    runner.infer(strided)
    assert runner.seen[0].flags.c_contiguous


class NoDetections(Runner):
    """A detection graph that finds nothing: enough for Detector's own checks, and it counts its batches."""
    name = "nothing"

    def __init__(self):
        super().__init__({"image_size": 8, "batch": {"dynamic": True, "max": 2}, "nms": {"method": "gaussian"},
                          "mean": [0, 0, 0]})
        self.batches = 0

    def infer_impl(self, images):
        self.batches += 1
        b = len(images)
        return {"num_detections": np.zeros((b, 1), np.int32), "detection_boxes": np.zeros((b, 1, 4), np.float32),
                "detection_scores": np.zeros((b, 1), np.float32), "detection_classes": np.zeros((b, 1), np.int32)}


def test_the_api_refuses_the_numbers_the_cli_refuses():
    """min_score and threads in the Python API: one EdetError line when the call is made (before a graph is
    read or a model exported), over the ranges of --min-score and --threads."""
    from edet_deploy.backends.base import MAX_THREADS
    from edet_deploy.cli_args import FRACTION, THREADS
    from edet_deploy.detector import Detector
    assert (THREADS.lo, THREADS.hi) == (1, MAX_THREADS) and (FRACTION.lo, FRACTION.hi) == (0.0, 1.0)
    for bad in (float("nan"), float("inf"), -0.1, 1.5, "0.5", None, True):
        with pytest.raises(EdetError, match=r"^min_score must be a number in 0\.\.1, got ") as e:
            Detector.from_onnx("nowhere.onnx", min_score=bad)
        assert len(str(e.value).splitlines()) == 1
        with pytest.raises(EdetError, match="^min_score must be"):
            Detector(NoDetections(), min_score=bad)
    for bad in (0, 10**6, 2.5, "2", np.zeros((3, 3))):
        with pytest.raises(EdetError, match=r"^threads must be an integer in 1\.\.4096, got ") as e:
            Detector.from_model("d0", threads=bad)
        assert len(str(e.value).splitlines()) == 1
        with pytest.raises(EdetError, match="^threads must be"):
            create_runner("onnxruntime", onnx_path="nowhere.onnx", threads=bad)
    with pytest.raises(EdetError, match="^weights file not found: nope.pth$"):
        Detector.from_model("d0", weights="nope.pth")  # once a FileNotFoundError from the export cache's checksum
    assert Detector(NoDetections(), min_score=np.float32(0.5)).min_score == 0.5


@pytest.mark.parametrize("single", [np.zeros((8, 8, 3), np.uint8), "a.png", b"\x89PNG", bytearray(b"x"), 5, None])
def test_detect_refuses_one_image_given_for_a_list(single):
    """An array was run row by row (one result per row), a path letter by letter: now one line saying to pass a
    list, and nothing run."""
    from edet_deploy.detector import Detector
    runner = NoDetections()
    with pytest.raises(EdetError, match=r"^detect takes a list of images, got \w+: pass one image as \[image\]$"):
        Detector(runner).detect(single)
    assert runner.batches == 0


def test_detect_refuses_a_pil_image_given_for_a_list():
    from PIL import Image

    from edet_deploy.detector import Detector
    with pytest.raises(EdetError, match="^detect takes a list of images"):
        Detector(NoDetections()).detect(Image.new("RGB", (8, 8)))


def test_detect_checks_every_item_before_the_first_batch(tmp_path):
    from edet_deploy.detector import Detector
    runner = NoDetections()
    det = Detector(runner)
    image = np.zeros((8, 8, 3), np.uint8)
    assert [len(d) for d in det.detect([image, image, image])] == [0, 0, 0] and runner.batches == 2
    with open(tmp_path / "f.bin", "wb") as f:
        for bad, kind in ((None, "NoneType"), (2**62, "int"), (f, "BufferedWriter")):
            with pytest.raises(EdetError, match=rf"^images\[3\]: expected an image file path, encoded bytes, a PIL "
                                                rf"image or an HxWx3 uint8 array, got {kind}$"):
                det.detect([image, image, image, bad])
    assert runner.batches == 2


def test_a_closed_runner_refuses_in_one_line():
    runner = Echo()
    runner.infer(np.zeros((1, 8, 8, 3), np.uint8))
    runner.close()
    runner.close()  # twice is fine
    with pytest.raises(EdetError, match="^this echo runner is closed: create a new one to run inference$"):
        runner.infer(np.zeros((1, 8, 8, 3), np.uint8))
    assert len(runner.seen) == 1


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_every_cpu_runner_is_closed_alike(random_d0_256, backend):
    """OpenVINO's runner raised KeyError: 1 after close while ONNX Runtime's went on running: both refuse now,
    through a Detector and the runner's own calls alike, and `with` closes them."""
    from edet_deploy.detector import Detector
    image = np.zeros((64, 64, 3), np.uint8)
    with create_runner(backend, onnx_path=str(random_d0_256), threads=1) as runner:
        det = Detector(runner)
        assert len(det.detect([image])) == 1
    closed = f"^this {backend} runner is closed"
    with pytest.raises(EdetError, match=closed):
        det.detect([image])
    with pytest.raises(EdetError, match=closed):
        runner.infer(np.zeros((1, 256, 256, 3), np.uint8))
    if backend == "openvino":
        with pytest.raises(EdetError, match=closed):
            runner.property("PERFORMANCE_HINT")
