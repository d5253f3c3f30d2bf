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
