"""`edet-deploy serve`: tritonserver under supervision.

Triton 2.51's Python backend does not restart a stub that died (SIGKILL, OOM killer): every later request to
that model fails with "Stub process ... is not healthy" while /v2/health/ready keeps answering 200. The
supervisor watches tritonserver's children (the stubs, one per model instance, named in their command line)
every `poll` seconds. When a stub is gone it

1. unloads the model through the model-repository API (explicit model control, restricted to our admin key):
   from that moment /v2/health/ready and the ensemble's ready endpoint answer 400, so a load balancer stops
   routing here; then
2. loads it again (fresh stubs, fresh shared memory); readiness returns to 200 when the model is READY.

A stub whose shared-memory region grew past a high-water mark (an oversized request is copied in before the
model can refuse it, and the region never shrinks) has its model's instances replaced without downtime, which
returns that memory, and tritonserver's own memory tied to those requests, to the baseline.

If tritonserver itself dies (it segfaults, e.g., on a large form-encoded POST body), it is started again on
the same ports. If a load or restart fails, or a model (or the server) needs more than `max_recoveries`
recoveries within `recovery_window` seconds, `serve` stops and exits non-zero with one line. SIGTERM, SIGINT and SIGHUP stop
it gracefully (see `TritonServer.stop`); the server dies with `serve` (PR_SET_PDEATHSIG)."""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

from ..errors import EdetError
from ..log import logger
from .server import TritonServer


class RecoveryFailed(Exception):
    """The server cannot be brought back: `serve` reports it on one line and exits non-zero."""


@dataclass(frozen=True)
class Stub:
    pid: int
    model: str
    instance: str
    region: str


