"""The embedded Triton server: the `tritonserver` binary (2.51) carried by the nvidia-pytriton wheel, with its
Python backend, run on CPU. Bound to 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from ..errors import EdetError
from ..log import logger


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers started by tests, benchmarks and the demo)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TritonPaths:
    binary: Path
    backends: Path
    libs: Path


def find_triton() -> TritonPaths:
    """Locate the tritonserver binary in nvidia-pytriton and assemble a backend directory for this Python."""
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
    # Triton expects <backend-dir>/python/{libtriton_python.so, triton_python_backend_utils.py, stub}.
    backends = Path(os.environ.get("EDET_DEPLOY_CACHE", Path.home() / ".cache" / "edet_deploy")) / f"triton-backends-{version}"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in [*(root / "backends" / "python").iterdir(), stub]:
        if src.name == "__pycache__":
            continue
        dst = python_dir / src.name
        if not dst.exists() or dst.resolve() != src.resolve():
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            dst.symlink_to(src)
    return TritonPaths(binary, backends, libs)


def server_env(paths: TritonPaths) -> dict:
    """The stubs are separate Python processes: give them this environment's packages (numpy < 2 included)
    and the project root, so `edet_deploy` imports there exactly as here."""
    import edet_deploy

    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(paths.libs), env.get("LD_LIBRARY_PATH")]))
    site = sysconfig.get_paths()["purelib"]
    project_root = str(Path(edet_deploy.__file__).resolve().parent.parent)
    env["EDET_DEPLOY_SYS_PATH"] = os.pathsep.join([project_root, site])  # read by the generated model.py
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


class TritonServer:
    """Start `tritonserver` on a repository, wait until ready; `stop()` (or the context manager) shuts it down
    with SIGTERM and reaps the Python stubs."""

    def __init__(self, repo: str | Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 address: str = "127.0.0.1", log_verbose: int = 0, extra_args: Optional[List[str]] = None,
                 log_file: Optional[str | Path] = None):
        from .repo import validate_repository

        self.repo = Path(repo)
        validate_repository(self.repo)
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.address = address
        paths = find_triton()
        self.cmd = [str(paths.binary), f"--model-repository={self.repo.resolve()}",
                    f"--backend-directory={paths.backends}", f"--http-port={http_port}",
                    f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}", f"--http-address={address}",
                    f"--grpc-address={address}", f"--metrics-address={address}", "--allow-metrics=true",
                    "--allow-gpu-metrics=false", "--strict-readiness=true", f"--log-verbose={log_verbose}",
                    "--exit-timeout-secs=5", *(extra_args or [])]
        self.env = server_env(paths)
        self.log_file = Path(log_file) if log_file else None
        self.proc: Optional[subprocess.Popen] = None

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    def start(self, timeout: float = 180.0) -> "TritonServer":
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        logger.info("starting tritonserver on %s (http %d, grpc %d, metrics %d)", self.address, self.http_port,
                    self.grpc_port, self.metrics_port)
        # A new session: stop() can signal the server and every stub it forked.
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd="/")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self._log_tail()
                raise EdetError(f"tritonserver exited with code {self.proc.returncode} during start-up{tail}")
            if self.ready():
                logger.info("tritonserver ready")
                return self
            time.sleep(0.5)
        self.stop()
        raise EdetError(f"tritonserver was not ready within {timeout:.0f} s{self._log_tail()}")

    def _log_tail(self) -> str:
        if self.log_file and self.log_file.is_file():
            lines = self.log_file.read_text(errors="replace").splitlines()[-15:]
            return ":\n" + "\n".join(lines)
        return ""

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        finally:
            try:  # stubs left in the group (normally none): end them too
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        logger.info("tritonserver stopped")

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
