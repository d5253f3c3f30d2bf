"""The metadata JSON that sits next to every exported graph and engine; every consumer reads it.

`ArtifactMetadata` is its one typed form: the exporter builds it (`build_metadata`), the FP16/INT8 converter
and the TensorRT builder derive theirs from their source's with `dataclasses.replace`, and every sidecar and
embedded copy is written from `to_dict()`. Readers may keep the plain dict of `read_metadata`, or take the
typed `read_artifact_metadata`."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Tuple

from .errors import EdetError
from .io import write_json

if TYPE_CHECKING:
    from .nms.settings import NmsSettings

FORMAT = "edet-deploy/1"
ONNX_PROP = "edet_deploy"  # key of the copy kept in the ONNX model's metadata_props


@dataclass(frozen=True, kw_only=True)
class ArtifactMetadata:
    """What a graph or engine is: model, preprocessing, outputs, NMS, precision, provenance and checksums.

    Field order is the JSON's key order. The fields from `source` on exist only for some artifacts (converted
    graphs, engines, checksummed sidecars) and are left out of the JSON while None; `extra` keeps keys this
    version does not know, so reading and rewriting a newer sidecar loses nothing."""

    format: str = FORMAT
    producer: str
    created: str
    variant: str
    image_size: int
    num_classes: int
    class_names: Tuple[str, ...]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    precision: str  # fp32, fp16, int8
    opset: Optional[int]  # None: no graph (the eager PyTorch reference)
    input: Dict[str, Any]  # name, dtype, layout, shape
    batch: Dict[str, Any]  # dynamic, max (and min, for engines)
    outputs: Tuple[str, ...]
    nms: Optional[Dict[str, Any]]  # NmsSettings.to_dict(); None for a graph that stops at the candidates
    pre_nms_top_k: int
    weights: Optional[Dict[str, Any]]  # path, sha256; None for random initialisation
    source: Optional[Dict[str, Any]] = None  # the FP32 graph a converted one came from (onnx, sha256)
    int8: Optional[Dict[str, Any]] = None  # calibration and Q/DQ report
    fp16: Optional[Dict[str, Any]] = None  # kept_fp32
    census: Optional[Dict[str, Any]] = None  # share of the multiply-adds per precision
    onnx_sha256: Optional[str] = None
    tensorrt: Optional[Dict[str, Any]] = None  # version, GPU, batch profile, io, build time, source graph
    plan_sha256: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """The JSON object (sequences as lists), keys in field order: what every writer writes."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.name in _ONLY_WHEN_SET):
                continue
            out[f.name] = _plain(value)
        out.update(_plain(self.extra))
        return out

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any]) -> "ArtifactMetadata":
        """The typed form of a metadata JSON object; an EdetError names the keys it lacks."""
        known = {f.name for f in fields(cls)} - {"extra"}
        missing = [name for name in _REQUIRED if name not in meta]
        if missing:
            raise EdetError(f"metadata lacks {', '.join(missing)}: export the graph again with `edet-deploy export`")
        values = {k: tuple(v) if k in _SEQUENCES and v is not None else _plain(v) for k, v in meta.items()
                  if k in known}
        return cls(**values, extra={k: _plain(v) for k, v in meta.items() if k not in known})


_ONLY_WHEN_SET = frozenset(f.name for f in fields(ArtifactMetadata)
                           if f.name != "extra" and f.default is None)
_REQUIRED = tuple(f.name for f in fields(ArtifactMetadata)
                  if f.name not in _ONLY_WHEN_SET and f.name not in ("extra", "format"))
_SEQUENCES = frozenset({"class_names", "mean", "std", "outputs"})