def _proc_state(pid: int) -> Optional[str]:
    """State letter from /proc/<pid>/stat (R, S, Z, ...), None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _ppid(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def child_processes(parent: int) -> List[Tuple[int, List[bytes]]]:
    """Live (not zombie) children of `parent` with their full argv, read from /proc (never from `ps`, whose
    columns are cut to the terminal's width)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if _ppid(pid) != parent:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if _proc_state(pid) in (None, "Z", "X"):
            continue
        children.append((pid, argv))
    return children


def stub_processes(server_pid: int) -> List[Stub]:
    """Live (not zombie) Python-backend stubs of a tritonserver. Their argv is
    `stub <repo>/<model>/<version>/model.py <shm region> <sizes...> <parent pid> <lib dir> <ipc> <instance> ...`."""
    stubs = []
    for pid, argv in child_processes(server_pid):
        if len(argv) < 9 or not argv[0].endswith(b"triton_python_backend_stub"):
            continue
        model = Path(argv[1].decode(errors="replace")).parent.parent.name
        stubs.append(Stub(pid, model, argv[8].decode(errors="replace"), argv[2].decode(errors="replace")))
    return stubs


class Supervisor:
    """Keeps every model instance of a started `TritonServer` alive (see the module docstring)."""

    def __init__(self, server: TritonServer, poll: float = 0.25, load_timeout: float = 300.0,
                 max_recoveries: int = 5, recovery_window: float = 300.0, shm_high_water_mib: int = 128,
                 on_event: Optional[Callable[[str], None]] = None):
        self.server = server
        self.poll = poll
        self.load_timeout = load_timeout
        self.max_recoveries = max_recoveries
        self.recovery_window = recovery_window
        self.on_event = on_event or (lambda msg: logger.warning("%s", msg))
        self.expected: Dict[str, set] = {}  # model -> instance names that must have a live stub
        self.history: Dict[str, Deque[float]] = defaultdict(deque)
        self.recoveries: List[Dict] = []  # what happened, for reports and tests
        # Legitimate requests stay well below: <= 64 MiB of encoded images in, a D7 batch of 8 (54 MiB) out.
        self.shm_high_water = int(shm_high_water_mib) << 20
        self.recycled: set = set()
        self.generation = 0

    def snapshot(self) -> Dict[str, set]:
        """Record the instances alive now (call once the server is ready)."""
        expected: Dict[str, set] = defaultdict(set)
        for stub in stub_processes(self.server.proc.pid):
            expected[stub.model].add(stub.instance)
        self.expected = dict(expected)
        return self.expected

    def missing(self) -> Dict[str, List[str]]:
        """Instances (by model) whose stub is dead."""
        alive: Dict[str, set] = defaultdict(set)
        for stub in stub_processes(self.server.proc.pid):
            alive[stub.model].add(stub.instance)
        return {m: sorted(inst - alive[m]) for m, inst in self.expected.items() if inst - alive[m]}

    def recover(self, model: str, dead: Sequence[str]) -> float:
        """Unload (readiness drops) and load `model` again; returns the seconds it took."""
        t0 = time.monotonic()
        self._count(model, f"model {model} lost a stub")
        self.on_event(f"stub(s) {', '.join(dead)} of model {model} died; reloading {model}")
        status, body = self.server.admin(f"/v2/repository/models/{model}/unload", timeout=self.load_timeout)
        if status != 200:
            raise RecoveryFailed(f"cannot unload model {model} after its stub died: HTTP {status} {body.strip()}")
        status, body = self.server.admin(f"/v2/repository/models/{model}/load", timeout=self.load_timeout)
        if status != 200:
            raise RecoveryFailed(f"cannot reload model {model} after its stub died: HTTP {status} {body.strip()}")
        alive = {s.instance for s in stub_processes(self.server.proc.pid) if s.model == model}
        if not alive:
            raise RecoveryFailed(f"model {model} reloaded without any live stub")
        self.expected[model] = alive
        seconds = time.monotonic() - t0
        self.recoveries.append({"model": model, "dead": list(dead), "seconds": round(seconds, 3)})
        self.on_event(f"model {model} reloaded in {seconds:.1f} s")
        return seconds

    def _count(self, key: str, what: str) -> None:
        now = time.monotonic()
        window = self.history[key]
        while window and now - window[0] > self.recovery_window:
            window.popleft()
        if len(window) >= self.max_recoveries:
            raise RecoveryFailed(f"{what} {len(window) + 1} times within {self.recovery_window:.0f} s; giving up")
        window.append(now)

    def restart_server(self, code: int) -> float:
        """tritonserver itself died (a crash in its HTTP layer, the OOM killer): start it again on the same
        ports. Nothing listens meanwhile, so readiness probes fail."""
        t0 = time.monotonic()
        self._count("tritonserver", f"tritonserver exited unexpectedly (status {code})")
        self.on_event(f"tritonserver exited unexpectedly with status {code}; restarting it")
        self.server.stop()  # reaps what is left of its process group, removes its shared memory
        try:
            self.server.start(timeout=self.load_timeout)
        except EdetError as e:
            raise RecoveryFailed(f"tritonserver exited with status {code} and could not be restarted: {e}") from None
        self.snapshot()
        seconds = time.monotonic() - t0
        self.recoveries.append({"model": "tritonserver", "dead": [f"status {code}"], "seconds": round(seconds, 3)})
        self.on_event(f"tritonserver restarted in {seconds:.1f} s")
        return seconds

    def swollen(self) -> Dict[str, List[str]]:
        """Models whose stubs' shared-memory regions grew past `shm_high_water` bytes (an oversized request
        was copied in before the model could refuse it; Python-backend regions never shrink), by region."""
        found: Dict[str, List[str]] = defaultdict(list)
        for stub in stub_processes(self.server.proc.pid):
            if stub.region in self.recycled:
                continue
            try:
                size = (Path("/dev/shm") / stub.region).stat().st_blocks * 512
            except OSError:
                continue
            if size > self.shm_high_water:
                found[stub.model].append(stub.region)
        return dict(found)

    def recycle(self, model: str, regions: Sequence[str]) -> float:
        """Replace a model's instances without downtime: a load with a changed config (a generation
        parameter the models ignore) makes Triton start new instances, switch to them, then end the old ones,
        whose shared memory (and the server memory tied to their requests) goes with them."""
        t0 = time.monotonic()
        self.recycled.update(regions)  # the old stubs live on briefly: do not recycle them twice
        status, body = self.server.admin(f"/v2/models/{model}/config", None, timeout=self.load_timeout)
        if status != 200:
            raise RecoveryFailed(f"cannot read the config of model {model}: HTTP {status} {body.strip()}")
        config = json.loads(body)
        self.generation += 1
        config.setdefault("parameters", {})["edet_generation"] = {"string_value": str(self.generation)}
        self.on_event(f"model {model}'s shared memory grew past {self.shm_high_water >> 20} MiB; replacing its instances")
        status, body = self.server.admin(f"/v2/repository/models/{model}/load",
                                         json.dumps({"parameters": {"config": json.dumps(config)}}).encode(),
                                         timeout=self.load_timeout)
        if status != 200:
            raise RecoveryFailed(f"cannot reload model {model} to release its memory: HTTP {status} {body.strip()}")
        seconds = time.monotonic() - t0
        self.recoveries.append({"model": model, "recycled": list(regions), "seconds": round(seconds, 3)})
        return seconds

    def check_once(self) -> None:
        """One round: raise RecoveryFailed when the server or a model cannot be recovered."""
        code = self.server.proc.poll()
        if code is not None:
            self.restart_server(code)
            return
        for model, dead in self.missing().items():
            self.recover(model, dead)
        for model, regions in self.swollen().items():
            self.recycle(model, regions)

    def run(self, stop: threading.Event) -> None:
        """Watch until `stop` is set; raises RecoveryFailed."""
        if not self.expected:
            self.snapshot()
        while not stop.wait(self.poll):
            self.check_once()


def serve(repo: str | Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
          address: str = "127.0.0.1", log_file: Optional[str] = None, grace_period: float = 30.0,
          open_apis: Sequence[str] = (), force: bool = False, start_timeout: float = 300.0,
          announce: Callable[[str], None] = print) -> int:
    """Start, supervise and stop tritonserver; returns the exit status for `edet-deploy serve`:
    the server's own status after SIGTERM/SIGINT/SIGHUP (0 when it drained and stopped cleanly), 1 with one
    line on stderr when the server died or could not be recovered."""
    server = TritonServer(repo, http_port, grpc_port, metrics_port, address, log_file=log_file,
                          grace_period=grace_period, open_apis=open_apis, force=force)
    stop = threading.Event()
    received: List[int] = []

    def on_signal(signum, _frame):
        received.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a closed terminal sends SIGHUP
        signal.signal(sig, on_signal)
    try:
        server.start(timeout=start_timeout)
    except BaseException:
        server.stop()
        raise
    supervisor = Supervisor(server)
    supervisor.snapshot()
    announce(f"serving {repo}: http {server.http_url}, grpc {server.grpc_url}, metrics "
             f"http://{address}:{metrics_port}/metrics (supervised; Ctrl-C to stop)")
    sys.stdout.flush()
    failure: Optional[str] = None
    try:
        supervisor.run(stop)
    except RecoveryFailed as e:
        failure = str(e)
    finally:
        t0 = time.monotonic()
        status = server.stop()
        logger.info("stopped in %.1f s", time.monotonic() - t0)
    if failure:
        print(f"edet-deploy serve: error: {failure}", file=sys.stderr)
        return 1
    return 0 if status is None else (status if status >= 0 else 128 - status)
