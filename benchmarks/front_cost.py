"""What the HTTP front of `serve` costs a good request: `edet-deploy serve` on a repository, then good requests
(real shapes images, binary tensor extension, keep-alive connections) sent alternately in blocks to the front
(--http-port) and straight to tritonserver's loopback HTTP port (read from its command line), at concurrency 1
and 16; p50 per path. 127.0.0.1 only; every loop bounded. Writes benchmarks/results/front_cost.json.

    python benchmarks/front_cost.py --repo model_repository [--rounds 6]
"""
from __future__ import annotations

import argparse
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from edet_deploy import contract
from edet_deploy.measure import free_port, machine_info
from edet_deploy.triton.supervisor import child_processes

MODEL = "efficientdet_d0"


def request(blob: bytes) -> tuple:
    payload = len(blob).to_bytes(contract.BYTES_LENGTH_PREFIX, "little") + blob
    header = json.dumps({"inputs": [{"name": contract.IMAGE, "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {contract.BINARY_DATA_SIZE: len(payload)}}],
                         "outputs": [{"name": n, "parameters": {"binary_data": False}}
                                     for n in contract.OUTPUTS]}).encode()
    return header + payload, {contract.INFERENCE_HEADER_LENGTH: str(len(header)),
                              "Content-Type": "application/octet-stream"}


def block(port: int, bodies: list, concurrency: int, per_client: int) -> list:
    """`concurrency` clients, each on one keep-alive connection, `per_client` requests each: latencies (ms)."""
    out, lock = [], threading.Lock()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            for i in range(per_client):
                body, headers = bodies[(k * per_client + i) % len(bodies)]
                t = time.perf_counter()
                conn.request("POST", f"/v2/models/{MODEL}/infer", body, headers)
                r = conn.getresponse()
                r.read()
                assert r.status == 200, r.status
                with lock:
                    out.append((time.perf_counter() - t) * 1000)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default="model_repository")
    ap.add_argument("--images", default="build/shapes")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default="benchmarks/results/front_cost.json")
    args = ap.parse_args()

    from edet_deploy.data import CocoDataset, generate_shapes

    if not Path(args.images).exists():
        generate_shapes(args.images, {"val": 32}, progress=False)
    ds = CocoDataset(args.images, "val")
    bodies = [request(ds.image_path(i).read_bytes()) for i in range(min(32, len(ds)))]
    http_port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edet_deploy", "serve", "--repo", args.repo, "--http-port",
                             str(http_port), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline, line = time.monotonic() + 400, ""
        while time.monotonic() < deadline and "serving" not in line and proc.poll() is None:
            line = proc.stdout.readline()
        assert "serving" in line, "serve did not start"
        triton = next(argv for _, argv in child_processes(proc.pid) if argv[0].endswith(b"/tritonserver"))
        direct = int(next(a for a in triton if a.startswith(b"--http-port=")).split(b"=")[1])
        block(http_port, bodies, 4, 4)  # warm-up, both paths
        block(direct, bodies, 4, 4)
        rows = {}
        for concurrency, per_client in ((1, 20), (16, 4)):
            lat = {"front": [], "direct": []}
            for r in range(args.rounds):
                order = ("front", "direct") if r % 2 == 0 else ("direct", "front")
                for path in order:
                    lat[path] += block(http_port if path == "front" else direct, bodies, concurrency, per_client)
            p50 = {k: round(float(np.median(v)), 2) for k, v in lat.items()}
            rows[concurrency] = {"p50_ms": p50, "n": {k: len(v) for k, v in lat.items()},
                                 "front_minus_direct_ms": round(p50["front"] - p50["direct"], 2),
                                 "ratio": round(p50["front"] / p50["direct"], 3)}
            print(f"concurrency {concurrency}: p50 front {p50['front']} ms, direct {p50['direct']} ms "
                  f"({rows[concurrency]['front_minus_direct_ms']:+} ms, n={len(lat['front'])} each)", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    report = {"machine": machine_info(None), "repo": args.repo, "images": len(bodies), "rounds": args.rounds,
              "protocol": "HTTP/1.1 keep-alive, binary tensor extension", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
