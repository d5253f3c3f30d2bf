"""Writing a detection graph: checked, its metadata embedded, graph and sidecar written atomically. Torch-free,
so that the exporter and the FP16/INT8 converters share it without the converters needing PyTorch."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Dict

from . import __version__
from .errors import EdetError
from .io import atomic_path
from .metadata import ONNX_PROP, ArtifactMetadata, sidecar_path, write_metadata

if TYPE_CHECKING:
    import onnx


@dataclass
class ExportResult:
    onnx_path: Path
    metadata_path: Path
    metadata: Dict


def check_graph(proto: "onnx.ModelProto") -> "onnx.ModelProto":
    """onnx.checker (full check, with our op's schema registered) and strict shape inference."""
    import onnx

    from .nms import op as nms_op

    nms_op.register_onnx_schema()
    try:
        onnx.checker.check_model(proto, full_check=True)
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise EdetError(f"exported graph fails the ONNX checker: {e}") from None


def save_graph(proto: "onnx.ModelProto", onnx_path: Path, meta: ArtifactMetadata) -> ExportResult:
    """Check, embed metadata, and write graph + sidecar atomically (nothing half-written on failure)."""
    from onnx import helper

    if sidecar_path(onnx_path) == Path(onnx_path):
        raise EdetError(f"{onnx_path}: that is the name of the graph's metadata JSON; name the graph .onnx")
    check_graph(proto)
    del proto.metadata_props[:]
    proto.producer_name, proto.producer_version = "edet-deploy", __version__
    meta = replace(meta, onnx_sha256=None)  # a source graph's checksum (convert) is stale
    helper.set_model_props(proto, {ONNX_PROP: json.dumps(meta.to_dict())})
    data = proto.SerializeToString()
    meta = replace(meta, onnx_sha256=hashlib.sha256(data).hexdigest())
    # Never a graph beside a sidecar of another export: drop the old sidecar first (until the new one lands,
    # readers use the copy embedded in the graph, which always matches it), then graph, then sidecar.
    sidecar = sidecar_path(onnx_path)
    try:
        sidecar.unlink(missing_ok=True)
        with atomic_path(onnx_path) as tmp:
            tmp.write_bytes(data)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(onnx_path)) from None  # the user's path, not a temporary one
    meta_path = write_metadata(onnx_path, meta)
    return ExportResult(onnx_path, meta_path, meta.to_dict())


def inline_external_data(graph: str | Path) -> bytes:
    """The bytes of `graph`, which keeps its weights in external data beside it, as one self-contained file: for
    copies that travel alone (a Triton repository holds model.onnx only). One line when the graph is too large
    for one file (2 GB, protobuf's limit)."""
    from onnx.external_data_helper import convert_model_from_external_data

    from .io import load_onnx

    full = load_onnx(graph)
    convert_model_from_external_data(full)  # data now inline: drop the location fields
    if full.ByteSize() >= 2 ** 31:
        raise EdetError(f"{graph} is over 2 GB with its external data: too large for one ONNX file")
    return full.SerializeToString()
