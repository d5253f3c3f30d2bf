"""The metadata JSON that sits next to every exported graph and engine; every consumer reads it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

from .errors import EdetError
from .io import write_json

FORMAT = "edet-deploy/1"
ONNX_PROP = "edet_deploy"  # key of the copy kept in the ONNX model's metadata_props


def sidecar_path(artifact: str | os.PathLike) -> Path:
    p = Path(artifact)
    return p.with_suffix(".json")


def write_metadata(artifact: str | os.PathLike, meta: Dict[str, Any]) -> Path:
    path = sidecar_path(artifact)
    write_json(path, meta)
    return path


def read_metadata(artifact: str | os.PathLike, required: bool = True) -> Optional[Dict[str, Any]]:
    """Metadata of a graph or engine: the sidecar JSON, else (ONNX) the copy inside the model."""
    artifact = Path(artifact)
    side = sidecar_path(artifact)
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except ValueError as e:
            raise EdetError(f"{side}: invalid metadata JSON ({e})") from None
    elif artifact.suffix == ".onnx" and artifact.is_file():
        import onnx
        model = onnx.load(str(artifact), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        meta = json.loads(props[ONNX_PROP]) if ONNX_PROP in props else None
    else:
        meta = None
    if meta is None:
        if required:
            raise EdetError(f"no edet-deploy metadata for {artifact} (expected {side}); "
                            f"export the graph with `edet-deploy export`")
        return None
    if meta.get("format") != FORMAT:
        raise EdetError(f"{side}: unsupported metadata format {meta.get('format')!r} (expected {FORMAT})")
    return meta
