"""The embedded Triton server: the `tritonserver` binary (2.51) carried by the nvidia-pytriton wheel, with its
Python backend, run on CPU. Bound to 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..contract import CACHE_ENV, cache_dir
from ..errors import EdetError, EdetRuntimeError
from ..log import logger


@dataclass
class TritonPaths:
    binary: Path
    backends: Path
    libs: Path


# Another tritonserver than pytriton's (NVIDIA's image: /opt/tritonserver/bin/tritonserver, whose backends/ holds
# tensorrt and a python backend with the image's stub): `serve` is then the same supervisor on GPU as on CPU.
TRITONSERVER_ENV, BACKENDS_ENV = "EDET_TRITONSERVER", "EDET_TRITON_BACKENDS"
SYS_PATH_ENV = "EDET_DEPLOY_SYS_PATH"  # the stubs' extra sys.path entries (the generated model.py reads it)


def find_triton() -> TritonPaths:
    """Locate the tritonserver binary: $EDET_TRITONSERVER (backends in $EDET_TRITON_BACKENDS, else its
    ../backends), else nvidia-pytriton's, with a backend directory assembled for this Python."""
    if os.environ.get(TRITONSERVER_ENV):
        binary = Path(os.environ[TRITONSERVER_ENV])
        backends = Path(os.environ.get(BACKENDS_ENV) or binary.parent.parent / "backends")
        if not binary.is_file() or not os.access(binary, os.X_OK) or not (backends / "python").is_dir():
            raise EdetError(f"{TRITONSERVER_ENV}={binary} must be an executable tritonserver with a python backend "
                            f"under {backends} (set {BACKENDS_ENV} to its backends directory)")
        return TritonPaths(binary, backends, binary.parent.parent / "lib")
    try:
        import pytriton
    except ImportError:
        raise EdetError("the embedded Triton server needs nvidia-pytriton: pip install 'edet-deploy[serve]'") from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    binary = root / "bin" / "tritonserver"
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not binary.is_file() or not stub.is_file():
        raise EdetError(f"nvidia-pytriton at {root} lacks tritonserver or the Python {version} backend stub")
    # Triton expects <backend-dir>/python/{libtriton_python.so, triton_python_backend_utils.py, stub}. One
    # directory per install: two clones (two venvs) on one machine must not relink each other's stubs.
    install = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:10]
    backends = cache_dir() / f"triton-backends-{version}-{install}"
    python_dir = backends / "python"
    try:
        python_dir.mkdir(parents=True, exist_ok=True)
        for src in [*(root / "backends" / "python").iterdir(), stub]:
            if src.name == "__pycache__":
                continue
            dst = python_dir / src.name
            if not dst.exists() or dst.resolve() != src.resolve():
                # Made aside and renamed over: two servers starting at once never see a missing or half-made link.
                tmp = python_dir / f".{src.name}.{os.getpid()}.{secrets.token_hex(3)}"
                tmp.symlink_to(src)
                os.replace(tmp, dst)
    except OSError as e:
        raise EdetRuntimeError(f"cannot assemble Triton's backend folder {python_dir}: {e.strerror or e}; set "
                               f"{CACHE_ENV} to a writable folder") from None
    return TritonPaths(binary, backends, libs)


def server_env(paths: TritonPaths) -> dict:
    """The stubs are separate Python processes: give them this environment's packages (numpy < 2 included)
    and the project root, so `edet_deploy` imports there exactly as here."""
    import edet_deploy

    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(paths.libs), env.get("LD_LIBRARY_PATH")]))
    site = sysconfig.get_paths()["purelib"]
    project_root = str(Path(edet_deploy.__file__).resolve().parent.parent)
    env[SYS_PATH_ENV] = os.pathsep.join([project_root, site])  # read by the generated model.py
    # The models' cache (OpenVINO's compiled models) is ours, as an absolute path: the stubs run in "/", and a
    # home that could not be used means the fallback folder chosen here.
    env[CACHE_ENV] = str(cache_dir())
    # The CPUs this process may use (a container's cpuset), not the host's count.
    env.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                          else os.cpu_count() or 1))
    return env


# Triton's API groups (--http-restricted-api / --grpc-restricted-protocol, 2.51). Only inference, health and
# metadata stay open by default: the shared-memory API let two local requests abort the server, and
# model-repository would let any client load or unload models.
RESTRICTABLE_APIS = ("shared-memory", "model-config", "model-repository", "statistics", "trace", "logging")
ADMIN_HEADER = "edet-admin-key"
# Triton's exit timeout covers unloading the models too (the stubs' finalize: ~3 s here): with the grace period
# alone, `serve --grace-period 0` stopped with exit status 1 and no reason given.
UNLOAD_ALLOWANCE_S = 15
SHM_PREFIX = "edet_triton_"  # + serve's pid + "_": the Python backend names its /dev/shm regions with it


