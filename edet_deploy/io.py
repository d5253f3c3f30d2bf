"""Small file helpers: atomic writes, checksums and the one ONNX reader."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Dict, Iterator, List, Optional, Tuple

from .errors import EdetError, EdetRuntimeError, first_few

if TYPE_CHECKING:
    import onnx


# A write that failed for want of room: whichever file the library was writing at the time (a source it copied
# from, a temporary name), the error names the user's output.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _naming(e: OSError, path: Path) -> OSError:
    return OSError(e.errno, e.strerror, str(path))


# The signals that stop a command (Ctrl-C, `kill`, a closed terminal): held while a write is made visible or undone.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP for the block (a few renames that make a write visible, or undo it, or
    remove a temporary copy): one that arrives meanwhile is delivered when the block ends, so it never stops a
    commit or its cleanup halfway (an output half moved into place, a staging folder left behind). Signals are
    Python's to handle only in the main thread; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: List[int] = []
    previous = {}
    try:
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if pending:
            signal.raise_signal(pending[0])  # the handler now in place acts on it (KeyboardInterrupt, exit)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds. A failure,
    Ctrl-C or SIGTERM (handled by the CLI) removes the temporary file; one during the rename waits for it."""
    path = Path(path)
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        # The rename would replace a device (/dev/null, as root) or a named pipe with a plain file.
        raise EdetError(f"{path} is a device, pipe or socket, not a file: give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o666 & ~_umask()  # mkstemp makes 0600 files; results should read like any other file
    tmp = None
    try:
        # A name of up to 255 bytes must stay writable: the temporary one keeps at most 64 characters of it.
        # Errors name `path`, the user's, not the temporary file.
        with signals_deferred():  # never a temporary file made but not yet known to the cleanup below
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp", dir=path.parent)
            except OSError as e:
                raise _naming(e, path) from None
            os.close(fd)
            os.chmod(tmp, mode)
        try:
            yield Path(tmp)
        except OSError as e:
            if e.errno in NO_ROOM or (e.errno is not None and e.filename is None):
                raise _naming(e, path) from None
            raise
        with signals_deferred():
            with contextlib.suppress(FileNotFoundError):
                os.chmod(tmp, mode)  # again: some writers (safetensors) replace the file with a 0600 one of their own
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise _naming(e, path) from None
    except BaseException:
        if tmp is not None:
            with signals_deferred(), contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def top_entries(root: Path) -> Iterator[str]:
    yield from sorted(child.name for child in root.iterdir())


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, replaced: Collection[str] = (),
                     entries: Callable[[Path], Iterator[str]] = top_entries,
                     last: Optional[Callable[[Path, Optional[Path]], None]] = None) -> Iterator[Path]:
    """Yield an empty directory to build a set of files in; when the block succeeds, each of its `entries`
    (relative paths; default: its top-level files and folders) takes the place of the same entry in `out`, the
    `replaced` entries of `out` go, and everything else in `out` stays. A failure or Ctrl-C inside the block, or
    while the entries move, leaves `out` as it was; an error for want of room names `out`.

    The staging directory lies on `out`'s filesystem, so the entries move by renames: beside `out` when there is
    none yet (the whole directory is renamed into place), else hidden inside it, which also holds where `out` is
    a mount point (a container's volume) that cannot itself be renamed. A symlinked `out` stays a link.
    `last(stage, out)` runs just before the entries move, while no other command commits into `out` (None for an
    `out` made new): a file that describes the whole of `out` (a manifest) is written there."""
    target = Path(os.path.realpath(out))
    if target.exists() and not target.is_dir():
        raise EdetError(f"{out} is a file, not a directory")
    fresh = not target.exists()
    home = target.parent if fresh else target
    stage = None
    try:
        with signals_deferred():  # never a staging folder made but not yet known to the cleanup below
            try:
                home.mkdir(parents=True, exist_ok=True)
                stage = Path(tempfile.mkdtemp(prefix=f".{target.name[:64]}." if fresh else STAGING_PREFIXES[0],
                                              suffix=".tmp", dir=home))
                os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700; when renamed into place it is `out`
            except OSError as e:
                raise _naming(e, Path(out)) from None
        try:
            yield stage
        except OSError as e:
            if e.errno in NO_ROOM:
                raise _naming(e, Path(out)) from None
            if not stage.is_dir() or _inside(e, stage):  # removed under us (`rm -r out` while the command ran)
                raise EdetRuntimeError(_VANISHED.format(out=out)) from None
            raise
        if fresh:
            with signals_deferred():  # a Ctrl-C or SIGTERM now waits for the rename
                if os.path.lexists(target) and not _empty_folder(target):  # another command made `out` meanwhile
                    raise EdetRuntimeError(f"{out} appeared while this command wrote it (another command writing "
                                           f"it at the same time?); left as it is, nothing written: run it again")
                if last is not None:
                    last(stage, None)
                os.rename(stage, target)
        else:
            if not target.is_dir():
                raise EdetRuntimeError(_VANISHED.format(out=out))
            # The lock is waited for before signals are held: a Ctrl-C still ends a wait on a stopped holder.
            with _commit_lock(target), signals_deferred():  # then the entries move (or are put back) whole
                if not stage.is_dir() or not target.is_dir():
                    raise EdetRuntimeError(_VANISHED.format(out=out))
                if last is not None:
                    last(stage, target)
                _move_locked(stage, target, list(entries(stage)), replaced)
    finally:
        if stage is not None:
            with signals_deferred():
                shutil.rmtree(stage, ignore_errors=True)  # gone already when renamed into place


