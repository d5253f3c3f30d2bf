"""Item 8 of the serving-hardening issue, measured: RSS of serve's process tree (serve, tritonserver, stubs, from
/proc) before, at the peak of, and every 5 s for 60 s after a burst of N concurrent 6000x4000 JPEG requests,
answers checked against a lone request's. Extra NAME=VALUE arguments go into serve's environment.

    python benchmarks/memory_burst.py CODE_DIR REPO N PORT [NAME=VALUE ...]
"""
import io
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from edet_deploy.triton.supervisor import child_processes
from serve_process import serve_process

def tree(pid):
    """pid and its live descendants (supervisor.child_processes: /proc, zombies left out)."""
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop(); out.append(p)
        frontier.extend(child for child, _ in child_processes(p))
    return out

def rss(pid):
    try:
        return int(next(l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")).split()[1]) / 1024
    except (OSError, StopIteration): return 0.0

def name(pid):
    try:
        a = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if a[0].endswith(b"stub"): return Path(a[1].decode()).parent.parent.name
        return Path(a[0].decode()).name + (" serve" if b"serve" in a else "")
    except OSError: return "?"

def snapshot(pid):
    return {f"{name(p)}:{p}": round(rss(p)) for p in tree(pid)}

def jpeg():
    h, w = 4000, 6000
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // w), (y * 255 // h), ((x + y) * 255 // (w + h))], -1).astype(np.uint8)
    img[1000:2500, 1500:3500] = (200, 30, 30)
    buf = io.BytesIO(); Image.fromarray(img).save(buf, "JPEG", quality=90); return buf.getvalue()

def infer(url, blob, timeout=600):
    data = len(blob).to_bytes(4, "little") + blob
    header = json.dumps({"inputs": [{"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(data)}}],
                         "outputs": [{"name": "num_detections", "parameters": {"binary_data": False}}]}).encode()
    req = urllib.request.Request(f"http://{url}/v2/models/efficientdet_d0/infer", data=header + data,
                                 headers={"Inference-Header-Content-Length": str(len(header))})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())["outputs"][0]["data"]
    except urllib.error.HTTPError as e: return e.code, e.read()[:200]
    except OSError as e: return None, repr(e)

def main(code_dir, repo, n, port, settle=60, env_extra=None):
    with serve_process(repo, code_dir=code_dir, env=env_extra, http_port=port) as served:
        pid = served.proc.pid
        url = f"127.0.0.1:{port}"
        blob = jpeg()
        ref = infer(url, blob)
        assert ref[0] == 200, ref
        time.sleep(3)
        base = snapshot(pid)
        peak, results, lock = dict(base), [], threading.Lock()
        stop = threading.Event()

        def sampler():
            while not stop.is_set():
                for k, v in snapshot(pid).items():
                    peak[k] = max(peak.get(k, 0), v)
                time.sleep(0.2)
        threading.Thread(target=sampler, daemon=True).start()

        def one():
            r = infer(url, blob)
            with lock:
                results.append(r)
        t0 = time.monotonic()
        ts = [threading.Thread(target=one) for _ in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        burst = time.monotonic() - t0
        stop.set()
        after, curve = {}, []
        t1 = time.monotonic()
        while time.monotonic() - t1 < settle:
            time.sleep(5)
            after = snapshot(pid)
            curve.append(round(sum(after.values())))
        ok = sum(1 for r in results if r[0] == 200 and r[1] == ref[1])
        return {"n": n, "jpeg_bytes": len(blob), "burst_s": round(burst, 1), "correct": ok,
                "statuses": sorted({str(r[0]) for r in results}),
                "baseline_mib": round(sum(base.values())), "peak_mib_sum_of_peaks": round(sum(peak.values())),
                "after_mib": round(sum(after.values())), "curve_every_5s": curve,
                "by_process": {k: [base.get(k), peak.get(k), after.get(k)] for k in sorted(set(base) | set(after))}}


if __name__ == "__main__":
    env_extra = dict(kv.split("=", 1) for kv in sys.argv[5:])
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), env_extra=env_extra), indent=1))
