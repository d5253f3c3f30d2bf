"""edet-deploy: export, optimise, serve and benchmark EfficientDet D0-D7x.

Importing the package is cheap and pulls in neither torch nor any optional dependency: the public names below
are resolved on first use, so the Triton Python models can import the numpy-only parts alone.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .configs import VARIANTS, get_config  # noqa: E402  (pure data)
from .errors import EdetError  # noqa: E402

_LAZY = {
    "create_model": "edet_deploy.model.efficientdet",
    "EfficientDet": "edet_deploy.model.efficientdet",
    "load_weights": "edet_deploy.model.weights",
    "save_weights": "edet_deploy.model.weights",
    "Detector": "edet_deploy.detector",
}

__all__ = ["VARIANTS", "get_config", "EdetError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edet_deploy' has no attribute {name!r}")
