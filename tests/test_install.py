"""The serving install pulls no PyTorch: pip resolves `.[serve]` (dry run, nothing installed) for Python 3.11
and 3.12, and the resolved set must hold the serving stack but not torch, torchvision or timm."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPORT_ONLY = {"torch", "torchvision", "timm"}


def resolve(extra: str, python_version: str, tmp_path: Path) -> set:
    report = tmp_path / f"report-{python_version}.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--no-build-isolation", "--report", str(report), "--python-version", python_version,
           "--only-binary=:all:", f"{ROOT}[{extra}]"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0 and any(s in out.stderr for s in ("NewConnectionError", "Network is unreachable",
                                                            "Temporary failure in name resolution")):
        pytest.skip("no package index reachable")
    assert out.returncode == 0, out.stderr[-3000:]
    return {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}


@pytest.mark.parametrize("python_version", ["3.11", "3.12"])
def test_serve_install_pulls_no_torch(python_version, tmp_path):
    names = resolve("serve", python_version, tmp_path)
    assert {"edet-deploy", "onnxruntime", "numpy", "numba", "nvidia-pytriton", "tritonclient"} <= names, names
    assert not names & EXPORT_ONLY, sorted(names & EXPORT_ONLY)
