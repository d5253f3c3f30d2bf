"""TensorRT 11: engine builder, soft-NMS plugin registration. TensorRT is imported lazily; without it every
entry point raises one clear EdetError (the CLI prints it and exits with code 2)."""
from __future__ import annotations

from ..errors import EdetError

INSTALL_HINT = ("TensorRT is not installed: it needs an NVIDIA GPU and driver; install it with "
                "`pip install 'edet-deploy[gpu]'` (tensorrt-cu13 >= 11) on such a machine")


def require_tensorrt():
    """Import and return the `tensorrt` module, or raise EdetError with how to install it."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or the bindings without their libraries (OSError)
        raise EdetError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from None
    major = int(trt.__version__.split(".")[0])
    if major < 11:
        raise EdetError(f"TensorRT {trt.__version__} found; edet-deploy needs TensorRT 11 (strongly typed networks)")
    return trt