def _empty_folder(path: Path) -> bool:
    """An empty real folder, which the rename may replace (what another command had made of `out` is kept)."""
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def _inside(e: OSError, stage: Path) -> bool:
    """`e` says that a path inside `stage` is missing: the staging folder, which only this command writes, was
    removed (or is being removed) by someone else."""
    name = os.fsdecode(e.filename) if isinstance(e.filename, (str, bytes, os.PathLike)) else ""
    return e.errno == errno.ENOENT and (name == str(stage) or name.startswith(str(stage) + os.sep))


_VANISHED = ("{out} was removed or replaced while this command wrote it (another command writing it at the same "
             "time?); nothing written: run it again")


STAGING_PREFIXES = (".edet-staging.", ".edet-replaced.")  # hidden folders of a command writing into a directory


def is_staging_entry(name: str) -> bool:
    """Whether `name` (an entry of an output directory) is the working folder of a command writing it now."""
    return name.startswith(STAGING_PREFIXES) and name.endswith(".tmp")


@contextlib.contextmanager
def _commit_lock(target: Path) -> Iterator[None]:
    """Two commands committing into one `target` at once: one after the other (flock on the folder; a
    filesystem without locks commits as before)."""
    lock = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)


def _move_locked(stage: Path, target: Path, written: List[str], replaced: Collection[str]) -> None:
    trash = Path(tempfile.mkdtemp(prefix=STAGING_PREFIXES[1], suffix=".tmp", dir=target))
    done: List[Tuple[Path, Path]] = []  # (from, to) renames made, to undo
    made: List[Path] = []  # parent folders created for nested entries
    try:
        for i, entry in enumerate(sorted(set(written) | set(replaced))):
            if os.path.lexists(target / entry):
                os.rename(target / entry, trash / str(i))
                done.append((target / entry, trash / str(i)))
        for entry in written:
            parent = (target / entry).parent
            if not parent.exists():
                parent.mkdir(parents=True)
                made.append(parent)
            os.rename(stage / entry, target / entry)
            done.append((stage / entry, target / entry))
    except BaseException:
        for source, moved in reversed(done):
            os.rename(moved, source)
        for parent in reversed(made):
            with contextlib.suppress(OSError):
                parent.rmdir()
        with contextlib.suppress(OSError):
            trash.rmdir()  # empty again; never a recursive delete of what may still be `out`'s
        raise
    shutil.rmtree(trash, ignore_errors=True)


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path when it names a file, else one line saying what it is instead: nothing given, a folder,
    or nothing there (`what`: "image", "ONNX graph", "weights file", ...)."""
    text = os.fsdecode(path)
    if not text.strip():
        raise EdetError(f"no {what} given (an empty path)")
    path = Path(text)
    a = "an" if what[0] in "aeiouAEIOU" else "a"
    if path.is_dir():
        raise EdetError(f"{path} is a folder, not {a} {what}")
    if not path.is_file():
        if path.exists():  # /dev/zero, a named pipe: reading it would never end or never start
            raise EdetError(f"{path} is a device, pipe or socket, not {a} {what} file")
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
        # A graph re-saved with its weights in a side file, moved without it: ONNX says only "ValidationError".
        raise EdetError((missing_external_data(path) if external_data else None)
                        or f"cannot read {path} as an ONNX graph ({type(e).__name__})") from None


def external_data_files(proto: "onnx.ModelProto") -> List[str]:
    """The external data files (relative locations) a graph loaded without its external data names, in order;
    [] for a one-file graph. Graphs over 2 GB keep their weights there (onnx.save_model(...,
    save_as_external_data=True)); ours never do, but a graph re-saved that way is still ours."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    found: Dict[str, None] = {}
    for tensor in _get_all_tensors(proto):
        if uses_external_data(tensor):
            found.setdefault(ExternalDataInfo(tensor).location, None)
    return list(found)


def missing_external_data(graph: str | Path, proto: Optional["onnx.ModelProto"] = None) -> Optional[str]:
    """One line saying which external data files `graph` names that are not beside it (None: none missing, or
    the graph cannot be read at all: its own error says so)."""
    if proto is None:
        import onnx

        try:
            proto = onnx.load(str(graph), load_external_data=False)
        except Exception:  # noqa: BLE001 - not ONNX at all: the caller's error stands
            return None
    base = Path(graph).parent
    missing = [loc for loc in external_data_files(proto) if not (base / loc).is_file()]
    if not missing:
        return None
    return (f"{graph} keeps its weights in external data ({first_few(missing)}) that is not beside it in "
            f"{base}: put the file back next to the graph under that name (the graph records it), or re-save "
            f"the graph as one file")
