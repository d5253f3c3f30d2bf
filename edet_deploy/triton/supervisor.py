"""`edet-deploy serve`: tritonserver under supervision, behind the HTTP front (`front.py`) and the gRPC front
(`grpc_front.py`), both reading what the supervisor knows from one `Upstream`.

Triton 2.51's Python backend does not restart a stub that died (SIGKILL, OOM killer), and a stub that is stopped
or deadlocked fails every request ("Stub process ... is not healthy") or never answers, while Triton's
/v2/health/ready keeps answering 200. The supervisor watches tritonserver's children (the stubs, one per model
instance, named in their command line) every `poll` seconds and tells the front (`Upstream`) what it sees:

- a stub gone: the model and the ensembles running it are marked down (the front answers their readiness and
  their requests with 503 + Retry-After), the model is unloaded and loaded again through the model-repository
  API (explicit model control, restricted to our admin key), then marked up;
- a stub stopped (/proc state T) or hung (a canary request to each model with stubs, sent only when none of its
  requests succeeded lately, fails with "is not healthy", or times out while that model completed nothing else
  and its stubs used almost no CPU: a deadlocked stub sleeps in state S and looks healthy to Triton, a slow one
  computes; or one instance sits in one execute() call, by its execution clock, using almost no CPU, while
  another instance answers the canary): SIGKILL, then as above;
- a stub whose shared-memory region grew past a high-water mark (an oversized request is copied in before the
  model can refuse it, and the region never shrinks): its model's instances are replaced without downtime;
- before any reload (of a model, or of the whole server): the model's files are checked against the repository's
  manifest (`verify.model_problems`); a model whose files changed is not loaded: it and its ensembles stay down
  (not ready) with one log line naming the file, and are loaded once the files check out again (re-signed or put
  back; checked every `recheck` s);
- tritonserver dead (any cause), an admin call failing, or a model needing more than `max_recoveries`
  recoveries within `recovery_window` s: tritonserver is (killed and) started again after a backoff that
  doubles from `backoff[0]` to `backoff[1]` s and resets once it has run `stable_after` s, for as long as
  `serve` runs.

SIGTERM, SIGINT and SIGHUP stop `serve`: the fronts stop accepting and lets requests in flight finish within the
grace period, then tritonserver is stopped (see `TritonServer.stop`); it dies with `serve` (PR_SET_PDEATHSIG)."""
from __future__ import annotations

import contextlib
import http.client
import io
import json
import math
import os
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Callable, Deque, Dict, List, NamedTuple, Optional, Sequence, Tuple

from .. import contract
from ..errors import EdetError
from ..io import STOP_SIGNALS
from ..log import logger
from ..measure import free_port
from .configs import MAX_IN_FLIGHT
from .front import Front, ModelInfo, Upstream, repository_models
from .models.common import find_exec_clock, read_exec_clock
from .grpc_front import GrpcFront
from .server import StartCancelled, TritonServer, check_port, port_in_use
from .verify import drop_bytecode, model_problems, refusal


class InCall(NamedTuple):
    """A stub seen inside one execute() call: what `Supervisor.find_stuck_instances` keeps between rounds."""
    began: float  # the call's start, by the instance's execution clock
    cpu: float  # the stub's CPU seconds when the call was first seen
    seen_at: float
    active: bool  # a thread of the stub seen running, waiting for a CPU or in I/O since


class ServerLost(Exception):
    """tritonserver stopped answering its admin API, or a model cannot be recovered: restart the server."""


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


