"""deploy/: the container recipe, compose file and Kubernetes kustomization, checked offline by their real
checkers (hadolint, shellcheck, `kubectl kustomize`, kubernetes-validate --strict, checkov, Model Analyzer's own
config loader), plus the entrypoint run with stand-in tools (engine cache logic) and with the real CPU server
(`serve` is what runs in the container)."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.33.0"
TOOLS = ROOT / "build" / "tools"  # `make tools`: linters whose pins clash with ours, each in its own venv


def venv_tool(name: str) -> str:
    exe = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if exe is None:
        pytest.skip(f"{name} is not installed (the dev extra brings it)")
    return exe


def own_venv_tool(env: str, venv: str, name: str) -> str:
    """A tool from its own venv: $env, else build/tools/<venv>/bin/<name> (`make tools` creates it)."""
    exe = os.environ.get(env) or str(TOOLS / venv / "bin" / name)
    if not os.access(exe, os.X_OK):
        pytest.skip(f"{name} not found: run `make tools` (creates {TOOLS / venv}) or set {env}")
    return exe


# --- Dockerfile --------------------------------------------------------------------------------------------

def dockerfile_args() -> dict:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M))


def test_dockerfile_lints_clean(tmp_path):
    hadolint = venv_tool("hadolint")
    out = subprocess.run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # the linter really looks: an unpinned pip install is reported
    bad = tmp_path / "Dockerfile"
    text = (DEPLOY / "Dockerfile").read_text()
    assert '"cuda-python==${CUDA_PYTHON_VERSION}"' in text
    bad.write_text(text.replace('"cuda-python==${CUDA_PYTHON_VERSION}"', "cuda-python"))
    out = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "DL3013" in out.stdout


def test_dockerfile_default_tensorrt_is_documented_and_chosen_by_args():
    args = dockerfile_args()
    # the default: Triton 25.12 + TensorRT 10.13.3.9 (CUDA 13.0), as NVIDIA's compatibility matrix lists it
    assert args["TRITON_IMAGE"] == "nvcr.io/nvidia/tritonserver:25.12-py3"
    assert args["TENSORRT_VERSION"] == "10.13.3.9" and args["TENSORRT_PACKAGE"] == "tensorrt-cu13"
    doc = (ROOT / "docs" / "deploy.md").read_text()
    assert "10.13.3.9" in doc and "compatibility.html" in doc  # the citation
    text = (DEPLOY / "Dockerfile").read_text()
    pip = text.split("RUN pip install", 1)[1].split("&&", 1)[0]
    assert '"${TENSORRT_PACKAGE}==${TENSORRT_VERSION}"' in pip and "[export]" not in pip and "torch" not in pip
    # the other series is one set of build args, spelt the same in the Dockerfile's header and compose
    assert "--build-arg TRITON_IMAGE=nvcr.io/nvidia/tritonserver:26.10-py3" in text
    assert "--build-arg TENSORRT_VERSION=11.4.0.106" in text
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for key, value in compose["services"]["triton"]["build"]["args"].items():
        assert value == f"${{{key}:-{args[key]}}}", key  # compose defaults == the Dockerfile's
    # non-root, serve by default, this image's tritonserver, health from serve's front
    assert re.search(r"^USER 1000$", text, re.M) and 'CMD ["serve"]' in text
    assert "EDET_TRITONSERVER=/opt/tritonserver/bin/tritonserver" in text
    assert "/v2/health/ready" in text.split("HEALTHCHECK", 1)[1]


def test_shell_scripts_pass_shellcheck(tmp_path):
    shellcheck = venv_tool("shellcheck")
    scripts = [DEPLOY / "entrypoint.sh", *sorted((ROOT / "benchmarks").glob("*.sh"))]
    out = subprocess.run([shellcheck, "--severity=style", *map(str, scripts)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    bad = tmp_path / "bad.sh"  # it really looks: an unquoted expansion is reported
    bad.write_text((DEPLOY / "entrypoint.sh").read_text().replace('exec "$@"', "exec $@", 1))
    out = subprocess.run([shellcheck, str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "SC2068" in out.stdout


# --- Kubernetes ----------------------------------------------------------------------------------------------

def kustomize(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (`kubectl kustomize` renders the overlays offline)")
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def rendered(overlay: str) -> dict:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(kustomize(overlay)) if d}


def validate_strict(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([venv_tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, str(path)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_overlays_render_and_validate_strict(overlay, tmp_path):
    out_file = tmp_path / f"{overlay}.yaml"
    out_file.write_text(kustomize(overlay))
    out = validate_strict(out_file)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    # every resource passed, except the Prometheus Operator's CRD, whose schema no validator has offline
    # (its wiring is checked in test_kubernetes_wiring instead)
    others = [ln for ln in lines if " passed for resource " not in ln]
    assert others and all("kind ServiceMonitor" in ln for ln in others), others
    kinds = {d["kind"] for d in yaml.safe_load_all(out_file.read_text()) if d}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor",
            "NetworkPolicy", "PersistentVolumeClaim", "ConfigMap", "Namespace"} <= kinds
    # the validator really looks: a misspelt field is an error
    docs = [d for d in yaml.safe_load_all(out_file.read_text()) if d]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dep))
    assert validate_strict(bad).returncode != 0


def test_fill_models_pod_validates_strict():
    out = validate_strict(K8S / "fill-models.yaml")
    assert out.returncode == 0 and "passed for resource pod/edet-fill-models" in out.stdout, out.stdout + out.stderr


def env_of(container: dict) -> dict:
    return {e["name"]: e["value"] for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_kubernetes_wiring(overlay):
    docs = rendered(overlay)
    dep = docs[("Deployment", "edet-triton")]
    svc, pdb = docs[("Service", "edet-triton")], docs[("PodDisruptionBudget", "edet-triton")]
    hpa, mon = docs[("HorizontalPodAutoscaler", "edet-triton")], docs[("ServiceMonitor", "edet-triton")]
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    (c,) = spec["containers"]
    env = env_of(c)
    assert c["args"] == ["serve"] and env["EDET_TARGET"] == overlay
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    # probes on serve's front: startup = ready, readiness = the ensemble and its members, liveness = serve runs
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["readinessProbe"]["httpGet"]["path"] == f"/v2/models/efficientdet_{env['EDET_MODEL']}/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {c[p]["httpGet"]["port"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} == {"http"}
    # the drain fits the grace period: preStop, the front's drain, then tritonserver's (gRPC) exit timeout
    grace = float(env["EDET_GRACE_PERIOD"])
    assert spec["terminationGracePeriodSeconds"] >= c["lifecycle"]["preStop"]["sleep"]["seconds"] + 2 * grace + 5
    # non-root, read-only root filesystem, writable only where serve and Triton write
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 1000
    for container in [*spec.get("initContainers", []), c]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
        assert sc["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["/dev/shm"]["name"] == "dshm"
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]] and "emptyDir" in volumes[mounts["/models/repository"]["name"]]
    assert mounts["/models/onnx"]["readOnly"]
    models = volumes[mounts["/models/onnx"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert docs[("PersistentVolumeClaim", models)]["spec"]["accessModes"] == ["ReadWriteMany"]
    gpus = [x.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            for x in [*spec.get("initContainers", []), c]]
    if overlay == "gpu":
        # the engine cache: the init step (prepare) writes it on the shared volume, the server reads it
        (init,) = spec["initContainers"]
        assert init["args"] == ["prepare"] and init["image"] == c["image"] and env_of(init)["EDET_TARGET"] == "gpu"
        init_mounts = {m["mountPath"]: m for m in init["volumeMounts"]}
        cache = init_mounts["/models/engines"]
        assert not cache.get("readOnly") and cache["subPath"] == "engines"
        assert cache["name"] == mounts["/models/onnx"]["name"]  # the models volume
        assert mounts["/models/engines"]["subPath"] == "engines" and "/models/repository" in init_mounts
        assert gpus == [1, 1]
    else:
        assert "initContainers" not in spec and gpus == [None] and "nvidia.com/gpu" not in json.dumps(dep)
    labels = pod["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items() and pdb["spec"]["maxUnavailable"] == 1
    assert hpa["spec"]["minReplicas"] >= 2  # with the PDB: a drain never takes the last pod
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == set(ports)
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in mon["spec"]["endpoints"]] == ["metrics"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(docs[("ConfigMap", "edet-triton-adapter-rules")]["data"]["config.yaml"])["rules"]
    assert any(r["name"]["as"] == metric and "nv_inference_queue_duration_us" in r["metricsQuery"] for r in rules)
    netpol = docs[("NetworkPolicy", "edet-triton")]
    assert {p["port"] for rule in netpol["spec"]["ingress"] for p in rule["ports"]} == set(ports.values())
    assert {d["metadata"].get("namespace") for k, d in docs.items() if k[0] != "Namespace"} == {"edet"}


# --- checkov ---------------------------------------------------------------------------------------------------

def checkov(path: Path, framework: str) -> dict:
    exe = own_venv_tool("EDET_CHECKOV", "checkov", "checkov")
    out = subprocess.run([exe, "-f", str(path), "--framework", framework, "--skip-download",
                          "--compact", "-o", "json"], capture_output=True, text=True,
                         env=dict(os.environ, BC_SKIP_MAPPING="TRUE"), timeout=600)
    report = json.loads(out.stdout)
    report = report[0] if isinstance(report, list) else report
    return report


def skips_with_reasons(report: dict) -> list:
    skipped = report.get("results", {}).get("skipped_checks", [])
    for check in skipped:
        assert len((check.get("check_result", {}).get("suppress_comment") or "").strip()) > 20, check["check_id"]
    return sorted(c["check_id"] for c in skipped)


def test_checkov_finds_nothing(tmp_path):
    for overlay in ("gpu", "cpu"):
        (tmp_path / f"{overlay}.yaml").write_text(kustomize(overlay))
    reports = {"gpu": checkov(tmp_path / "gpu.yaml", "kubernetes"), "cpu": checkov(tmp_path / "cpu.yaml", "kubernetes"),
               "fill": checkov(K8S / "fill-models.yaml", "kubernetes"),
               "Dockerfile": checkov(DEPLOY / "Dockerfile", "dockerfile")}
    for name, report in reports.items():
        assert report["summary"]["failed"] == 0 and report["summary"]["passed"] > 20, (
            name, [c["check_id"] for c in report["results"]["failed_checks"]])
        skips_with_reasons(report)  # each skip is inline, with its reason
    assert skips_with_reasons(reports["gpu"]) == ["CKV_K8S_40", "CKV_K8S_43"]
    assert skips_with_reasons(reports["Dockerfile"]) == ["CKV_DOCKER_7"]
    # checkov really looks: a writable root filesystem is reported
    bad = tmp_path / "bad.yaml"
    bad.write_text((tmp_path / "cpu.yaml").read_text().replace("readOnlyRootFilesystem: true",
                                                                 "readOnlyRootFilesystem: false"))
    failed = {c["check_id"] for c in checkov(bad, "kubernetes")["results"]["failed_checks"]}
    assert "CKV_K8S_22" in failed


# --- compose ---------------------------------------------------------------------------------------------------

def test_compose_file_validates_against_the_compose_spec(tmp_path):
    checker = venv_tool("check-jsonschema")  # the lint extra; the compose spec's schema is vendored in it
    out = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "docker-compose.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    bad = tmp_path / "docker-compose.yml"  # it really looks: a misspelt key is refused
    bad.write_text((DEPLOY / "docker-compose.yml").read_text().replace("read_only:", "readonly:"))
    assert subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", str(bad)],
                          capture_output=True, text=True).returncode != 0


def test_compose_and_prometheus_agree():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    triton, prom = compose["services"]["triton"], compose["services"]["prometheus"]
    assert (DEPLOY / triton["build"]["context"] / triton["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    gpu = triton["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "/v2/models/efficientdet_d0/ready" in " ".join(triton["healthcheck"]["test"])
    assert triton["read_only"] and triton["user"].split(":")[0] == "1000" and "/tmp" in triton["tmpfs"]
    grace = float(triton["environment"]["EDET_GRACE_PERIOD"])
    assert float(triton["stop_grace_period"].rstrip("s")) >= 2 * grace
    config_mount = next(v for v in prom["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro"))
    config = yaml.safe_load((DEPLOY / config_mount.split(":")[0]).read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["triton:8002"] and "8002:8002" in triton["ports"]
    assert prom["image"].split(":")[1] not in ("", "latest")


# --- Model Analyzer ----------------------------------------------------------------------------------------------

MA_LOADER = r"""
import json, os, sys
from model_analyzer.cli.cli import CLI
from model_analyzer.config.input.config_command_profile import ConfigCommandProfile
config = ConfigCommandProfile()
cli = CLI()
cli.add_subcommand(cmd="profile", help="profile", config=config)
sys.argv = ["model-analyzer", "profile", "-f", sys.argv[1]]
args, config = cli.parse()
c = config.get_all_config()
# docker mode binds os.path.abspath(<path>) of Model Analyzer's own cwd into Triton's container (server_factory)
print(json.dumps({"repo": os.path.abspath(c["model_repository"]),
                  "output": os.path.abspath(c["output_model_repository_path"]),
                  "shm": c["triton_docker_shm_size"], "cpu_only": c["cpu_only_composing_models"],
                  "mode": c["triton_launch_mode"], "image": c["triton_docker_image"],
                  "inputs": {m.model_name(): os.path.abspath(m.perf_analyzer_flags()["input-data"])
                             for m in config.profile_models}}))
