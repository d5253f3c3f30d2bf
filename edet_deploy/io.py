"""Small file helpers: atomic writes, checksums and the one ONNX reader."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .errors import EdetError

if TYPE_CHECKING:
    import onnx


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; results should read like any other file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_onnx(path: str | os.PathLike, external_data: bool = True) -> "onnx.ModelProto":
    """Read an ONNX graph, or raise one EdetError line saying why not (no such file, or not ONNX)."""
    import onnx

    path = Path(os.fsdecode(path))
    if not path.is_file():
        raise EdetError(f"ONNX graph not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=external_data)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own types for garbage files
        raise EdetError(f"cannot read {path} as an ONNX graph ({type(e).__name__})") from None
