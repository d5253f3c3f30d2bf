"""Issue #24 item 10: every attack of the issue's table against `edet-deploy serve`, BEFORE (the commit before the
hardening work: the parent of the commit that added edet_deploy/triton/front.py) and AFTER (this tree), from one
run. "Before" runs from a temporary `git worktree add --detach` checkout (removed at the end, also on failure);
each side exports the bundled D0 weights at 256 px with its own `export`, makes its own repository with its own
`triton-repo` and serves it with its own `serve` on fresh ports. All traffic goes to 127.0.0.1; every loop is
bounded in count and time; every serve started here is killed with its whole process tree (found via /proc) and its
/dev/shm regions removed, whatever happens. Writes benchmarks/results/fault_numbers.{json,md}.

    python benchmarks/fault_numbers.py [--burst N] [--sides before,after] [--out-dir DIR]

Counts are scaled down so the run fits about 15 minutes on 2 loaded cores (see the md for what was used).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import re
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
MODEL_PATH = "/v2/models/efficientdet_d0/infer"
STOP_S = 15.0  # SIGSTOP length
POISON_S = 20.0  # poison attack length
RECOVERY_BOUND = 90.0  # seconds any recovery is waited for
SETTLE_S = 60.0  # memory is read this long after the burst
KILL_WINDOW_S = 30.0  # answers counted this long after a stub kill


def before_commit() -> str:
    """The parent of the first commit that added the HTTP front (the start of the #24 work)."""
    first = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "edet_deploy/triton/front.py"],
                           cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()[-1]
    return subprocess.run(["git", "rev-parse", f"{first}^"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


class Helpers:
    """The fault suite's Serve/infer/readiness helpers and memory_burst's RSS and JPEG helpers, imported (not
    copied); `use(code)` points the suite's Serve at one side's checkout."""

    def __init__(self) -> None:
        sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks"), str(ROOT)]
        import memory_burst
        import test_faults
        self.tf, self.mb = test_faults, memory_burst

    def use(self, code: Path) -> None:
        self.tf.ROOT = code  # Serve runs `python -m edet_deploy serve` with cwd=ROOT
        os.environ["PYTHONPATH"] = str(code)


H: "Helpers" = None  # type: ignore[assignment]  # set by main(), after argument parsing (heavy imports)


# ---------------------------------------------------------------- processes -------------------------------------
class Watch:
    """Samples, every 0.5 s, readiness and serve's tritonserver pid(s); remembers every process of serve's tree it
    saw (pid -> argv), so that cleanup can kill an orphan a dying serve left behind."""

    def __init__(self, serve, seen: Dict[int, bytes]) -> None:
        self.serve, self.seen, self.samples = serve, seen, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def tritons(self) -> List[int]:
        return [p for p, argv in H.tf.child_processes(self.serve.proc.pid) if argv[0].endswith(b"/tritonserver")]

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.serve.proc.poll() is None:
                for pid in H.tf.Serve.descendants(self.serve):
                    self.seen.setdefault(pid, _argv(pid))
            self.samples.append((time.monotonic(), H.tf.ready(self.serve.url), tuple(self.tritons())))
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(10)


def _argv(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def log_events(serve) -> Dict[str, int]:
    """tritonserver restarts begun by serve's supervisor (both sides log "...; restarting it") and tritonserver
    crashes by signal (Triton logs "Signal (N) received." for SIGSEGV/SIGABRT, 15 and 2 are stops), from serve's
    log file: a restart can fall between two /proc samples."""
    text = serve.log.read_text(errors="replace") if serve.log.exists() else ""
    return {"tritonserver_restarts": text.count("; restarting it"),
            "tritonserver_crash_signals": len(re.findall(r"^Signal \((?!15\)|2\))\d+\) received", text, re.M))}


def kill_leftovers(seen: Dict[int, bytes]) -> List[int]:
    """SIGKILL every process seen in a serve's tree that is still alive with the same argv (pid reuse guarded)."""
    left = [pid for pid, argv in seen.items() if argv and _argv(pid) == argv and H.tf.gone([pid], 0)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    H.tf.gone(left, 30)
    return left


# ---------------------------------------------------------------- traffic ---------------------------------------
class Load:
    """`clients` threads sending one request after another (good pictures, or a forged blob) until halted;
    records (start, end, status)."""

    def __init__(self, url: str, clients: int, picture: bytes, blob: Optional[bytes] = None,
                 shape=None, limit: int = 100_000, max_s: float = 300.0) -> None:
        self.records, self._stop, self._lock = [], threading.Event(), threading.Lock()

        def client() -> None:
            end = time.monotonic() + max_s  # bounded in count and time
            for _ in range(limit):
                if self._stop.is_set() or time.monotonic() > end:
                    return
                t0 = time.monotonic()
                status, _ = H.tf.infer(url, [picture], timeout=60, shape=shape, blob=blob)
                with self._lock:
                    self.records.append((t0, time.monotonic(), status))
                if status is None:
                    self._stop.wait(0.2)  # refused while restarting: do not spin

        self._threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def halt(self) -> list:
        self._stop.set()
        for t in self._threads:
            t.join(90)
        return self.records


def counts(records, t_from: float = -math.inf, t_to: float = math.inf) -> Dict[str, int]:
    return dict(collections.Counter(str(r[2]) for r in records if t_from <= r[0] <= t_to))


def failed(records) -> int:
    return sum(r[2] != 200 for r in records)


def wait_answering(serve, picture: bytes, bound: float = RECOVERY_BOUND) -> Optional[float]:
    """Seconds until readiness is 200 and a good request is answered 200; None if not within `bound` or if serve
    exited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < bound and serve.proc.poll() is None:
        if H.tf.ready(serve.url) == 200 and H.tf.infer(serve.url, [picture], timeout=30)[0] == 200:
            return round(time.monotonic() - t0, 1)
        time.sleep(0.3)
    return None


def engine_stub(serve):
    serve.server_pid = serve.triton_pid()
    return next(s for s in serve.stubs() if s.model.endswith("_engine"))


# ---------------------------------------------------------------- attacks ---------------------------------------
def attack_burst(serve, picture: bytes, n: int) -> Dict:
    """n concurrent 6000x4000 JPEGs: RSS of serve's tree (via /proc) at baseline, peak, and SETTLE_S later."""
    blob = H.mb.jpeg()
    ref = H.mb.infer(serve.url, blob)
    time.sleep(3)
    base = H.mb.snapshot(serve.proc.pid)
    peak, stop = dict(base), threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            for k, v in H.mb.snapshot(serve.proc.pid).items():
                peak[k] = max(peak.get(k, 0), v)
            stop.wait(0.3)

    threading.Thread(target=sampler, daemon=True).start()
    results, lock = [], threading.Lock()

    def one() -> None:
        r = H.mb.infer(serve.url, blob)
        with lock:
            results.append(r)

    t0 = time.monotonic()
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    burst_s = time.monotonic() - t0
    stop.set()
    time.sleep(SETTLE_S)
    after = H.mb.snapshot(serve.proc.pid)
    return {"n": n, "jpeg_bytes": len(blob), "burst_s": round(burst_s, 1),
            "correct": sum(r[0] == 200 and r[1] == ref[1] for r in results), "statuses": counts(
                [(0, 0, r[0]) for r in results]),
            "baseline_mib": round(sum(base.values())), "peak_mib": round(sum(peak.values())),
            "after_60s_mib": round(sum(after.values())),
            "after_pct_of_baseline": round(100 * sum(after.values()) / max(1, sum(base.values())))}


def attack_forged(serve, picture: bytes) -> Dict:
    """Forged shapes and a wrong datatype, one request each: the status code (and a 200's outputs' shape)."""
    blob = len(picture).to_bytes(4, "little") + picture
    out = {}
    for label, shape, dtype in [("[0,1]", [0, 1], "BYTES"), ("[2^62,1]", [2 ** 62, 1], "BYTES"),
                                ("[NaN,1]", [float("nan"), 1], "BYTES"), ("[-1,1]", [-1, 1], "BYTES"),
                                ("[1.5,1]", [1.5, 1], "BYTES"), ("FP32 datatype", [1, 1], "FP32"),
                                ("UINT8 datatype, sizes consistent", [1, len(blob)], "UINT8")]:
        header = json.dumps({"inputs": [{"name": "IMAGE", "shape": shape, "datatype": dtype,
                                         "parameters": {"binary_data_size": len(blob)}}],
                             "outputs": [{"name": "num_detections", "parameters": {"binary_data": False}}]}).encode()
        status, body = H.tf.http(serve.url, MODEL_PATH, header + blob,
                                 {"Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream"}, 30)
        entry = {"status": status}
        if status == 200:
            with contextlib.suppress(ValueError, KeyError, IndexError):
                entry["num_detections_shape"] = json.loads(body)["outputs"][0]["shape"]
        out[label] = entry
    return out


def attack_poison(serve, picture: bytes) -> Dict:
    """2 clients send a BYTES tensor whose length prefix is 0xffffffff (4 bytes of data) beside 2 good clients."""
    poison = b"\xff\xff\xff\xff" + b"abcd"
    bad = Load(serve.url, 2, picture, blob=poison, shape=[1, 1])
    good = Load(serve.url, 2, picture)
    time.sleep(POISON_S)
    g, b = good.halt(), bad.halt()
    return {"seconds": POISON_S, "good": len(g), "good_failed": failed(g),
            "good_failed_pct": round(100 * failed(g) / max(1, len(g)), 1), "good_statuses": counts(g),
            "poison_statuses": counts(b)}


def attack_sigstop(serve, picture: bytes, watch: Watch) -> Dict:
    """SIGSTOP of the engine stub for STOP_S under 3 clients, then SIGCONT (if it is still there)."""
    load = Load(serve.url, 3, picture)
    time.sleep(2)
    stub = engine_stub(serve)
    t_stop = time.monotonic()
    os.kill(stub.pid, signal.SIGSTOP)
    try:
        time.sleep(STOP_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stub.pid, signal.SIGCONT)
    t_cont = time.monotonic()
    back = wait_answering(serve, picture, 60)
    time.sleep(2)
    recs = load.halt()
    during = [s for s in watch.samples if t_stop <= s[0] <= t_cont]
    not_ready = [s[0] - t_stop for s in during if s[1] != 200]
    after = [r for r in recs if r[0] >= t_stop]
    fails = [r for r in after if r[2] != 200]
    recovered = None
    if fails:  # first good answer to a request sent after the last failure, from SIGSTOP
        last = max(r[1] for r in fails)
        oks = [r[1] for r in after if r[2] == 200 and r[0] >= last]
        recovered = round(min(oks) - t_stop, 1) if oks else None
    return {"stop_s": STOP_S, "clients": 3, "readiness_during_stop": counts([(0, 0, s[1]) for s in during]),
            "first_not_ready_s": round(min(not_ready), 1) if not_ready else None,
            "requests_from_stop": len(after), "failed": len(fails), "statuses": counts(after),
            "slowest_request_s": round(max((r[1] - r[0] for r in after), default=0), 1),
            "recovered_s_after_stop": recovered, "answering_s_after_sigcont": back,
            "serve_alive": serve.proc.poll() is None, "serve_exit": serve.proc.poll()}


def attack_bracket(serve, picture: bytes, watch: Watch) -> Dict:
    """Two bodies of 10^6 '[' + 10^6 ']' 4 s apart beside 2 good clients."""
    body = b"[" * 10 ** 6 + b"]" * 10 ** 6
    load = Load(serve.url, 2, picture)
    time.sleep(2)
    t0 = time.monotonic()
    answers = [H.tf.http(serve.url, MODEL_PATH, body, {"Content-Type": "application/json"}, 30)[0]]
    time.sleep(max(0.0, t0 + 4 - time.monotonic()))
    answers.append(H.tf.http(serve.url, MODEL_PATH, body, {"Content-Type": "application/json"}, 30)[0])
    back = wait_answering(serve, picture)
    time.sleep(2)
    recs = [r for r in load.halt() if r[0] >= t0]
    return {"bomb_answers": [str(a) for a in answers], "serve_alive": serve.proc.poll() is None,
            "serve_exit": serve.proc.poll(),
            "good": len(recs), "good_failed": failed(recs), "good_statuses": counts(recs),
            "answering_again_s": back}


def attack_kill_then_term(serve, picture: bytes, watch: Watch) -> Dict:
    """SIGKILL of the engine stub under 3 clients (answers until recovered), then SIGTERM of serve under the same
    load: exit code, seconds, processes and /dev/shm regions left."""
    load = Load(serve.url, 3, picture)
    time.sleep(2)
    os.kill(engine_stub(serve).pid, signal.SIGKILL)
    t_kill = time.monotonic()
    back = wait_answering(serve, picture)
    time.sleep(max(0.0, t_kill + KILL_WINDOW_S - time.monotonic()))  # the 404s came after the first good answer
    family = H.tf.Serve.descendants(serve)
    t_term = time.monotonic()
    serve.proc.send_signal(signal.SIGTERM)
    try:
        code = serve.proc.wait(120)
    except subprocess.TimeoutExpired:
        code = "still running after 120 s"
    term_s = round(time.monotonic() - t_term, 1)
    recs = load.halt()
    during = counts(recs, t_kill, t_kill + KILL_WINDOW_S)
    return {"recovery_s": back, "statuses_during_recovery": during, "404_during_recovery": during.get("404", 0),
            "sigterm_exit": code, "sigterm_s": term_s, "processes_left": len(H.tf.gone(family, 30)),
            "shm_regions_left": len(serve.shm())}


def tamper(repo: Path, marker: Path) -> None:
    """Engine graph altered (one weight halved) and its sidecar deleted; postprocess class names edited; engine
    shim replaced by code that also leaves a marker file when imported."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    eng = next(repo.glob("*_engine")) / "1"
    m = onnx.load(str(eng / "model.onnx"))
    init = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)) if t.data_type == 1 else 0)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 0.5, init.name))
    onnx.save(m, str(eng / "model.onnx"))
    (eng / "model.json").unlink()
    cfg = next(repo.glob("*_postprocess")) / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('\\"circle\\"', '\\"TAMPERED\\"'))
    shim = eng / "model.py"
    shim.write_text(shim.read_text() + f"\nopen({str(marker)!r}, 'w').write('replaced shim ran')\n")


def attack_tamper(serve, picture: bytes, repo: Path, marker: Path) -> Dict:
    """Tamper with the served repository, then SIGKILL the engine and postprocess stubs: was anything tampered
    served?"""
    status, body = H.tf.infer(serve.url, [picture])
    reference = H.tf.scores(body) if status == 200 else None
    tamper(repo, marker)
    os.kill(engine_stub(serve).pid, signal.SIGKILL)
    time.sleep(1)  # the postprocess stub too: its reload is what reads the edited config
    with contextlib.suppress(StopIteration, ProcessLookupError):
        os.kill(next(s for s in serve.stubs() if s.model.endswith("_postprocess")).pid, signal.SIGKILL)
    labels: set = set()
    t0, seen, labels_edited, graph_swapped, ready_codes = time.monotonic(), collections.Counter(), False, False, []
    while time.monotonic() - t0 < 60 and serve.proc.poll() is None:
        ready_codes.append(H.tf.ready(serve.url))
        status, body = H.tf.http(serve.url, MODEL_PATH, *_labelled_request(picture), 30)
        seen[str(status)] += 1
        if status == 200:
            labels_edited |= b"TAMPERED" in body
            with contextlib.suppress(ValueError, KeyError):
                out = {o["name"]: o["data"] for o in json.loads(body)["outputs"]}
                labels.update(map(str, out["detection_labels"]))
                import numpy as np
                graph_swapped |= reference is not None and not np.allclose(out["detection_scores"][:5], reference,
                                                                           atol=1e-4)
        time.sleep(1)
    return {"answers_60s_after_kill": dict(seen), "readiness_200_share_pct": round(
                100 * sum(c == 200 for c in ready_codes) / max(1, len(ready_codes))),
            "substitute_graph_served": graph_swapped, "edited_labels_served": labels_edited,
            "replaced_shim_ran": marker.exists(), "labels_served": sorted(labels), "serve_alive": serve.proc.poll() is None}


def _labelled_request(picture: bytes):
    blob = len(picture).to_bytes(4, "little") + picture
    header = json.dumps({"inputs": [{"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "outputs": [{"name": n, "parameters": {"binary_data": False}}
                                     for n in ("detection_scores", "detection_labels")]}).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header)),
                           "Content-Type": "application/octet-stream"}


# ---------------------------------------------------------------- one side --------------------------------------
def make_repo(code: Path, work: Path) -> Path:
    """That side's `export` (bundled D0, 256 px, dynamic batch 8) and `triton-repo` (fp32, so both sides run the
    same precision whatever their default)."""
    env = dict(os.environ, PYTHONPATH=str(code))
    run = lambda *a: subprocess.run([sys.executable, "-m", "edet_deploy", *a], cwd=code, env=env, check=True,  # noqa: E731
                                    capture_output=True, text=True)
    run("export", "--weights", str(code / "edet_deploy/assets/shapes_d0.safetensors"), "--image-size", "256",
        "--dynamic-batch", "8", "--out", str(work / "export"))
    run("triton-repo", "--onnx", str(work / "export/efficientdet_d0.onnx"), "--max-batch", "8", "--precision",
        "fp32", "--out", str(work / "repo"))
    return work / "repo"


def run_side(name: str, code: Path, work: Path, picture: bytes, burst: int, log: Callable[[str], None]) -> Dict:
    from edet_deploy.measure import CpuPressure
    H.use(code)
    repo = make_repo(code, work)
    shutil.copytree(repo, work / "repo-tamper")
    res, seen, serves = {"benchmark_started_serve": 0}, {}, []

    def start(r: Path):
        s = H.tf.Serve(r, work)
        serves.append(s)
        res["benchmark_started_serve"] += 1
        return s, Watch(s, seen)

    def fresh(s, w):
        """A fresh serve when the last attack ended the old one (or left it unable to answer)."""
        if s.proc.poll() is None and wait_answering(s, picture, 60) is not None:
            return s, w
        w.stop()
        s.kill()
        return start(repo)

    try:
        s, w = start(repo)
        steps = [("burst", lambda: attack_burst(s, picture, burst)), ("forged", lambda: attack_forged(s, picture)),
                 ("poison", lambda: attack_poison(s, picture)), ("sigstop", lambda: attack_sigstop(s, picture, w)),
                 ("bracket", lambda: attack_bracket(s, picture, w)),
                 ("kill_then_term", lambda: attack_kill_then_term(s, picture, w))]
        for key, step in steps:
            s, w = fresh(s, w)
            log(f"{name}: {key}")
            e0 = log_events(s)
            with CpuPressure() as p:
                res[key] = step()
            res[key].update({k: v - e0[k] for k, v in log_events(s).items()}, cpu_psi_pct=p.pct)
            log(f"{name}: {key}: {res[key]}")
        w.stop()
        s.kill()
        log(f"{name}: tamper")
        s, w = start(work / "repo-tamper")
        with CpuPressure() as p:
            res["tamper"] = attack_tamper(s, picture, work / "repo-tamper", work / "shim-ran")
        res["tamper"]["cpu_psi_pct"] = p.pct
        log(f"{name}: tamper: {res['tamper']}")
        w.stop()
    finally:
        for s in serves:
            with contextlib.suppress(Exception):
                s.kill()
        res["orphans_killed_at_cleanup"] = len(kill_leftovers(seen))
    return res


# ---------------------------------------------------------------- report ----------------------------------------
def _fmt(d: Dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in d.items()) if d else "-"


ROWS = [
    ("bracket bomb: 2 bodies of 10^6 '[' + 10^6 ']' 4 s apart, 2 good clients", "bracket",
     lambda r: f"bomb answers {r['bomb_answers']}; serve {'alive' if r['serve_alive'] else 'EXITED ' + str(r['serve_exit'])}; "
               f"tritonserver crashes {r['tritonserver_crash_signals']}, restarts {r['tritonserver_restarts']}; good failed {r['good_failed']}/{r['good']} "
               f"({_fmt(r['good_statuses'])}); answering again after {r['answering_again_s']} s"),
    (f"SIGSTOP engine stub {STOP_S:.0f} s under 3 clients", "sigstop",
     lambda r: f"readiness during stop {_fmt(r['readiness_during_stop'])} (first non-200 at {r['first_not_ready_s']} s); "
               f"failed {r['failed']}/{r['requests_from_stop']} ({_fmt(r['statuses'])}); recovered "
               f"{r['recovered_s_after_stop']} s after SIGSTOP, answering {r['answering_s_after_sigcont']} s after "
               f"SIGCONT; tritonserver crashes {r['tritonserver_crash_signals']}, restarts {r['tritonserver_restarts']}; serve "
               f"{'alive' if r['serve_alive'] else 'EXITED ' + str(r['serve_exit'])}"),
    (f"poison BYTES (prefix 0xffffffff) from 2 clients beside 2 good, {POISON_S:.0f} s", "poison",
     lambda r: f"good failed {r['good_failed']}/{r['good']} = {r['good_failed_pct']}% ({_fmt(r['good_statuses'])}); "
               f"poison answered {_fmt(r['poison_statuses'])}"),
    ("forged shapes / wrong datatype", "forged",
     lambda r: "; ".join(f"{k} -> {v['status']}" + (f" (num_detections shape {v['num_detections_shape']})"
                                                    if "num_detections_shape" in v else "") for k, v in r.items()
                         if isinstance(v, dict))),
    ("tampered repo (graph swapped + sidecar deleted, labels edited, engine shim replaced), then SIGKILL of the engine and postprocess stubs",
     "tamper",
     lambda r: f"substitute graph served: {r['substitute_graph_served']}; edited labels served: "
               f"{r['edited_labels_served']} (labels seen {r['labels_served']}); replaced shim ran: {r['replaced_shim_ran']}; answers in the 60 s "
               f"after {_fmt(r['answers_60s_after_kill'])}; readiness 200 {r['readiness_200_share_pct']}% of polls"),
    ("SIGKILL engine stub under 3 clients, then SIGTERM", "kill_then_term",
     lambda r: f"404s in the {KILL_WINDOW_S:.0f} s after the kill {r['404_during_recovery']} ({_fmt(r['statuses_during_recovery'])}), recovered "
               f"in {r['recovery_s']} s; SIGTERM: exit {r['sigterm_exit']} after {r['sigterm_s']} s, processes left "
               f"{r['processes_left']}, /dev/shm regions left {r['shm_regions_left']}"),
    ("concurrent 6000x4000 JPEGs", "burst",
     lambda r: f"{r['n']} requests, {r['correct']} correct in {r['burst_s']} s; RSS of serve's tree "
               f"{r['baseline_mib']} -> peak {r['peak_mib']} -> {r['after_60s_mib']} MiB 60 s later "
               f"({r['after_pct_of_baseline']}% of baseline)"),
]


def markdown(report: Dict) -> str:
    m = report["machine"]
    lines = [
        "# Serving faults, before and after issue #24 (one run)",
        "",
        f"Written by `python benchmarks/fault_numbers.py` on {m['date']}: CPU {m['cpu']} ({m['cores']} cores; "
        f"{m['cpu_flags']}), no GPU. **Loaded machine**: other helpers' work and the lead's test suite ran beside "
        f"it; CPU pressure (PSI \"some\", share of each attack's wall time) is in each cell's JSON and below. "
        f"Whole run: {report['run_s']} s, CPU PSI {report['cpu_psi_pct']}%.",
        "",
        f"Before: commit `{report['before_commit'][:12]}` (the parent of the commit that added "
        f"`edet_deploy/triton/front.py`), from a temporary worktree. After: `{report['after_commit'][:12]}`"
        f"{' + uncommitted changes' if report['after_dirty'] else ''}. Each side exported the bundled "
        "D0 weights at 256 px (dynamic batch 8) with its own `export`, made its repository with its own "
        "`triton-repo --precision fp32` and served it with its own `edet-deploy serve` on fresh ports.",
        "",
        f"Scaled down from the issue's table to fit ~15 min on 2 loaded cores: {report['burst']} concurrent JPEGs "
        f"(not 200), SIGSTOP {STOP_S:.0f} s under 3 clients, poison from 2 clients beside 2 good ones for "
        f"{POISON_S:.0f} s, two bracket bodies. When an attack ended `serve` (or left it unable to answer within "
        "60 s), the benchmark started a fresh one for the next attack; that count is the last row. Clients send "
        "their next request as soon as an answer comes (0.2 s after a refused connection), so fast 503s add up "
        "to large counts. tritonserver crashes: \"Signal (N) received\" in its log (a SIGSEGV may not log it); "
        "restarts: serve's supervisor's \"restarting it\" lines.",
        "",
        "| attack | before | after |",
        "|---|---|---|",
    ]
    sides = report["sides"]
    for title, key, fmt in ROWS:
        cells = []
        for side in ("before", "after"):
            r = sides.get(side, {}).get(key)
            cells.append("not measured" if r is None else f"{fmt(r)} (PSI {r.get('cpu_psi_pct')}%)")
        lines.append(f"| {title} | {cells[0]} | {cells[1]} |")
    lines.append("| serves the benchmark started (2 planned: the attacks' and the tamper one; more: a fresh one after an "
                 "attack left serve dead or not answering) / processes of a serve's tree still alive at cleanup | " + " | ".join(
                     f"{sides[s]['benchmark_started_serve']} / {sides[s]['orphans_killed_at_cleanup']}"
                     if s in sides else "-" for s in ("before", "after")) + " |")
    lines += ["", "Raw numbers: [fault_numbers.json](fault_numbers.json). What serve does about each attack: "
              "[docs/serving.md](../../docs/serving.md).", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=100, help="concurrent 6000x4000 JPEGs (default: 100)")
    ap.add_argument("--sides", default="before,after", help="which sides to measure (default: before,after)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--logs", help="copy every serve's log here before the temporary directory goes")
    args = ap.parse_args()
    if not 1 <= args.burst <= 400:
        ap.error("--burst must be in [1..400]")
    sides = args.sides.split(",")
    if not set(sides) <= {"before", "after"}:
        ap.error("--sides: before and/or after")

    global H
    H = Helpers()
    from edet_deploy.measure import CpuPressure, machine_info
    from edet_deploy.data.shapes import render_image
    import io
    import numpy as np
    buf = io.BytesIO()
    render_image(np.random.default_rng(0), (240, 320))[0].save(buf, "JPEG", quality=90)
    picture = buf.getvalue()
    log = lambda msg: print(time.strftime("%H:%M:%S"), msg, flush=True)  # noqa: E731
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    report = {"machine": machine_info(None), "before_commit": before_commit(), "after_commit": git("rev-parse", "HEAD"),
              "after_dirty": bool(git("status", "--porcelain", "--untracked-files=no")), "burst": args.burst,
              "sides": {}}
    tmp = Path(tempfile.mkdtemp(prefix="fault_numbers_"))
    checkout = tmp / "before-code"
    t0 = time.monotonic()
    try:
        with CpuPressure() as p:
            if "before" in sides:
                subprocess.run(["git", "worktree", "add", "--detach", str(checkout), report["before_commit"]],
                               cwd=ROOT, check=True, capture_output=True)
            for side in sides:
                code = checkout if side == "before" else ROOT
                (tmp / side).mkdir()
                report["sides"][side] = run_side(side, code, tmp / side, picture, args.burst, log)
    finally:
        H.use(ROOT)
        if args.logs:
            for f in tmp.glob("*/serve-*"):
                shutil.copy(f, Path(args.logs) / f"{f.parent.name}-{f.name}")
        if checkout.exists():
            subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=ROOT, capture_output=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    report["run_s"], report["cpu_psi_pct"] = round(time.monotonic() - t0), p.pct
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fault_numbers.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "fault_numbers.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
