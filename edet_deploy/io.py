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
    # A name of up to 255 bytes must stay writable: the temporary one keeps at most 64 characters of it. Errors
    # name `path`, the user's, not the temporary file.
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask  # mkstemp makes 0600 files; results should read like any other file
    os.chmod(tmp, mode)
    try:
        yield Path(tmp)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, mode)  # again: some writers (safetensors) replace the file with a 0600 one of their own
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path when it names a file, else one line saying what it is instead: nothing given, a folder,
    or nothing there (`what`: "image", "ONNX graph", "weights file", ...)."""
    text = os.fsdecode(path)
    if not text.strip():
        raise EdetError(f"no {what} given (an empty path)")
    path = Path(text)
    if path.is_dir():
        raise EdetError(f"{path} is a folder, not a{'n' if what[0] in 'aeiouAEIOU' else ''} {what}")
    if not path.is_file():
        raise EdetError(f"{what} not found: {path}")
    return path


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

    path = existing_file(path, "ONNX graph")
    if path.stat().st_size == 0:  # onnx.load reads 0 bytes as an empty model, which fails later, obscurely
        raise EdetError(f"{path} is empty (0 bytes): not an ONNX graph")
    try:
        return onnx.load(str(path), load_external_data=external_data)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own types for garbage files
        raise EdetError(f"cannot read {path} as an ONNX graph ({type(e).__name__})") from None