# The paths the Python-backend stubs see must be plain: Triton 2.51 starts each stub through
# `bash -c "exec STUB MODEL_PATH REGION ..."`, the paths unquoted, so a space (or a shell character) in the
# repository's or the backend folder's path split the command and every stub died parsing its arguments
# ("terminate called ... what(): stol"); and the stub embeds Python without setting a locale (file-system encoding
# ASCII, PYTHONUTF8 ignored), so a non-ASCII path on sys.path (a venv in "ünï cödé/") reached OpenVINO's bindings
# as surrogates and the engine's stub died in a pybind11 cast_error. Such paths are given as links from a plain
# folder; ':' is left out too (it separates EDET_DEPLOY_SYS_PATH's entries).
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_@%+=,./-]+")


def plain_path(path: str | Path) -> bool:
    """True when `path` is ASCII and passes through an unquoted shell word and a path list unchanged."""
    return bool(_PLAIN_PATH.fullmatch(str(path)))


LINKS_LOCK = ".lock"  # held (flock) by the server that made the folder, for as long as it uses it


def _remove_stale_link_folders(parent: str) -> None:
    """Our link folders that no server holds any more (a SIGKILLed serve cannot remove its own). Held means its
    lock is taken: unlike a pid, that holds across PID namespaces (containers sharing a /tmp)."""
    for folder in Path(parent).glob("edet-triton-*-*"):
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue
            fd = os.open(folder / LINKS_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # not ours, or not made yet (the lock comes right after the folder)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live server holds it
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)  # links only: rmtree removes them, never their targets


