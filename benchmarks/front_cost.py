"""What serve's fronts cost a good request: `edet-deploy serve` on a repository, then good requests (real shapes
images) sent alternately in blocks to a front and straight to tritonserver's loopback port behind it (read from
its command line), at concurrency 1 and 16, per protocol: HTTP (binary tensor extension, keep-alive connections;
the HTTP front) and gRPC (one tritonclient channel per client; the gRPC front). p50 per path. 127.0.0.1 only;
every loop bounded. Writes benchmarks/results/front_cost.json.

    python benchmarks/front_cost.py --repo model_repository [--rounds 6]
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

from edet_deploy import contract
from edet_deploy.measure import machine_info
from serve_process import serve_process

MODEL = "efficientdet_d0"


def request(blob: bytes) -> tuple:
    payload = len(blob).to_bytes(contract.BYTES_LENGTH_PREFIX, "little") + blob
    header = json.dumps({"inputs": [{"name": contract.IMAGE, "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {contract.BINARY_DATA_SIZE: len(payload)}}],
                         "outputs": [{"name": n, "parameters": {"binary_data": False}}
                                     for n in contract.OUTPUTS]}).encode()
    return header + payload, {contract.INFERENCE_HEADER_LENGTH: str(len(header)),
                              "Content-Type": "application/octet-stream"}


def http_client(port: int, bodies: list, k: int, per_client: int, record) -> None:
    """One keep-alive HTTP connection, `per_client` requests."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for i in range(per_client):
            body, headers = bodies[(k * per_client + i) % len(bodies)]
            t = time.perf_counter()
            conn.request("POST", f"/v2/models/{MODEL}/infer", body, headers)
            r = conn.getresponse()
            r.read()
            assert r.status == 200, r.status
            record(t)
    finally:
        conn.close()


def grpc_client(port: int, images: list, k: int, per_client: int, record) -> None:
    """One gRPC channel (tritonclient), `per_client` requests."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        for i in range(per_client):
            image = grpcclient.InferInput(contract.IMAGE, [1, 1], "BYTES")
            image.set_data_from_numpy(np.array([[images[(k * per_client + i) % len(images)]]], dtype=np.object_))
            t = time.perf_counter()
            client.infer(MODEL, [image], client_timeout=120)
            record(t)
    finally:
        client.close()


def block(client, port: int, data: list, concurrency: int, per_client: int) -> list:
    """`concurrency` clients (`http_client` or `grpc_client`), `per_client` requests each: latencies (ms)."""
    out, lock = [], threading.Lock()

    def record(t0: float) -> None:
        with lock:
            out.append((time.perf_counter() - t0) * 1000)

    def run(k: int) -> None:
        client(port, data, k, per_client, record)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(concurrency)]
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
    images = [ds.image_path(i).read_bytes() for i in range(min(32, len(ds)))]
    bodies = [request(blob) for blob in images]
    protocols = {}
    with serve_process(args.repo) as served:
        behind = {p: served.behind(p) for p in ("http", "grpc")}
        paths = {"http": (http_client, bodies, served.http_port), "grpc": (grpc_client, images, served.grpc_port)}
        for protocol, (client, data, front_port) in paths.items():
            block(client, front_port, data, 4, 4)  # warm-up, both paths
            block(client, behind[protocol], data, 4, 4)
            rows = protocols[protocol] = {}
            for concurrency, per_client in ((1, 20), (16, 4)):
                lat = {"front": [], "direct": []}
                for r in range(args.rounds):
                    order = ("front", "direct") if r % 2 == 0 else ("direct", "front")
                    for path in order:
                        port = front_port if path == "front" else behind[protocol]
                        lat[path] += block(client, port, data, concurrency, per_client)
                p50 = {k: round(float(np.median(v)), 2) for k, v in lat.items()}
                rows[concurrency] = {"p50_ms": p50, "n": {k: len(v) for k, v in lat.items()},
                                     "front_minus_direct_ms": round(p50["front"] - p50["direct"], 2),
                                     "ratio": round(p50["front"] / p50["direct"], 3)}
                print(f"{protocol} concurrency {concurrency}: p50 front {p50['front']} ms, direct {p50['direct']} ms "
                      f"({rows[concurrency]['front_minus_direct_ms']:+} ms, n={len(lat['front'])} each)", flush=True)
    report = {"machine": machine_info(None), "repo": args.repo, "images": len(bodies), "rounds": args.rounds,
              "clients": {"http": "HTTP/1.1 keep-alive, binary tensor extension", "grpc": "tritonclient.grpc"},
              "protocols": protocols}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