def _cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time (user + system) the processes `pids` have used so far; gone ones count 0."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def _threads_active(pid: int) -> bool:
    """Whether a thread of `pid` is running or waiting to run (R) or in uninterruptible I/O (D): a stub starved
    of CPU (a small CPU quota, a loaded machine) or reading from a cold disk is working, not deadlocked."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any(_proc_state(int(t)) in ("R", "D") for t in tasks if t.isdigit())


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


UNHEALTHY_STUB = re.compile(r"Stub process '([^']+)' is not healthy")


def canary_request(info: ModelInfo) -> Optional[Tuple[bytes, int]]:
    """A small valid request for a model (binary tensor extension both ways): (body, JSON length), or None when
    an input's datatype is one the canary cannot make. BYTES: a 16 x 16 grey PNG; numbers: zeros, 16 for a
    variable dim. The batch (first) dim is 1 for a model that batches."""
    from PIL import Image

    inputs, blobs = [], []
    for name, datatype, dims in info.inputs:
        shape = [*([1] if info.max_batch_size else []), *(16 if d < 0 else d for d in dims)]
        if datatype == "BYTES":
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (128, 128, 128)).save(buf, format="PNG")
            blob = (len(buf.getvalue()).to_bytes(contract.BYTES_LENGTH_PREFIX, "little") + buf.getvalue()) \
                * math.prod(shape)
        elif datatype in contract.FIXED_DATATYPE_BYTES:
            blob = bytes(math.prod(shape) * contract.FIXED_DATATYPE_BYTES[datatype])
        else:
            return None
        inputs.append({"name": name, "shape": shape, "datatype": datatype,
                       "parameters": {contract.BINARY_DATA_SIZE: len(blob)}})
        blobs.append(blob)
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    return header + b"".join(blobs), len(header)


class Supervisor:
    """Keeps every model instance of a started `TritonServer` alive and answering (see the module docstring),
    and `upstream` (what the front reads) truthful."""

    def __init__(self, server: TritonServer, upstream: Optional[Upstream] = None, poll: float = 0.25,
                 load_timeout: float = 300.0, max_recoveries: int = 5, recovery_window: float = 300.0,
                 shm_high_water_mib: int = 128, backoff: Tuple[float, float] = (0.5, 30.0),
                 stable_after: float = 60.0, canary_interval: float = 1.0, canary_timeout: float = 3.0,
                 busy_cpu: float = 0.1, recheck: float = 5.0, on_event: Optional[Callable[[str], None]] = None):
        self.server = server
        self.upstream = upstream or Upstream(server.http_address, server.http_port, repository_models(server.repo),
                                             server.grpc_port)
        self.poll = poll
        self.load_timeout = load_timeout
        self.max_recoveries = max_recoveries
        self.recovery_window = recovery_window
        self.backoff, self.delay, self.stable_after = backoff, backoff[0], stable_after
        self.canary_interval, self.canary_timeout = canary_interval, canary_timeout
        # A canary that timed out while the ensemble's stubs used this much CPU met a slow model, not a hung one.
        self.busy_cpu = busy_cpu
        self.on_event = on_event or (lambda msg: logger.warning("%s", msg))
        self.expected: Dict[str, set] = {}  # model -> instance names that must have a live stub
        self.history: Dict[str, Deque[float]] = defaultdict(deque)
        self.recoveries: List[Dict] = []  # what happened, for reports and tests
        # Legitimate requests stay well below: <= 64 MiB of encoded images in, a D7 batch of 8 (54 MiB) out.
        self.shm_high_water = int(shm_high_water_mib) << 20
        self.recycled: set = set()
        self.generation = 0
        self.epoch = 0  # server starts: a canary verdict from an earlier server is void
        self.started_at = time.monotonic()
        self.refused: Dict[str, str] = {}  # model -> why its files may not be loaded
        self.recheck, self.rechecked = recheck, time.monotonic()
        self.hung: "SimpleQueue[Tuple[str, Optional[str], str]]" = SimpleQueue()  # (model, instance, why)
        self.clocks: Dict[int, str] = {}  # stub pid -> its execution clock (/proc/<pid>/fd/<n>)
        self.executing: Dict[int, InCall] = {}  # stub pid -> the call it was seen in
        self.stop = threading.Event()

    def snapshot(self) -> Dict[str, set]:
        """Record the instances alive now (call once the server is ready); the front may route to it."""
        expected: Dict[str, set] = defaultdict(set)
        for stub in stub_processes(self.server.proc.pid):
            expected[stub.model].add(stub.instance)
        self.expected = {m: inst for m, inst in expected.items() if m not in self.refused}
        self.upstream.port, self.upstream.grpc_port = self.server.http_port, self.server.grpc_port
        self.upstream.down = self._refused_closure()
        self.upstream.up = True
        return self.expected

    def missing(self) -> Dict[str, List[str]]:
        """Instances (by model) whose stub is dead."""
        alive: Dict[str, set] = defaultdict(set)
        for stub in stub_processes(self.server.proc.pid):
            alive[stub.model].add(stub.instance)
        return {m: sorted(inst - alive[m]) for m, inst in self.expected.items() if inst - alive[m]}

    def _admin(self, what: str, path: str, body: Optional[bytes] = b"{}") -> str:
        """An admin call; any failure (refused, reset mid-call, non-200) is ServerLost."""
        try:
            status, text = self.server.admin(path, body, timeout=self.load_timeout)
        except (OSError, http.client.HTTPException) as e:
            raise ServerLost(f"{what}: {type(e).__name__} {e}".strip()) from None
        if status != 200:
            raise ServerLost(f"{what}: HTTP {status} {text.strip()}")
        return text

    def _refused_closure(self) -> frozenset:
        """The refused models and every ensemble running one: down until their files check out."""
        return frozenset().union(*(self.upstream.dependents(m) for m in self.refused))

    def _verified(self, model: str) -> bool:
        """Check `model`'s files before (re)loading it; a failure refuses it (see `refuse`)."""
        problem = model_problems(self.server.repo, [model]).get(model)
        if problem:
            self.refuse(model, problem)
        else:
            drop_bytecode(self.server.repo, [model])
        return problem is None

    def refuse(self, model: str, problem: str) -> None:
        """Keep `model` and its ensembles down and unloaded, with one log line naming the file."""
        if model not in self.refused:
            self.on_event(f"model {model} is not loaded: {refusal(self.server.repo, problem)}")
        self.refused[model] = problem
        self.expected.pop(model, None)
        self.upstream.down = self.upstream.down | self._refused_closure()
        # Unloaded, so that Triton's own health (gRPC goes to it directly) says not ready, ensembles first.
        for name in sorted(self.upstream.dependents(model), key=lambda m: m == model):
            self._admin(f"cannot unload model {name}", f"/v2/repository/models/{name}/unload")

    def readmit(self) -> None:
        """Every `recheck` s: load the refused models whose files check out again, then their ensembles."""
        if not self.refused or time.monotonic() - self.rechecked < self.recheck:
            return
        self.rechecked = time.monotonic()
        problems = model_problems(self.server.repo, list(self.refused))
        for model in [m for m in self.refused if m not in problems]:
            del self.refused[model]
            drop_bytecode(self.server.repo, [model])
            self.on_event(f"model {model}'s files check out again; loading it")
            self._admin(f"cannot load model {model}", f"/v2/repository/models/{model}/load")
            for name in sorted(self.upstream.dependents(model) - {model} - self._refused_closure()):
                self._admin(f"cannot load model {name}", f"/v2/repository/models/{name}/load")
            self.expected[model] = {s.instance for s in stub_processes(self.server.proc.pid) if s.model == model}
            self.upstream.down = (self.upstream.down - self.upstream.dependents(model)) | self._refused_closure()

    def _mark_down(self, models: Sequence[str]) -> frozenset:
        affected = frozenset().union(*(self.upstream.dependents(m) for m in models))
        self.upstream.down = self.upstream.down | affected  # a new set: the front reads it from another thread
        return affected

    def recover(self, model: str, dead: Sequence[str]) -> float:
        """Mark down, unload and load `model` again, mark up; returns the seconds it took."""
        t0 = time.monotonic()
        affected = self._mark_down([model])
        try:
            if not self._count(model):
                raise ServerLost(f"model {model} lost a stub more than {self.max_recoveries} times within "
                                 f"{self.recovery_window:.0f} s")
            self.on_event(f"stub(s) {', '.join(dead)} of model {model} died; reloading {model}")
            if not self._verified(model):
                return time.monotonic() - t0
            self._admin(f"cannot unload model {model}", f"/v2/repository/models/{model}/unload")
            self._admin(f"cannot reload model {model}", f"/v2/repository/models/{model}/load")
            alive = {s.instance for s in stub_processes(self.server.proc.pid) if s.model == model}
            if not alive:
                raise ServerLost(f"model {model} reloaded without any live stub")
        except ServerLost:
            self.upstream.up = False
            raise
        finally:
            self.upstream.down = (self.upstream.down - affected) | self._refused_closure()
        self.expected[model] = alive
        seconds = time.monotonic() - t0
        self.recoveries.append({"model": model, "dead": list(dead), "seconds": round(seconds, 3)})
        self.on_event(f"model {model} reloaded in {seconds:.1f} s")
        return seconds

    def _count(self, key: str) -> bool:
        """Record a recovery of `key`; False when it is one too many within the window."""
        now = time.monotonic()
        window = self.history[key]
        while window and now - window[0] > self.recovery_window:
            window.popleft()
        window.append(now)
        return len(window) <= self.max_recoveries

    def restart_server(self, code: Optional[int], why: str = "") -> float:
        """tritonserver died (a crash in its HTTP layer, the OOM killer) or was given up on: start it again
        after the backoff, retrying until it starts or `serve` stops. Returns the seconds it took."""
        t0 = time.monotonic()
        self.upstream.up = False
        self.epoch += 1
        if t0 - self.started_at >= self.stable_after:
            self.delay = self.backoff[0]
        self.on_event(f"{why or f'tritonserver exited unexpectedly with status {code}'}; restarting it in "
                      f"{self.delay:.1f} s")
        self.server.stop()  # reaps what is left of its process group, removes its shared memory
        while not self.stop.wait(self.delay):
            self.delay = min(self.delay * 2, self.backoff[1])
            problems = model_problems(self.server.repo)
            for model in problems.keys() - self.refused.keys():
                self.on_event(f"model {model} is not loaded: {refusal(self.server.repo, problems[model])}")
            self.refused = problems
            self.server.excluded = sorted(self._refused_closure())
            drop_bytecode(self.server.repo)
            if port_in_use(self.server.http_address, self.server.http_port):  # taken meanwhile: the fronts follow
                self.server.http_port = free_port()
            if port_in_use(self.server.grpc_address, self.server.grpc_port):
                self.server.grpc_port = free_port()
            try:
                self.server.start(timeout=self.load_timeout, cancel=self.stop)
                break
            except StartCancelled:
                return time.monotonic() - t0  # serve is stopping (start stopped the server)
            except EdetError as e:
                self.on_event(f"tritonserver did not start again ({e}); retrying in {self.delay:.1f} s")
                self.server.stop()
        else:
            return time.monotonic() - t0  # serve is stopping
        self.started_at = time.monotonic()
        self.epoch += 1
        self.snapshot()
        seconds = time.monotonic() - t0
        self.recoveries.append({"model": "tritonserver", "dead": [why or f"status {code}"],
                                "seconds": round(seconds, 3)})
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
        if not self._verified(model):
            return time.monotonic() - t0
        config = json.loads(self._admin(f"cannot read the config of model {model}", f"/v2/models/{model}/config",
                                        None))
        self.generation += 1
        config.setdefault("parameters", {})["edet_generation"] = {"string_value": str(self.generation)}
        self.on_event(f"model {model}'s shared memory grew past {self.shm_high_water >> 20} MiB; replacing its instances")
        self._admin(f"cannot reload model {model} to release its memory", f"/v2/repository/models/{model}/load",
                    json.dumps({"parameters": {"config": json.dumps(config)}}).encode())
        seconds = time.monotonic() - t0
        self.recoveries.append({"model": model, "recycled": list(regions), "seconds": round(seconds, 3)})
        return seconds

    def kill_hung(self) -> List[Stub]:
        """SIGKILL the stubs that are stopped (/proc state T or t) or that the canary found hung, after marking
        their models down; the next round recovers them like dead ones. Returns them."""
        victims: Dict[int, Tuple[Stub, str]] = {}
        stubs = stub_processes(self.server.proc.pid)
        for stub in stubs:
            if _proc_state(stub.pid) in ("T", "t"):
                victims[stub.pid] = (stub, "stopped")
        while True:
            try:
                model, instance, why = self.hung.get_nowait()
            except Empty:
                break
            named = [s for s in stubs if s.instance == instance]
            for stub in named or [s for s in stubs if s.model == model]:
                victims.setdefault(stub.pid, (stub, why))
        if not victims:
            return []
        self._mark_down([stub.model for stub, _ in victims.values()])
        for pid, (stub, why) in victims.items():
            self.on_event(f"stub {stub.instance} of model {stub.model} is {why}; killing it")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_proc_state(p) not in (None, "Z", "X") for p in victims):
            time.sleep(0.02)
        return [stub for stub, _ in victims.values()]

    def check_once(self) -> None:
        """One round; a server that died or stopped answering is restarted (never raises for either)."""
        code = self.server.proc.poll()
        if code is not None:
            self.restart_server(code)
            return
        try:
            self.kill_hung()
            for model, dead in self.missing().items():
                self.recover(model, dead)
            self.readmit()
            for model, regions in self.swollen().items():
                self.recycle(model, regions)
        except ServerLost as e:
            self.restart_server(None, f"{e}")

    def canary(self, name: str, request: Tuple[bytes, int]) -> Optional[Tuple[str, Optional[str]]]:
        """One canary through ensemble `name`, straight to tritonserver: None when it answered (or the server is
        gone, which the poll sees), ("unhealthy", instance) or ("timeout", None)."""
        body, header_length = request
        req = urllib.request.Request(f"http://{self.server.http_url}/v2/models/{name}/infer", data=body,
                                     headers={contract.INFERENCE_HEADER_LENGTH: str(header_length),
                                              "Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(req, timeout=self.canary_timeout) as r:
                r.read()
            return None
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            found = UNHEALTHY_STUB.search(text)
            if found:
                return ("unhealthy", found.group(1))
            return None
        except TimeoutError:
            return ("timeout", None)
        except (OSError, http.client.HTTPException) as e:
            return ("timeout", None) if isinstance(getattr(e, "reason", None), TimeoutError) else None

    def _stubs_cpu(self, model: str) -> float:
        """CPU seconds used so far by `model`'s stubs: a deadlocked stub uses none, a busy one (a large model on
        a CPU, seconds per batch) a core or more."""
        return _cpu_seconds([s.pid for s in stub_processes(self.server.proc.pid) if s.model == model])

    def find_stuck_instances(self) -> None:
        """Instances whose execute() began over `canary_timeout` s ago and whose stub used under `busy_cpu` s of
        CPU, with no thread ever seen running, waiting for a CPU or in I/O, since we first saw it in that call go
        to `hung`: one instance of several stuck while another answers every canary (the models keep an
        execution clock, `models.common.ExecClock`). Called about once a second."""
        now, seen, clocks = time.monotonic(), {}, {}
        for stub in stub_processes(self.server.proc.pid):
            clocks[stub.pid] = self.clocks.get(stub.pid) or find_exec_clock(stub.pid)
            began = read_exec_clock(clocks[stub.pid]) if clocks[stub.pid] else 0.0
            if not began:
                continue
            call = self.executing.get(stub.pid)
            if call is None or call.began != began:
                call = InCall(began, _cpu_seconds([stub.pid]), now, False)
            if not call.active and _threads_active(stub.pid):
                call = call._replace(active=True)
            seen[stub.pid] = call
            if (now - call.seen_at >= self.canary_timeout and now - began >= self.canary_timeout and not call.active
                    and _cpu_seconds([stub.pid]) - call.cpu < self.busy_cpu):
                self.hung.put((stub.model, stub.instance,
                               f"stuck in one request for {now - began:.0f} s, using no CPU"))
                seen.pop(stub.pid)
        self.executing, self.clocks = seen, {pid: path for pid, path in clocks.items() if path}

    def watch_canaries(self) -> None:
        """Until `stop`: every `canary_interval` s, a canary to each model with stubs (the members, not the
        ensembles, so that a verdict names the model that hangs) whose stubs answered nothing through the fronts
        meanwhile. A hung verdict goes to `hung`; a timeout counts only when the model itself completed nothing
        and its stubs used under `busy_cpu` s of CPU meanwhile (another model's traffic proves nothing of it)."""
        requests = {n: r for n, info in self.upstream.models.items() if not info.members
                    for r in [canary_request(info)] if r}
        while not self.stop.wait(self.canary_interval):
            try:
                self.check_canaries(requests)
            except Exception:  # a bug of ours must not end the watch for the rest of serving: log it, go on
                logger.exception("supervisor: unexpected error in the canary watch")

    def check_canaries(self, requests: Dict[str, Tuple[bytes, int]]) -> None:
        """One round of `watch_canaries`."""
        self.find_stuck_instances()
        for name, request in requests.items():
            recent = time.monotonic() - self.upstream.last_success.get(name, -math.inf) < self.canary_interval
            if not self.upstream.model_ready(name) or recent:
                continue
            epoch, completed, cpu = self.epoch, self.upstream.completed.get(name, 0), self._stubs_cpu(name)
            verdict = self.canary(name, request)
            if verdict is None or epoch != self.epoch or not self.upstream.model_ready(name):
                continue
            if verdict[0] == "timeout" and (self.upstream.completed.get(name, 0) != completed
                                            or self._stubs_cpu(name) - cpu >= self.busy_cpu):
                continue  # slow under load, or one long inference: working, not hung
            why = ("not healthy (canary)" if verdict[0] == "unhealthy"
                   else f"not answering (a canary timed out, within {self.canary_timeout:.0f} s)")
            self.hung.put((name, verdict[1], why))

    def run(self, stop: threading.Event) -> None:
        """Watch until `stop` is set."""
        self.stop = stop
        if not self.expected:
            self.snapshot()
        threading.Thread(target=self.watch_canaries, name="edet-canary", daemon=True).start()
        while not stop.wait(self.poll):
            try:
                self.check_once()
            except Exception:  # a bug of ours must not end serving: log it, try again next round
                logger.exception("supervisor: unexpected error")


# glibc's allocator for serve, tritonserver and the stubs: a burst of large request bodies (200 concurrent 24 MP
# JPEGs) otherwise stays resident after it is over (the mmap threshold rises to the largest block freed, so
# later large blocks come from heaps and arenas that are never given back): RSS stayed at 190% of its baseline
# 60 s after such a burst; with these, 106% (up to ~220 MiB more when the burst makes the OpenVINO engine compile
# new batch sizes, which it keeps: docs/serving.md). Fixed thresholds: blocks of 256 KiB and more are mmapped
# and returned when freed.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 << 10), "MALLOC_TRIM_THRESHOLD_": str(1 << 20),
              "MALLOC_ARENA_MAX": "2"}


def return_freed_memory_to_the_os() -> None:
    """The same allocator settings for this (already started) process, where glibc is there (mallopt)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
        libc.mallopt(M_MMAP_THRESHOLD, int(MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]))
        libc.mallopt(M_TRIM_THRESHOLD, int(MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]))
        libc.mallopt(M_ARENA_MAX, int(MALLOC_ENV["MALLOC_ARENA_MAX"]))
    except (OSError, AttributeError):  # not glibc: its own defaults
        pass


def stop_server(server: TritonServer, settle: float = 2.0) -> Optional[int]:
    """Stop tritonserver (SIGTERM: it refuses new requests, lets those in flight finish, then unloads every
    model) and return its exit status. A model whose stub was killed and replaced leaves a version live in Triton
    2.51 that never unloads, so the stop ran into the exit timeout (the whole grace period, status 1, "Exit
    timeout expired"). Triton unloads models only once nothing is in flight: when some stubs have ended since
    the SIGTERM and the rest have not changed for `settle` s, nothing is left to drain; the server is ended
    then and the stop counts as clean (0)."""
    proc = server.proc
    if proc is None or proc.poll() is not None:
        return server.stop()
    before = {s.pid for s in stub_processes(proc.pid)}
    proc.send_signal(signal.SIGTERM)
    deadline, last, since = time.monotonic() + server.grace_period + 30, None, time.monotonic()
    while proc.poll() is None and time.monotonic() < deadline:
        now, alive = time.monotonic(), {s.pid for s in stub_processes(proc.pid)}
        if alive != last:
            last, since = alive, now
        elif alive < before and now - since > settle:
            logger.info("tritonserver has unloaded what it could (stubs left: %d); ending it", len(alive))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            server.stop()  # reaps the group, removes the shared memory
            return 0
        time.sleep(0.05)
    return server.stop()


def serve(repo: str | Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
          address: str = "127.0.0.1", log_file: Optional[str] = None, grace_period: float = 30.0,
          open_apis: Sequence[str] = (), force: bool = False, start_timeout: float = 300.0,
          announce: Callable[[str], None] = print, max_in_flight: Optional[int] = None) -> int:
    """Start the fronts and tritonserver (its HTTP and gRPC ports on loopback behind the HTTP and gRPC fronts;
    metrics direct), supervise until SIGTERM/SIGINT/SIGHUP, drain, stop; returns the exit status for
    `edet-deploy serve`: the server's own status (0 when it stopped cleanly). Start-up failures raise EdetError.
    `max_in_flight`: inference requests admitted at once over both fronts (None: configs.MAX_IN_FLIGHT; 0: no
    bound)."""
    check_port("http", address, http_port)
    check_port("grpc", address, grpc_port)
    server = TritonServer(repo, free_port(), free_port(), metrics_port, address, log_file=log_file,
                          grace_period=grace_period, open_apis=open_apis, force=force, http_address="127.0.0.1",
                          grpc_address="127.0.0.1")
    for key, value in MALLOC_ENV.items():
        server.env.setdefault(key, value)  # tritonserver and, inheriting it, the stubs
    return_freed_memory_to_the_os()
    models = repository_models(repo)
    upstream = Upstream(server.http_address, server.http_port, models, server.grpc_port,
                        MAX_IN_FLIGHT if max_in_flight is None else max_in_flight)
    front = Front(upstream, address, http_port)  # both bind now: the ports are ours before Triton starts
    try:
        grpc_front = GrpcFront(upstream, address, grpc_port)
    except BaseException:
        front.close()
        raise
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    for sig in STOP_SIGNALS:  # a closed terminal sends SIGHUP
        signal.signal(sig, on_signal)
    try:
        drop_bytecode(repo)
        server.start(timeout=start_timeout, cancel=stop)
        supervisor = Supervisor(server, upstream)
        supervisor.snapshot()
        front.start()
        grpc_front.start()
    except BaseException as e:
        server.stop()
        front.close()
        grpc_front.close()
        if isinstance(e, StartCancelled):  # SIGTERM / Ctrl-C while the models loaded: a clean stop
            logger.info("%s", e)
            return 0
        raise
    announce(f"serving {repo}: http {front.url}, grpc {grpc_front.url}, metrics "
             f"http://{address}:{metrics_port}/metrics (supervised; Ctrl-C to stop)")
    sys.stdout.flush()
    try:
        supervisor.run(stop)
    finally:
        t0 = time.monotonic()
        # Both fronts drain at once, within one grace period.
        grpc_left: List[int] = []
        grpc_drain = threading.Thread(target=lambda: grpc_left.append(grpc_front.drain(grace_period)))
        grpc_drain.start()
        left = front.drain(grace_period)
        grpc_drain.join(grace_period + 15)
        left += sum(grpc_left)
        if left:
            logger.warning("%d request(s) still running after the %.0f s grace period", left, grace_period)
        front.close()  # its pooled connections too: tritonserver waits for every HTTP connection to close
        grpc_front.close()
        status = stop_server(server)
        logger.info("stopped in %.1f s", time.monotonic() - t0)
    return 0 if status is None else (status if status >= 0 else 128 - status)
