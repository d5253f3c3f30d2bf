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


# The sidecar key holding the artifact's own checksum, by file suffix.
CHECKSUM_KEYS = {".onnx": "onnx_sha256", ".plan": "plan_sha256", ".engine": "plan_sha256"}


def read_metadata(artifact: str | os.PathLike, required: bool = True, verify: bool = True) -> Optional[Dict[str, Any]]:
    """Metadata of a graph or engine: the sidecar JSON, else (ONNX) the copy inside the model.
    With `verify`, an artifact whose checksum differs from its sidecar's is refused (tampered, or a graph and
    sidecar from different exports)."""
    artifact = Path(artifact)
    side = sidecar_path(artifact)
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise EdetError(f"{side}: invalid metadata JSON ({e})") from None
        except OSError as e:
            raise EdetError(f"cannot read {side}: {e.strerror}") from None
        if not isinstance(meta, dict):
            raise EdetError(f"{side}: metadata must be a JSON object")
    elif artifact.suffix == ".onnx" and artifact.is_file():
        import onnx
        try:
            model = onnx.load(str(artifact), load_external_data=False)
            props = {p.key: p.value for p in model.metadata_props}
            meta = json.loads(props[ONNX_PROP]) if ONNX_PROP in props else None
        except Exception as e:  # noqa: BLE001 - protobuf raises its own types for garbage files
            raise EdetError(f"cannot read {artifact} as an ONNX graph ({type(e).__name__})") from None
    else:
        meta = None
    if meta is None:
        if required:
            raise EdetError(f"no edet-deploy metadata for {artifact} (expected {side}); "
                            f"export the graph with `edet-deploy export`")
        return None
    if meta.get("format") != FORMAT:
        raise EdetError(f"{side}: unsupported metadata format {meta.get('format')!r} (expected {FORMAT})")
    if verify and side.is_file():
        verify_checksum(artifact, meta)
    return meta


def verify_checksum(artifact: str | os.PathLike, meta: Dict[str, Any]) -> None:
    """Refuse an artifact whose sha256 differs from the one its metadata records."""
    from .io import sha256_file

    artifact = Path(artifact)
    key = CHECKSUM_KEYS.get(artifact.suffix)
    expected = meta.get(key) if key else None
    if expected is None or not artifact.is_file():
        return
    try:
        actual = sha256_file(artifact)
    except OSError as e:
        raise EdetError(f"cannot read {artifact}: {e.strerror}") from None
    if actual != expected:
        raise EdetError(f"{artifact} does not match its metadata {sidecar_path(artifact).name} ({key} "
                        f"{str(expected)[:12]}..., file {actual[:12]}...): tampered or from another export; "
                        f"export it again")
    if artifact.suffix == ".onnx":
        # The checksum covers the graph; the copy of the metadata embedded in it covers the sidecar's other
        # fields (class names, input size, NMS settings): an edited sidecar is refused, not believed.
        import onnx
        try:
            props = {p.key: p.value for p in onnx.load(str(artifact), load_external_data=False).metadata_props}
            embedded = json.loads(props[ONNX_PROP]) if ONNX_PROP in props else None
        except Exception as e:  # noqa: BLE001 - protobuf raises its own types for garbage files
            raise EdetError(f"cannot read {artifact} as an ONNX graph ({type(e).__name__})") from None
        if embedded is not None:
            changed = sorted(k for k in (set(embedded) | set(meta)) - {key} if embedded.get(k) != meta.get(k))
            if changed:
                raise EdetError(f"{sidecar_path(artifact)} disagrees with the metadata inside {artifact.name} "
                                f"({', '.join(changed[:5])}): edited by hand? export it again")
