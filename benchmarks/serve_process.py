"""`edet-deploy serve` as a child process, as a user runs it, for the benchmarks that measure it (front_cost,
triton_overload): ports chosen free, started until its "serving" line, stopped with SIGTERM (killed if it does not
end within two minutes)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence

from edet_deploy.measure import free_port
from edet_deploy.triton.supervisor import child_processes


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    http_port: int
    grpc_port: int

    def behind(self, protocol: str) -> int:
        """tritonserver's own loopback port for `protocol` (http, grpc), behind serve's front (from its argv)."""
        triton = next(argv for _, argv in child_processes(self.proc.pid) if argv[0].endswith(b"/tritonserver"))
        return int(next(a for a in triton if a.startswith(f"--{protocol}-port=".encode())).split(b"=")[1])


@contextlib.contextmanager
def serve_process(repo: str | Path, extra: Sequence[str] = (), timeout: float = 400.0,
                  code_dir: Optional[str | Path] = None, env: Optional[Dict[str, str]] = None,
                  http_port: Optional[int] = None) -> Iterator[ServeProcess]:
    """`code_dir`: run that checkout's edet_deploy (its own directory and PYTHONPATH) instead of the installed
    one; `env`: more variables for serve's environment."""
    http_port, grpc_port = http_port or free_port(), free_port()
    environment = dict(os.environ, **(env or {}), **({"PYTHONPATH": str(code_dir)} if code_dir else {}))
    proc = subprocess.Popen([sys.executable, "-m", "edet_deploy", "serve", "--repo", str(repo), "--http-port",
                             str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(free_port()),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=code_dir, env=environment)
    try:
        deadline, line = time.monotonic() + timeout, ""
        while time.monotonic() < deadline and "serving" not in line and proc.poll() is None:
            line = proc.stdout.readline()
        if "serving" not in line:
            raise RuntimeError("serve did not start")
        yield ServeProcess(proc, http_port, grpc_port)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        proc.stdout.close()
