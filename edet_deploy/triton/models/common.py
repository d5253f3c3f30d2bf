"""Helpers shared by the Python-backend models (imported inside the Triton stub process)."""
from __future__ import annotations

import functools
import json
import os
import struct
import time
from typing import Dict, Optional

import numpy as np

from edet_deploy.contract import INPUT_NAME


def parameters(args: Dict) -> Dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def error_response(pb_utils, message: str):
    """A per-request 400-class error: the stub and the other requests carry on."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    err = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def as_bytes(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, np.ndarray):
        return value.tobytes()
    return str(value).encode()


# Each model instance keeps when its execute() began (CLOCK_MONOTONIC, shared by all processes; 0.0 while idle)
# in a memfd of its stub, which serve's supervisor reads through /proc/<stub>/fd. Why: with two instances of a
# model, one stuck in execute() leaves the other answering every canary, and the supervisor could not tell it
# from an idle one (both sleep). A memfd lives and dies with its process: nothing to clean up, ever.
EXEC_CLOCK_NAME = "edet_exec_clock"
_CLOCK = struct.Struct("<d")


def _is_clock(fd_path: str) -> bool:
    """Whether /proc/<pid>/fd/<n> is an execution clock (raises OSError when the fd is gone)."""
    return os.readlink(fd_path).startswith(f"/memfd:{EXEC_CLOCK_NAME}")


def find_exec_clock(pid: int) -> Optional[str]:
    """The /proc path of process `pid`'s execution clock, None when it has none (yet)."""
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except OSError:
        return None
    for name in names:
        try:
            if _is_clock(f"{fds}/{name}"):
                return f"{fds}/{name}"
        except OSError:
            continue
    return None


def read_exec_clock(path: str) -> float:
    """When the current execute() began (time.monotonic() of any process), 0.0 when idle or unreadable. `path`
    is checked to still be a clock (a pid reused) and read without blocking (pread fails on a pipe or socket)."""
    try:
        if not _is_clock(path):
            return 0.0
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            data = os.pread(fd, _CLOCK.size, 0)
        finally:
            os.close(fd)
    except OSError:
        return 0.0
    return _CLOCK.unpack(data)[0] if len(data) == _CLOCK.size else 0.0


class ExecClock:
    """The writer: two pwrite calls per execute(); without memfd (not Linux) nothing is kept."""

    def __init__(self):
        try:
            self.fd: Optional[int] = os.memfd_create(EXEC_CLOCK_NAME, os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            self.fd = None
        self.depth = 0
        self._write(0.0)

    def _write(self, value: float) -> None:
        if self.fd is not None:
            try:
                os.pwrite(self.fd, _CLOCK.pack(value), 0)
            except OSError:
                pass

    def enter(self) -> None:
        self.depth += 1
        if self.depth == 1:
            self._write(time.monotonic())

    def leave(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            self._write(0.0)


def _clocked_initialize(initialize):
    @functools.wraps(initialize)
    def wrapper(self, args):
        if getattr(self, "_exec_clock", None) is None:
            self._exec_clock = ExecClock()
        return initialize(self, args)
    return wrapper


def _clocked_execute(execute):
    @functools.wraps(execute)
    def wrapper(self, requests):
        clock = getattr(self, "_exec_clock", None)
        if clock is None:
            return execute(self, requests)
        clock.enter()  # once per outer call: a subclass's execute calling ours counts once
        try:
            return execute(self, requests)
        finally:
            clock.leave()
    return wrapper


class WatchedModel:
    """Base of the Python models: every initialize() / execute() of a subclass, its own or overridden further
    down (a user's wrapper of our model included), keeps the instance's execution clock."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "initialize" in cls.__dict__:
            cls.initialize = _clocked_initialize(cls.__dict__["initialize"])
        if "execute" in cls.__dict__:
            cls.execute = _clocked_execute(cls.__dict__["execute"])


class EngineModel(WatchedModel):
    """The `<name>_engine` Python model of CPU repositories: the exported ONNX graph (soft-NMS inside) in one
    of our CPU runners. Requests arriving together (dynamic batching) run as one batch. Subclasses say which
    runner (`make_runner`); the Triton module is imported lazily so that this file imports anywhere."""

    def make_runner(self, onnx_path: str, threads):  # pragma: no cover - overridden
        raise NotImplementedError

    @staticmethod
    def log(message: str) -> None:
        """One line in tritonserver's log (the stub's Logger), or on stderr outside the stub."""
        try:
            import triton_python_backend_utils as pb_utils
            pb_utils.Logger.log_info(message)
        except (ImportError, AttributeError):
            import sys
            print(message, file=sys.stderr)

    def initialize(self, args):
        import os
        params = parameters(args)
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        threads = int(params.get("threads", "0")) or None
        self.runner = self.make_runner(os.path.join(version_dir, params.get("onnx_file", "model.onnx")), threads)

    def run(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """The graph's outputs for `images` [B,S,S,3] uint8, in chunks of at most the runner's batch."""
        from edet_deploy.nms.op import OUTPUTS

        step = self.runner.max_batch
        chunks = [self.runner.infer(images[s:s + step]) for s in range(0, len(images), step)]
        return {k: np.concatenate([c[k] for c in chunks]) for k in OUTPUTS}

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        from edet_deploy.nms.op import OUTPUTS

        batches, counts = [], []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, INPUT_NAME).as_numpy()
            batches.append(images)
            counts.append(len(images))
        try:
            outputs = self.run(np.concatenate(batches))
        except Exception as e:  # noqa: BLE001 - fail these requests, keep the stub alive
            return [error_response(pb_utils, f"inference failed: {type(e).__name__}: {e}") for _ in requests]
        responses, start = [], 0
        for n in counts:
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(k, np.ascontiguousarray(outputs[k][start:start + n])) for k in OUTPUTS]))
            start += n
        return responses

    def finalize(self):
        self.runner.close()