def _plain(value: Any) -> Any:
    """A copy made of JSON types only (tuples become lists), so no caller shares or mutates the dataclass's."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def build_metadata(*, variant: str, image_size: int, num_classes: int, class_names: Sequence[str],
                   mean: Sequence[float], std: Sequence[float], opset: Optional[int], batch: int,
                   dynamic_batch: Optional[int], outputs: Sequence[str], nms: Optional["NmsSettings"],
                   pre_nms_top_k: int, weights: Optional[str | os.PathLike]) -> ArtifactMetadata:
    """The metadata of a fresh FP32 export (the one place it is put together; derived artifacts `replace` it).
    `dynamic_batch` is the largest batch of a dynamic-batch graph, None for a fixed `batch`."""
    from . import __version__
    from .contract import INPUT_DTYPE, INPUT_LAYOUT, INPUT_NAME
    from .io import sha256_file

    return ArtifactMetadata(
        producer=f"edet-deploy {__version__}", created=time.strftime("%Y-%m-%dT%H:%M:%S"), variant=variant,
        image_size=image_size, num_classes=num_classes, class_names=tuple(class_names), mean=tuple(mean),
        std=tuple(std), precision="fp32", opset=opset,
        input={"name": INPUT_NAME, "dtype": INPUT_DTYPE, "layout": INPUT_LAYOUT,
               "shape": ["batch" if dynamic_batch else batch, image_size, image_size, 3]},
        batch={"dynamic": bool(dynamic_batch), "max": dynamic_batch or batch}, outputs=tuple(outputs),
        nms=nms.to_dict() if nms is not None else None, pre_nms_top_k=pre_nms_top_k,
        weights={"path": str(weights), "sha256": sha256_file(weights)} if weights else None)


def sidecar_path(artifact: str | os.PathLike) -> Path:
    p = Path(artifact)
    return p.with_suffix(".json")


def write_metadata(artifact: str | os.PathLike, meta: ArtifactMetadata) -> Path:
    """Write `artifact`'s sidecar (atomically) from its typed metadata."""
    path = sidecar_path(artifact)
    write_json(path, meta.to_dict())
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
        meta = _embedded_metadata(artifact)
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


def _embedded_metadata(graph: Path) -> Optional[Dict[str, Any]]:
    """The copy of the metadata inside an ONNX graph (None: it has none)."""
    from .io import load_onnx

    props = {p.key: p.value for p in load_onnx(graph, external_data=False).metadata_props}
    try:
        return json.loads(props[ONNX_PROP]) if ONNX_PROP in props else None
    except ValueError as e:
        raise EdetError(f"{graph}: invalid embedded metadata JSON ({e})") from None


def read_artifact_metadata(artifact: str | os.PathLike, verify: bool = True) -> ArtifactMetadata:
    """`read_metadata` in typed form, for writers deriving an artifact from this one (and readers that want it)."""
    return ArtifactMetadata.from_dict(read_metadata(artifact, verify=verify))


def verify_checksum(artifact: str | os.PathLike, meta: Dict[str, Any]) -> None:
    """Refuse an artifact whose sha256 differs from the one its metadata records."""
    from .io import sha256_file

    artifact = Path(artifact)
    key = CHECKSUM_KEYS.get(artifact.suffix)
    if key is None or not artifact.is_file():
        return
    expected = meta.get(key)
    if not isinstance(expected, str):
        # Every sidecar we write records its artifact's checksum; one without it was written or edited by hand,
        # and believing it would skip both checks below.
        redo = "export" if artifact.suffix == ".onnx" else "build"
        raise EdetError(f"{sidecar_path(artifact)} has no {key} for {artifact.name}: not as edet-deploy wrote it; "
                        f"{redo} it again")
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
        embedded = _embedded_metadata(artifact)
        if embedded is not None:
            changed = sorted(k for k in (set(embedded) | set(meta)) - {key} if embedded.get(k) != meta.get(k))
            if changed:
                raise EdetError(f"{sidecar_path(artifact)} disagrees with the metadata inside {artifact.name} "
                                f"({', '.join(changed[:5])}): edited by hand? export it again")
