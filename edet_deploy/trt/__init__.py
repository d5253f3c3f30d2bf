"""TensorRT 10.13 / 11.x: engine builder, soft-NMS plugin registration. TensorRT is imported lazily; without it
every entry point raises one clear EdetError (the CLI prints it and exits with code 2)."""
from __future__ import annotations

from ..errors import EdetError
from .versions import install_hint, series_of, supported_names

INSTALL_HINT = ("TensorRT is not installed: it needs an NVIDIA GPU and driver; install it on such a machine with "
                + install_hint())


def require_tensorrt():
    """Import and return the `tensorrt` module, or raise EdetError with how to install it."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or the bindings without their libraries (OSError)
        raise EdetError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from None
    if series_of(trt.__version__) is None:
        raise EdetError(f"TensorRT {trt.__version__} found; edet-deploy builds with TensorRT {supported_names()} "
                        f"(AOT plugins, strongly typed networks): {install_hint()}")
    return trt
