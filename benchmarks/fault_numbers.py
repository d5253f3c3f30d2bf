"""What `serve`'s hardening costs and buys, measured on this machine against the real supervised server
(127.0.0.1 only, every loop bounded): recovery after a stub kill, good-request latency idle vs during bursts of
decompression-heavy requests (refused bombs, and accepted 24 MP images), memory before/after an oversized
request, and shutdown time under load. Writes benchmarks/results/faults.json.

    python benchmarks/fault_numbers.py [--repo DIR]   (default: a D0 repository generated into build/faults)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def infer(url: str, payloads, timeout: float = 300.0):
    blob = b"".join(len(p).to_bytes(4, "little") + p for p in payloads)
    header = json.dumps({"inputs": [{"name": "IMAGE", "shape": [len(payloads), 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(blob)}}]}).encode()
    req = urllib.request.Request(f"http://{url}/v2/models/efficientdet_d0/infer", data=header + blob,
                                 headers={"Inference-Header-Content-Length": str(len(header)),
                                          "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def pct(xs, q):
    return round(float(np.percentile(np.asarray(xs) * 1000, q)), 1) if xs else None


def good_latencies_during(url, good, bad, threads=4, per_thread=6, max_good=200):
    """Good requests in a loop while `threads` clients send `per_thread` bad requests each."""
    lat, codes, done = [], [], threading.Event()

    def bad_client():
        for _ in range(per_thread):
            codes.append(infer(url, bad))

    def good_client():
        for _ in range(max_good):
            if done.is_set():
                return
            t = time.monotonic()
            assert infer(url, [good]) == 200
            lat.append(time.monotonic() - t)

    g = threading.Thread(target=good_client)
    g.start()
    bads = [threading.Thread(target=bad_client) for _ in range(threads)]
    t0 = time.monotonic()
    for b in bads:
        b.start()
    for b in bads:
        b.join(600)
    burst = time.monotonic() - t0
    done.set()
    g.join(600)
    return lat, sorted({str(c) for c in codes}), burst


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return round(int(next(ln for ln in f if ln.startswith("VmRSS")).split()[1]) / 1024, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo")
    ap.add_argument("--out", default="benchmarks/results/faults.json")
    args = ap.parse_args()

    from edet_deploy.measure import free_port, machine_info
    from edet_deploy.triton.server import TritonServer
    from edet_deploy.triton.supervisor import Supervisor

    repo = args.repo
    if repo is None:
        import torch

        from edet_deploy.export import export_onnx
        from edet_deploy.triton.repo import generate_repository
        torch.manual_seed(0)
        res = export_onnx("d0", "build/faults/export", image_size=256, dynamic_batch=8)
        repo = str(generate_repository("build/faults/repo", variant="d0", onnx=str(res.onnx_path), force=True))
    report = {"machine": machine_info(None), "repo": repo}
    server = TritonServer(repo, free_port(), free_port(), free_port(), log_file="build/faults/triton.log").start()
    sup = Supervisor(server)
    sup.snapshot()
    stop = threading.Event()
    watcher = threading.Thread(target=sup.run, args=(stop,), daemon=True)
    watcher.start()
    url = server.http_url
    rng = np.random.default_rng(0)
    good = encode(Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)), "JPEG")
    bomb = encode(Image.new("L", (20000, 20000)), "PNG")
    heavy = encode(Image.fromarray(np.tile(rng.integers(0, 255, (4000, 1, 3), dtype=np.uint8), (1, 6000, 1))), "PNG")
    try:
        for _ in range(3):
            infer(url, [good])
        idle = []
        for _ in range(40):
            t = time.monotonic()
            assert infer(url, [good]) == 200
            idle.append(time.monotonic() - t)
        report["good_idle_ms"] = {"p50": pct(idle, 50), "p99": pct(idle, 99), "n": len(idle)}
        lat, codes, burst = good_latencies_during(url, good, [bomb] * 4)
        report["good_during_bomb_burst_ms"] = {"p50": pct(lat, 50), "p99": pct(lat, 99), "n": len(lat),
                                               "bad_answers": codes, "burst_s": round(burst, 2),
                                               "bad": "4 clients x 6 requests of 4 PNGs declaring 20000x20000"}
        lat, codes, burst = good_latencies_during(url, good, [heavy], threads=4, per_thread=2)
        report["good_during_accepted_24mp_burst_ms"] = {
            "p50": pct(lat, 50), "p99": pct(lat, 99), "n": len(lat), "heavy_answers": codes,
            "burst_s": round(burst, 2), "heavy": f"4 clients x 2 requests of one 6000x4000 PNG ({len(heavy)} bytes)"}

        regions = lambda: round(sum(p.stat().st_blocks * 512 for p in server.shm_regions()) / 2**20, 1)  # noqa: E731
        before = {"tritonserver_rss_mib": rss_mib(server.proc.pid), "shm_mib": regions()}
        code = infer(url, [b"\x89PNG\r\n\x1a\n" + b"\0" * (300 << 20)])
        time.sleep(2)
        after = {"tritonserver_rss_mib": rss_mib(server.proc.pid), "shm_mib": regions()}
        report["oversized_300mib"] = {"answer": code, "before": before, "after": after}

        engine = next(s for s in __import__("edet_deploy.triton.supervisor", fromlist=["x"]).stub_processes(
            server.proc.pid) if s.model.endswith("_engine"))
        os.kill(engine.pid, signal.SIGKILL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 300:
            if server.ready() and infer(url, [good]) == 200:
                break
            time.sleep(0.1)
        report["engine_stub_kill_recovery_s"] = round(time.monotonic() - t0, 2)
        report["supervisor_recoveries"] = sup.recoveries

        # Shutdown under load: 6 clients sending batches of 4, then SIGTERM (server.stop()).
        results, t_sig = [], []

        def client():
            for _ in range(100):
                t = time.monotonic()
                c = infer(url, [good] * 4, timeout=300)
                results.append((t, time.monotonic(), c))
                if t_sig and (c is None or time.monotonic() > t_sig[0] + 5):
                    return

        ths = [threading.Thread(target=client) for _ in range(6)]
        for t in ths:
            t.start()
        time.sleep(3)
        stop.set()
        t_sig.append(time.monotonic())
        status = server.stop()
        shutdown = time.monotonic() - t_sig[0]
        for t in ths:
            t.join(300)
        in_flight = [r for r in results if r[0] < t_sig[0] < r[1]]
        report["shutdown_under_load"] = {"seconds": round(shutdown, 2), "exit_status": status,
                                         "in_flight": len(in_flight),
                                         "in_flight_answered_200": sum(r[2] == 200 for r in in_flight),
                                         "shm_regions_left": len(server.shm_regions())}
    finally:
        stop.set()
        server.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