def _link_folder() -> Tuple[Path, int]:
    """A new private folder at a shell-safe path, for the links that stand in for unsafe paths, and the fd of
    its lock (held until the caller closes it)."""
    for parent in dict.fromkeys([tempfile.gettempdir(), "/tmp", "/dev/shm", "/var/tmp"]):
        if plain_path(parent) and os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK):
            _remove_stale_link_folders(parent)
            with contextlib.suppress(OSError):
                folder = Path(tempfile.mkdtemp(prefix=f"edet-triton-{os.getpid()}-", dir=parent))
                fd = os.open(folder / LINKS_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return folder, fd
    raise EdetRuntimeError("a path Triton's Python backend needs (repository, backends, environment, cache) holds "
                           "spaces, shell characters or non-ASCII letters, which it cannot take, and no writable "
                           "temporary folder without them exists for a link to it; move it (or set TMPDIR) to a "
                           "plain path")


# Error lines every CPU start logs (no CUDA driver): never the reason a start failed.
_NOT_ERRORS = ("CudaDriverHelper has not been initialized",)


class StartCancelled(Exception):
    """`TritonServer.start` was cancelled (a stop signal while the models loaded); the server is stopped."""


def port_in_use(address: str, port: int) -> bool:
    """True when something already listens on (address, port) or the port cannot be bound there."""
    with socket.socket() as s:
        s.settimeout(1.0)
        if s.connect_ex((address if address not in ("0.0.0.0", "") else "127.0.0.1", port)) == 0:
            return True
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton binds: TIME_WAIT is no conflict
        try:
            s.bind((address, port))
        except OSError:
            return True
    return False


def check_port(name: str, address: str, port: int) -> None:
    """Refuse a taken port in one line, before anything starts."""
    if port_in_use(address, port):
        raise EdetError(f"{name} port {port} on {address} is already in use; choose another (--{name}-port) or "
                        f"stop what listens there")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """preexec_fn: the kernel sends SIGKILL to tritonserver when the process that started it dies (even by
    SIGKILL, when no handler of ours can run); its Python stubs notice their parent is gone and exit."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class TritonServer:
    """Start `tritonserver` on a repository, wait until ready; `stop()` (or the context manager) shuts it down
    with SIGTERM (in-flight requests drain for up to `grace_period` s), reaps the Python stubs and removes
    the server's /dev/shm regions.

    Models are loaded with explicit model control so that only this process (holding `admin_key`) can
    unload/reload them (the supervisor does, after a stub dies); `open_apis` names restricted API groups to
    leave open to every client (default: none; "all" opens every group). `http_address` (default: `address`)
    and `grpc_address` let the HTTP and gRPC ports sit on loopback behind serve's fronts while metrics listen on
    `address`."""

    def __init__(self, repo: str | Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 address: str = "127.0.0.1", log_verbose: int = 0, extra_args: Optional[List[str]] = None,
                 log_file: Optional[str | Path] = None, grace_period: float = 30.0,
                 open_apis: Sequence[str] = (), force: bool = False, http_address: Optional[str] = None,
                 grpc_address: Optional[str] = None):
        from .verify import validate_repository, verify_served_repository

        self.repo = Path(repo)
        validate_repository(self.repo)
        verify_served_repository(self.repo, force=force)
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.address = address
        self.http_address = http_address or address
        self.grpc_address = grpc_address or address
        self.grace_period = float(grace_period)
        if self.grace_period < 0:
            raise EdetError(f"the grace period must be >= 0 s, got {grace_period}")
        opened = set(RESTRICTABLE_APIS) if "all" in open_apis else set(open_apis)
        unknown = opened - set(RESTRICTABLE_APIS)
        if unknown:
            raise EdetError(f"unknown API group(s) {sorted(unknown)}; choose from {', '.join(RESTRICTABLE_APIS)}, all")
        # The supervisor always needs model-repository; it sends the key, nobody else knows it.
        restricted = [a for a in RESTRICTABLE_APIS if a not in opened or a == "model-repository"]
        self.admin_key = secrets.token_hex(16)
        self.shm_prefix = f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(3)}_"
        paths = find_triton()
        restriction = f"{','.join(restricted)}:{ADMIN_HEADER}={self.admin_key}"
        self.binary, self.backends = paths.binary, paths.backends
        # What Triton is given: these paths, or plain links to them made by start() (see plain_path).
        self.real_backends = paths.backends
        self.triton_repo, self.triton_backends = self.repo.resolve(), paths.backends
        self.links: Optional[Path] = None
        self.links_lock: Optional[int] = None  # fd holding the link folder's lock while it is in use
        self.linked_env: Dict[str, str] = {}  # the environment's path variables as they were before linking
        self.fixed_args = [f"--grpc-address={self.grpc_address}", f"--metrics-address={address}", "--allow-metrics=true",
                           "--allow-gpu-metrics=false", "--strict-readiness=true", f"--log-verbose={log_verbose}",
                           "--model-control-mode=explicit",
                           f"--http-restricted-api={restriction}", f"--grpc-restricted-protocol={restriction}",
                           f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                           f"--exit-timeout-secs={int(math.ceil(self.grace_period)) + UNLOAD_ALLOWANCE_S}", *(extra_args or [])]
        self.env = server_env(paths)
        self.log_file = Path(log_file) if log_file else None
        self.proc: Optional[subprocess.Popen] = None
        self.excluded: Sequence[str] = ()  # models not to load at start (the supervisor refused their files)

    @property
    def cmd(self) -> List[str]:
        """The command line (ports as they are now: a restart may move the HTTP port)."""
        from .verify import model_dirs

        load = ["*"] if not self.excluded else [m for m in model_dirs(self.repo) if m not in self.excluded]
        return [str(self.binary), f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
                f"--metrics-port={self.metrics_port}", f"--http-address={self.http_address}",
                f"--model-repository={self.triton_repo}", f"--backend-directory={self.triton_backends}",
                *self.fixed_args, *(f"--load-model={m}" for m in load)]

    @property
    def http_url(self) -> str:
        return f"{self.http_address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.grpc_address}:{self.grpc_port}"

    @property
    def admin_headers(self) -> Dict[str, str]:
        return {ADMIN_HEADER: self.admin_key}

    def _link(self, name: str, target: str | Path) -> Path:
        """`target` itself when its path is plain, else a link to it in this server's link folder."""
        if plain_path(target):
            return Path(target)
        if self.links is None:
            self.links, self.links_lock = _link_folder()
        link = self.links / name
        link.symlink_to(target, target_is_directory=Path(target).is_dir())
        logger.debug("tritonserver's stubs see %s as %s (the path holds spaces, shell characters or non-ASCII "
                     "letters)", target, link)
        return link

    def _link_unsafe_paths(self) -> None:
        """Plain links for the repository, the backend folder, EDET_DEPLOY_SYS_PATH's entries and the caches
        when their paths are not plain (see plain_path). Removed again by stop()."""
        self.triton_repo = self._link("repository", self.repo.resolve())
        self.triton_backends = self._link("backends", self.real_backends)
        for key in (SYS_PATH_ENV, CACHE_ENV, "NUMBA_CACHE_DIR"):
            if key not in self.env:
                continue
            self.linked_env[key] = self.env[key]
            entries = self.env[key].split(os.pathsep) if key == SYS_PATH_ENV else [self.env[key]]
            self.env[key] = os.pathsep.join(str(self._link(f"{key.lower()}_{i}", p)) if p else p
                                            for i, p in enumerate(entries))

    def _remove_links(self) -> None:
        if self.links is not None:
            shutil.rmtree(self.links, ignore_errors=True)
            self.links = None
        if self.links_lock is not None:
            os.close(self.links_lock)
            self.links_lock = None
        self.triton_repo, self.triton_backends = self.repo.resolve(), self.real_backends
        self.env.update(self.linked_env)
        self.linked_env = {}

    def start(self, timeout: float = 180.0, cancel: Optional[threading.Event] = None) -> "TritonServer":
        """Start tritonserver and wait until it is ready. `cancel` (serve's stop event: its signal handlers only
        set it) ends the wait: the server is stopped and `StartCancelled` raised."""
        check_port("http", self.http_address, self.http_port)
        check_port("grpc", self.grpc_address, self.grpc_port)
        check_port("metrics", self.address, self.metrics_port)
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        logger.info("starting tritonserver (http %s:%d, grpc %s:%d, metrics %s:%d)", self.http_address,
                    self.http_port, self.grpc_address, self.grpc_port, self.address, self.metrics_port)
        try:
            self._link_unsafe_paths()
            # A new session: stop() can signal the server and every stub it forked.
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd="/", preexec_fn=_die_with_parent)
        except BaseException:
            self._remove_links()
            raise
        waiting = cancel or threading.Event()  # set by serve's signal handlers: ends the wait early
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    code = self.proc.returncode
                    # The stubs of the models that did load outlive a server that gave up on another one (Triton
                    # 2.51): end its whole process group and the regions, as stop() does.
                    self.stop()
                    raise EdetError(f"tritonserver exited with code {code} during start-up{self._log_tail()}")
                # Ready and still alive: the answer came from our server, not from another one on the port.
                if self.ready() and self.proc.poll() is None:
                    logger.info("tritonserver ready")
                    return self
                if waiting.wait(0.5):
                    raise StartCancelled("stopped while tritonserver started")
        except BaseException:  # Ctrl-C or SIGTERM while it starts: its stubs would outlive us under init
            from ..io import signals_deferred
            with signals_deferred():
                self.stop(timeout=5.0)
            raise
        self.stop()
        raise EdetError(f"tritonserver was not ready within {timeout:.0f} s{self._log_tail()}")

    def _log_tail(self) -> str:
        """The last error line of the server's log, on the same line (user errors are one line)."""
        if self.log_file and self.log_file.is_file():
            lines = [ln.strip() for ln in self.log_file.read_text(errors="replace").splitlines() if ln.strip()]
            # A stub that died (C++ exception) says so only in these two lines; the CPU build's CUDA line is noise.
            errors = [ln for ln in lines if (ln.startswith("E") and not any(n in ln for n in _NOT_ERRORS))
                      or ln.startswith(("terminate called", "what():"))] or lines[-1:]
            if len(errors) > 1 and errors[-1].startswith("what():"):
                return f": {errors[-2]} ({errors[-1]})"
            return f": {errors[-1]}" if errors else ""
        return " (see --log-file)"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def admin(self, path: str, body: Optional[bytes] = b"{}", timeout: float = 300.0) -> tuple:
        """POST (GET when body is None) to a restricted endpoint with the admin key: (status, body text)."""
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=body, headers=self.admin_headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def shm_regions(self) -> List[Path]:
        return sorted(Path("/dev/shm").glob(self.shm_prefix + "*"))

    def cleanup_shm(self) -> List[str]:
        """Remove what is left of this server's /dev/shm regions (unique prefix: no other server's)."""
        removed = []
        for region in self.shm_regions():
            try:
                region.unlink()
                removed.append(region.name)
            except FileNotFoundError:
                pass
        if removed:
            logger.info("removed %d leftover shared-memory region(s)", len(removed))
        return removed

    def stop(self, timeout: Optional[float] = None) -> Optional[int]:
        """SIGTERM to tritonserver (it refuses new requests and drains in-flight ones for up to the grace
        period), then SIGKILL for whatever of the process group is left; returns the server's exit status."""
        if self.proc is None:
            self._remove_links()
            return None
        if self.proc.poll() is None:
            wait = self.grace_period + 30.0 if timeout is None else timeout
            try:
                self.proc.send_signal(signal.SIGTERM)  # the server only: it stops its own stubs in order
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not stop within %.0f s; killing it", wait)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # Stubs left in the group (normally none): end them too. Then wait until none is left, so that
        # the regions they map are not recreated after cleanup.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.05)
        self.cleanup_shm()
        self._remove_links()
        logger.info("tritonserver stopped (exit status %s)", self.proc.returncode)
        return self.proc.returncode

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