"""


def test_model_analyzer_loads_the_config_with_identical_paths(tmp_path, random_d0_256):
    from edet_deploy.triton.repo import generate_repository

    python = own_venv_tool("EDET_MODEL_ANALYZER", "model-analyzer", "python")
    repo = generate_repository(tmp_path / "work" / "repository", variant="d0", input_formats=("encoded", "decoded"),
                               onnx=str(random_d0_256), copy_artifact=False)
    bin_dir = tmp_path / "bin"  # Model Analyzer only stats perf_analyzer while loading (it cannot run here)
    bin_dir.mkdir()
    (bin_dir / "perf_analyzer").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "perf_analyzer").chmod(0o755)
    script = tmp_path / "load.py"
    script.write_text(MA_LOADER)
    # run as documented: from the repository's parent directory, mounted at the same path
    out = subprocess.run([python, str(script), "repository/model_analyzer.yaml"], cwd=repo.parent,
                         capture_output=True, text=True, env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = json.loads(out.stdout.strip().splitlines()[-1])
    assert cfg["repo"] == str(repo) and Path(cfg["output"]).parent == repo.parent and cfg["mode"] == "docker"
    assert cfg["shm"] == "1G" and cfg["image"] == "edet-deploy-triton:latest"
    assert sorted(cfg["cpu_only"]) == sorted(["efficientdet_d0_preprocess", "efficientdet_d0_preprocess_decoded",
                                              "efficientdet_d0_postprocess", "efficientdet_d0_engine"])
    assert set(cfg["inputs"]) == {"efficientdet_d0", "efficientdet_d0_decoded"}
    assert all(Path(p).is_file() and Path(p).parent == repo for p in cfg["inputs"].values())
    # the documented command mounts the working directory at the same path on both sides and runs from there
    doc = (ROOT / "docs" / "deploy.md").read_text()
    assert '-v "$PWD:$PWD" -w "$PWD"' in doc and "model-analyzer profile -f repository/model_analyzer.yaml" in doc


# --- the entrypoint with stand-in tools ---------------------------------------------------------------------------

def fake_tools(tmp_path: Path) -> Path:
    """Stand-ins for edet-deploy (logs its arguments, writes a plan on build) and tritonserver."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls"
    (bin_dir / "edet-deploy").write_text(
        f"#!/usr/bin/env bash\necho \"edet-deploy $*\" >> {log}\n"
        f"if [[ $1 == build ]]; then {sys.executable} - \"$2\" \"$4\" <<'EOF'\n"
        "import hashlib, json, sys, pathlib\n"
        "onnx, plan = map(pathlib.Path, sys.argv[1:3])\n"
        "plan.write_bytes(b'plan')\n"
        "meta = dict(json.loads(onnx.with_suffix('.json').read_text()),\n"
        "            tensorrt={'version': '11.4.0.106', 'gpu': 'H100', 'compute_capability': '9.0'},\n"
        "            plan_sha256=hashlib.sha256(b'plan').hexdigest())\n"
        "plan.with_suffix('.json').write_text(json.dumps(meta))\n"
        "EOF\nfi\n")
    (bin_dir / "tritonserver").write_text(f"#!/usr/bin/env bash\necho \"tritonserver $*\" >> {log}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def run_entrypoint(tmp_path: Path, models: Path, *args: str, **env_over: str):
    env = dict(os.environ, PATH=f"{fake_tools(tmp_path)}{os.pathsep}{os.environ['PATH']}", EDET_PYTHON=sys.executable,
               EDET_MODELS_DIR=str(models), EDET_SKIP_IMAGE_CHECK="1", EDET_TENSORRT_VERSION="11.4.0.106",
               EDET_COMPUTE_CAPABILITY="9.0", PYTHONPATH=str(ROOT))
    env.pop("EDET_TARGET", None)
    env.update(env_over)
    out = subprocess.run(["bash", str(DEPLOY / "entrypoint.sh"), *args], capture_output=True, text=True, env=env)
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    (tmp_path / "calls").unlink(missing_ok=True)
    return out, calls


def graph_dir(models: Path, data: bytes = b"graph") -> Path:
    (models / "onnx").mkdir(parents=True, exist_ok=True)
    (models / "onnx" / "efficientdet_d0.onnx").write_bytes(data)
    (models / "onnx" / "efficientdet_d0.json").write_text(
        json.dumps({"format": "edet-deploy/1", "variant": "d0", "image_size": 256}))
    return models / "onnx" / "efficientdet_d0.onnx"


def test_entrypoint_caches_engines_by_tensorrt_gpu_and_graph(tmp_path):
    import hashlib

    models = tmp_path / "models"
    onnx = graph_dir(models)
    key = f"trt11.4.0.106-sm90-{hashlib.sha256(onnx.read_bytes()).hexdigest()[:16]}"
    plan = models / "engines" / key / "efficientdet_d0.plan"

    out, calls = run_entrypoint(tmp_path, models, "prepare")  # first pod: build into the cache, with a timing cache
    assert out.returncode == 0, out.stderr
    assert [c.split()[:2] for c in calls] == [["edet-deploy", "build"], ["edet-deploy", "triton-repo"]]
    assert f"--out {plan} --batch 1:4:8" in calls[0]
    assert f"--timing-cache {models}/engines/timing-trt11.4.0.106-sm90.cache" in calls[0]
    assert f"--engine {plan}" in calls[1] and "--tensorrt-version 11.4.0.106" in calls[1]

    out, calls = run_entrypoint(tmp_path, models)  # second pod, same GPU kind: no build; then serve
    assert out.returncode == 0 and "engine cache hit" in out.stderr, out.stderr
    assert [c.split()[:2] for c in calls] == [["edet-deploy", "triton-repo"], ["edet-deploy", "serve"]]
    assert calls[1] == (f"edet-deploy serve --repo {models}/repository --address 0.0.0.0 --http-port 8000 "
                        "--grpc-port 8001 --metrics-port 8002 --grace-period 30")

    out, calls = run_entrypoint(tmp_path, models, "prepare", EDET_COMPUTE_CAPABILITY="8.0")  # another GPU kind
    assert calls[0].startswith("edet-deploy build") and "-sm80-" in calls[0] and plan.is_file()

    onnx.write_bytes(b"another graph")  # a new graph: a new key
    out, calls = run_entrypoint(tmp_path, models, "prepare")
    assert calls[0].startswith("edet-deploy build") and key not in calls[0]

    meta = json.loads(plan.with_suffix(".json").read_text())  # a plan in the right place from another TensorRT
    meta["tensorrt"]["version"] = "11.3.0.99"
    plan.with_suffix(".json").write_text(json.dumps(meta))
    out, calls = run_entrypoint(tmp_path, models, "prepare", EDET_PLAN=str(plan))
    assert out.returncode == 0 and calls[0].startswith("edet-deploy build") and "11.3.0.99" in out.stderr

    out, calls = run_entrypoint(tmp_path, models, "tritonserver", "--model-repository=/elsewhere")
    assert calls == ["tritonserver --model-repository=/elsewhere"]  # Model Analyzer's docker mode

    out, calls = run_entrypoint(tmp_path, models, EDET_TARGET="cpu")  # staging: no TensorRT at all
    assert [c.split()[:2] for c in calls] == [["edet-deploy", "triton-repo"], ["edet-deploy", "serve"]]
    assert f"--target cpu --onnx {onnx}" in calls[0]

    out, calls = run_entrypoint(tmp_path, models, EDET_TARGET="tpu")
    assert out.returncode == 2 and "EDET_TARGET must be gpu or cpu" in out.stderr and not calls

    onnx.unlink()
    out, calls = run_entrypoint(tmp_path, models)
    assert out.returncode == 2 and "no ONNX graph" in out.stderr and not calls


def test_pods_starting_together_build_once(tmp_path):
    """Two `prepare` steps on one cache at the same time (two pods scaled out together): the lock makes one build
    (slowed to 2 s here) and the other wait, then find the plan."""
    models = tmp_path / "models"
    graph_dir(models)
    bin_dir = fake_tools(tmp_path)
    build = (bin_dir / "edet-deploy").read_text().replace("plan.write_bytes(b'plan')",
                                                           "import time; time.sleep(2); plan.write_bytes(b'plan')")
    (bin_dir / "edet-deploy").write_text(build)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", EDET_PYTHON=sys.executable,
               EDET_MODELS_DIR=str(models), EDET_SKIP_IMAGE_CHECK="1", EDET_TENSORRT_VERSION="11.4.0.106",
               EDET_COMPUTE_CAPABILITY="9.0", PYTHONPATH=str(ROOT), EDET_TARGET="gpu")  # what the stand-in builds
    pods = [subprocess.Popen(["bash", str(DEPLOY / "entrypoint.sh"), "prepare"],
                             env=dict(env, EDET_REPO=str(models / f"repo{i}")),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in pods]
    assert [p.returncode for p in pods] == [0, 0], outs
    calls = (tmp_path / "calls").read_text().splitlines()
    assert sum(c.startswith("edet-deploy build") for c in calls) == 1, calls
    assert sum("engine cache hit" in err for _, err in outs) == 1


def test_entrypoint_refuses_a_tensorrt_mismatch_in_one_line(tmp_path):
    """check-image, with a stand-in TensorRT Python module (11.4) and a stand-in libnvinfer (10.13.3, built
    here exporting getInferLibVersion as NvInferVersion.h encodes it): the container stops before anything."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stand-in libnvinfer")
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "nvinfer.c").write_text("int getInferLibVersion(void) { return 10 * 10000 + 13 * 100 + 3; }\n")
    for name in ("libnvinfer.so", "libnvinfer.so.10", "libnvinfer.so.11"):
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib / name), str(lib / "nvinfer.c")], check=True)
    pkg = tmp_path / "py" / "tensorrt"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '11.4.0.106'\n")
    models = tmp_path / "models"
    graph_dir(models)
    out, calls = run_entrypoint(tmp_path, models, EDET_SKIP_IMAGE_CHECK="0", PYTHONPATH=f"{tmp_path / 'py'}:{ROOT}",
                                LD_LIBRARY_PATH=str(lib))
    assert out.returncode != 0 and not calls
    said = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert len(said) == 1 and "11.4.0.106" in said[0] and "10.13.3" in said[0], said


# --- serve on the image's tritonserver ----------------------------------------------------------------------------

def test_serve_takes_the_images_tritonserver_and_the_gpu_repository(tmp_path, random_d0_256, monkeypatch):
    """The GPU repository the entrypoint writes (a tensorrt_plan engine) passes serve's checks, and serve runs the
    binary EDET_TRITONSERVER names with the backends beside it (NVIDIA's /opt/tritonserver layout), restricted."""
    from edet_deploy.errors import EdetError
    from edet_deploy.triton.repo import generate_repository
    from edet_deploy.triton.server import TritonServer, find_triton

    opt = tmp_path / "opt" / "tritonserver"
    (opt / "bin").mkdir(parents=True)
    (opt / "backends" / "python").mkdir(parents=True)
    (opt / "backends" / "tensorrt").mkdir()
    (opt / "bin" / "tritonserver").write_text("#!/bin/sh\nexit 1\n")
    (opt / "bin" / "tritonserver").chmod(0o755)
    monkeypatch.setenv("EDET_TRITONSERVER", str(opt / "bin" / "tritonserver"))
    monkeypatch.delenv("EDET_TRITON_BACKENDS", raising=False)
    paths = find_triton()
    assert (paths.binary, paths.backends, paths.libs) == (opt / "bin" / "tritonserver", opt / "backends", opt / "lib")

    built = tmp_path / "engines" / "efficientdet_d0.plan"  # what `edet-deploy build` leaves: a plan and its sidecar
    built.parent.mkdir()
    built.write_bytes(b"plan")
    meta = json.loads(random_d0_256.with_suffix(".json").read_text())
    meta["tensorrt"] = {"version": "10.13.3.9", "gpu": "NVIDIA H100", "compute_capability": "9.0"}
    meta["plan_sha256"] = hashlib.sha256(b"plan").hexdigest()
    built.with_suffix(".json").write_text(json.dumps(meta))
    repo = generate_repository(tmp_path / "repository", engine=str(built), target="gpu", tensorrt_version="10.13.3.9")
    server = TritonServer(repo)  # validates and verifies the repository as serve does
    cmd = server.cmd
    assert cmd[0] == str(opt / "bin" / "tritonserver") and f"--backend-directory={opt / 'backends'}" in cmd
    assert any(a.startswith("--http-restricted-api=") and "model-repository" in a for a in cmd)
    assert str(opt / "lib") in server.env["LD_LIBRARY_PATH"].split(os.pathsep)

    (opt / "backends" / "python").rmdir()  # no python backend: one line naming both settings
    with pytest.raises(EdetError, match="EDET_TRITONSERVER=.*EDET_TRITON_BACKENDS"):
        find_triton()


def test_entrypoint_without_a_gpu_says_so_in_one_line(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has a GPU")
    models = tmp_path / "models"
    graph_dir(models)
    env = {k: v for k, v in os.environ.items() if k != "EDET_COMPUTE_CAPABILITY"}
    out = subprocess.run(["bash", str(DEPLOY / "entrypoint.sh"), "prepare"], capture_output=True, text=True,
                         env=dict(env, EDET_PYTHON=sys.executable, EDET_MODELS_DIR=str(models),
                                  EDET_SKIP_IMAGE_CHECK="1", EDET_TENSORRT_VERSION="10.13.3.9", PYTHONPATH=str(ROOT)))
    said = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert out.returncode == 1 and len(said) == 1 and "no CUDA GPU found" in said[0], said


# --- the entrypoint in serve mode, with the real CPU server ---------------------------------------------------------

def http(url: str, data: bytes = None, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:  # not listening yet
        return 0


def overload_outcomes(url: str, clients: int = 8, each: int = 4) -> set:
    """Concurrent requests beyond serve's bound on requests in flight (the container runs with
    EDET_MAX_IN_FLIGHT=1): the excess is refused at once with 503 (retryable), through serve's front."""
    import numpy as np
    import tritonclient.http as th

    from edet_deploy import contract
    from edet_deploy.triton.tuning import default_tuning_images

    blob = np.array([[default_tuning_images(1)[0]]], dtype=object)
    seen = []

    def client() -> None:
        c = th.InferenceServerClient(url)
        for _ in range(each):
            inp = th.InferInput(contract.IMAGE, [1, 1], "BYTES")
            inp.set_data_from_numpy(blob)
            try:
                c.infer("efficientdet_d0", [inp])
                seen.append("200")
            except th.InferenceServerException as e:
                seen.append(f"{e.status()} {e.message().split(', ')[-1]}")
        c.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcomes = set(seen)
    assert any(o.startswith("503") and "at capacity" in o for o in outcomes), seen  # 8 clients, 1 slot
    return outcomes


@pytest.mark.server
def test_container_runs_serve_with_the_given_tritonserver(tmp_path, random_d0_256):
    """EDET_TARGET=cpu (the staging overlay): the entrypoint execs `edet-deploy serve` on the tritonserver named
    by EDET_TRITONSERVER (here pytriton's, as the image names its own): health comes from serve's front, admin
    APIs are refused, a detection is answered, SIGTERM drains and exits 0 leaving no shared memory behind."""
    pytest.importorskip("pytriton")
    from edet_deploy.measure import free_port
    from edet_deploy.triton.client import TritonDetectorClient
    from edet_deploy.triton.server import SHM_PREFIX, find_triton
    from edet_deploy.triton.supervisor import child_processes
    from edet_deploy.triton.tuning import default_tuning_images

    paths = find_triton()  # pytriton's binary and the backend directory assembled for this Python
    models = tmp_path / "models"
    (models / "onnx").mkdir(parents=True)
    for src in (random_d0_256, random_d0_256.with_suffix(".json")):
        shutil.copy(src, models / "onnx" / f"efficientdet_d0{src.suffix}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "edet-deploy").write_text(f"#!/usr/bin/env bash\nexec {sys.executable} -m edet_deploy \"$@\"\n")
    (bin_dir / "edet-deploy").chmod(0o755)
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(ROOT), EDET_TARGET="cpu",
               EDET_MODELS_DIR=str(models), EDET_TRITONSERVER=str(paths.binary),
               EDET_TRITON_BACKENDS=str(paths.backends), LD_LIBRARY_PATH=str(paths.libs), EDET_ADDRESS="127.0.0.1",
               EDET_HTTP_PORT=str(http_port),
               EDET_GRPC_PORT=str(grpc_port), EDET_METRICS_PORT=str(metrics_port), EDET_GRACE_PERIOD="5",
               EDET_MAX_IN_FLIGHT="1")
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(["bash", str(DEPLOY / "entrypoint.sh")], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 300
        while http(f"{base}/v2/models/efficientdet_d0/ready") != 200:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready in 300 s"
            time.sleep(1)
        # the entrypoint became serve (exec: same pid), whose child is the tritonserver it was given
        assert b"serve" in Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        servers = [argv for _, argv in child_processes(proc.pid) if argv[0].endswith(b"tritonserver")]
        assert [argv[0] for argv in servers] == [str(paths.binary).encode()]
        # health from the front; admin APIs refused without the key only the supervisor holds
        assert http(f"{base}/v2/health/ready") == 200 and http(f"{base}/v2/health/live") == 200
        assert http(f"{base}/v2/repository/index", data=b"{}") in (401, 403)
        assert http(f"{base}/v2/repository/models/efficientdet_d0_engine/unload", data=b"{}") in (401, 403)
        assert any(a.startswith(b"--http-restricted-api=") for a in servers[0])
        # the repository it serves has no Triton queue policy (serve's fronts bound the load), and it answers
        config = (models / "repository" / "efficientdet_d0_engine" / "config.pbtxt").read_text()
        assert "default_queue_policy" not in config and "dynamic_batching" in config
        assert b"--max-in-flight" in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        client = TritonDetectorClient(f"127.0.0.1:{http_port}", "efficientdet_d0", "http")
        (det,) = client.detect(default_tuning_images(1))
        client.close()
        assert det.boxes.ndim == 2
        outcomes = overload_outcomes(f"127.0.0.1:{http_port}")
        assert all(o == "200" or (o.startswith("503") and "at capacity" in o) for o in outcomes), outcomes
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
    assert not list(Path("/dev/shm").glob(f"{SHM_PREFIX}{proc.pid}_*"))
