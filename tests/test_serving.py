"""Serving without PyTorch (slim install), the decoded-image ensemble input, perf_analyzer / Model Analyzer
files, batching defaults, and the plan <-> server TensorRT agreement."""
import base64
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_same_detections, relabelled_graph
from edet_deploy import EdetError
from edet_deploy.detector import Detector

pytest.importorskip("tritonclient")
pytest.importorskip("pytriton")

from tritonclient.grpc import model_config_pb2  # noqa: E402

from edet_deploy.triton.client import TritonDetectorClient  # noqa: E402
from edet_deploy.triton.configs import ENGINE_QUEUE_DELAY_US  # noqa: E402
from edet_deploy.triton.repo import generate_repository  # noqa: E402
from edet_deploy.triton.tuning import default_tuning_images, perf_input_path  # noqa: E402
from edet_deploy.triton.verify import load_configs, validate_repository  # noqa: E402
from edet_deploy.measure import free_port  # noqa: E402
from edet_deploy.triton.server import TritonServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "torchvision", "timm")
# A process where importing torch, torchvision or timm fails, as in a slim install.
BLOCKER = textwrap.dedent(f"""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
    sys.meta_path.insert(0, _Block())
""")


@pytest.fixture(scope="module")
def graph(random_d0_256):
    return random_d0_256


def run_blocked(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_serving_path_runs_where_torch_cannot_import(graph, tmp_path):
    images = default_tuning_images(3)
    ref = Detector.from_onnx(graph).detect(images)
    np.save(tmp_path / "ref_scores.npy", np.stack([d.scores for d in ref]))
    out = run_blocked(f"""
        import json, numpy as np
        try:
            import torch
            raise SystemExit("torch imported despite the blocker")
        except ImportError:
            pass
        # everything a serving process touches
        import edet_deploy.triton.models.common, edet_deploy.triton.client, edet_deploy.triton.load
        import edet_deploy.triton.server, edet_deploy.trt.compat, edet_deploy.metadata, edet_deploy.nms
        import edet_deploy.trt.check  # what `edet-deploy check` needs: TensorRT's rules, no torch
        from edet_deploy.backends.onnxrt import OnnxRuntimeRunner
        from edet_deploy.preprocess import preprocess
        from edet_deploy.postprocess import split_detections
        from edet_deploy.detector import Detector
        from edet_deploy.triton.repo import generate_repository
        from edet_deploy.triton.tuning import default_tuning_images
        images = default_tuning_images(3)
        det = Detector.from_onnx({str(graph)!r}).detect(images)
        ref = np.load({str(tmp_path / 'ref_scores.npy')!r})
        assert np.allclose(np.stack([d.scores for d in det]), ref, atol=1e-6), "scores differ"
        generate_repository({str(tmp_path / 'repo')!r}, variant="d0", onnx={str(graph)!r},
                            input_formats=("encoded", "decoded"))
        print("ok", sorted(m for m in __import__("sys").modules if m.split(".")[0] in {BLOCKED!r}))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok []"


def test_cli_without_torch_says_what_to_install(tmp_path):
    out = run_blocked(f"""
        import sys
        from edet_deploy.cli import main
        sys.exit(main(["export", "--model", "d0", "--out", {str(tmp_path)!r}]))
    """)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, out.stderr[-2000:]
    assert "pip install 'edet-deploy[export]'" in err[0]


def _blocker_dir(root: Path) -> Path:
    """Packages that shadow torch/torchvision/timm and fail on import (the Python stubs ignore meta-path
    hooks set elsewhere, but read EDET_DEPLOY_SYS_PATH first)."""
    for name in BLOCKED:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(textwrap.dedent(f"""
            import os, traceback
            # record who imports us: the first frame outside the import machinery
            frames = [f.filename for f in traceback.extract_stack() if not f.filename.startswith("<")]
            with open(os.path.join(os.path.dirname(__file__), "..", "attempts"), "a") as log:
                log.write("{name} " + (frames[-2] if len(frames) > 1 else "?") + "\\n")
            raise ModuleNotFoundError("No module named '{name}' (blocked)", name="{name}")
        """))
    return root


CLASS_NAMES = [f"class {i}" for i in range(90)]


@pytest.fixture(scope="module")
def served(graph, tmp_path_factory):
    """Both ensembles, on a graph with class names; the config API open, so clients read them there."""
    d = tmp_path_factory.mktemp("served")
    named = relabelled_graph(graph, d / "named", class_names=CLASS_NAMES)
    repo = generate_repository(d / "repo", variant="d0", onnx=str(named), input_formats=("encoded", "decoded"))
    blocker = _blocker_dir(d / "blocker")
    server = TritonServer(repo, free_port(), free_port(), free_port(), log_file=d / "triton.log",
                          open_apis=("model-config",))
    server.env["EDET_DEPLOY_SYS_PATH"] = os.pathsep.join([str(blocker), server.env["EDET_DEPLOY_SYS_PATH"]])
    server.start()
    yield server, repo, blocker
    server.stop()


def test_triton_models_serve_without_torch_jpeg_and_decoded(served, graph):
    server, repo, blocker = served
    images = default_tuning_images(3)
    local = Detector.from_onnx(graph).detect(images)
    for model, fmt in (("efficientdet_d0", "encoded"), ("efficientdet_d0_decoded", "decoded")):
        client = TritonDetectorClient(server.grpc_url, model, "grpc", input_format=fmt)
        remote = [client.detect([img])[0] for img in images]
        client.close()
        for got, ref in zip(remote, local):
            assert_same_detections(got.boxes, got.scores, got.classes, ref.boxes, ref.scores, ref.classes,
                                   box_atol=1e-2, score_atol=1e-5)
    # None of our code in the stubs even tried to import torch, torchvision or timm (onnxruntime-extensions'
    # optional converter module probes torch and carries on without it).
    attempts = (blocker / "attempts").read_text().splitlines() if (blocker / "attempts").exists() else []
    ours = [a for a in attempts if str(ROOT / "edet_deploy") in a or str(ROOT / "kernels") in a]
    assert not ours, attempts


def test_client_reads_class_names_once_from_the_ensemble_config(served, monkeypatch):
    server, _, _ = served
    for url, protocol in ((server.http_url, "http"), (server.grpc_url, "grpc")):
        client = TritonDetectorClient(url, "efficientdet_d0", protocol)
        assert client.class_names == tuple(CLASS_NAMES)
        monkeypatch.setattr(client.client, "get_model_config", lambda *a, **k: pytest.fail("config read again"))
        dets = client.detect(default_tuning_images(2))
        client.close()
        assert all(d.class_names == CLASS_NAMES for d in dets)
        assert [d.label(0) for d in dets] == [CLASS_NAMES[d.classes[0]] for d in dets]


def test_client_command_sends_decoded_images_to_the_decoded_ensemble(served, graph, tmp_path):
    """`client --input-format decoded` with the encoded ensemble's name (the default) goes to its _decoded
    twin; naming the decoded ensemble itself works too."""
    server, _, _ = served
    image = tmp_path / "a.jpg"
    image.write_bytes(default_tuning_images(1)[0])
    want = Detector.from_onnx(graph).detect([image.read_bytes()])[0]
    for model in ("efficientdet_d0", "efficientdet_d0_decoded"):
        proc = subprocess.run([sys.executable, "-m", "edet_deploy", "client", str(image), "--url", server.http_url,
                               "--model", model, "--input-format", "decoded", "--min-score", "0", "--json", "-"],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)[0]["detections"]
        np.testing.assert_allclose([d["score"] for d in got], want.scores, atol=1e-5)
        assert [d["label"] for d in got] == [CLASS_NAMES[c] for c in want.classes]


def test_decoded_batch_of_one_size_and_bad_arrays(served):
    server, _, _ = served
    client = TritonDetectorClient(server.http_url, "efficientdet_d0_decoded", "http", input_format="decoded")
    frames = [np.full((120, 160, 3), v, np.uint8) for v in (0, 90, 200)]
    assert len(client.detect(frames)) == 3  # one request, batch of 3 same-sized frames
    with pytest.raises(EdetError, match="share a size"):
        client.detect([frames[0], np.zeros((10, 10, 3), np.uint8)])
    import tritonclient.http as tc
    inp = tc.InferInput("IMAGE", [1, 0, 5, 3], "UINT8")
    inp.set_data_from_numpy(np.zeros((1, 0, 5, 3), np.uint8))
    with pytest.raises(tc.InferenceServerException, match="HxWx3"):
        client.client.infer("efficientdet_d0_decoded", [inp])
    assert len(client.detect(frames[:1])) == 1  # the stub carries on
    client.close()


def _tensor_from_perf_input(entry: dict, input_format: str):
    """Read one perf_analyzer input entry as perf_analyzer documents it: base64 content, explicit shape (the
    full shape, batch 1 first: the ensemble declares max_batch_size 0); BYTES elements are a 4-byte
    little-endian length followed by the bytes."""
    raw = base64.b64decode(entry["IMAGE"]["content"]["b64"])
    shape = entry["IMAGE"]["shape"]
    assert shape[0] == 1, shape
    if input_format == "encoded":
        n = int.from_bytes(raw[:4], "little")
        assert shape == [1, 1] and len(raw) == 4 + n
        return raw[4:]
    return np.frombuffer(raw, np.uint8).reshape(shape)[0]


def test_perf_analyzer_input_and_model_analyzer_config(served, graph):
    import yaml

    server, repo, _ = served
    local = Detector.from_onnx(graph).detect(default_tuning_images())
    for model, fmt in (("efficientdet_d0", "encoded"), ("efficientdet_d0_decoded", "decoded")):
        data = json.loads(perf_input_path(repo, model).read_text())["data"]
        assert len(data) == len(local)
        client = TritonDetectorClient(server.grpc_url, model, "grpc", input_format=fmt)
        for entry, ref in zip(data, local):
            got = client.detect([_tensor_from_perf_input(entry, fmt)])[0]
            np.testing.assert_allclose(got.scores, ref.scores, atol=1e-5)
        client.close()
    cfg = yaml.safe_load((repo / "model_analyzer.yaml").read_text())
    # paths relative to the repository's parent (Model Analyzer runs there; test_deploy loads it with its loader)
    assert repo.parent / cfg["model_repository"] == repo and cfg["run_config_search_mode"] == "quick"
    assert set(cfg["profile_models"]) == {"efficientdet_d0", "efficientdet_d0_decoded"}
    for name, prof in cfg["profile_models"].items():
        assert load_configs(repo)[name].platform == "ensemble"
        assert repo.parent / prof["perf_analyzer_flags"]["input-data"] == perf_input_path(repo, name)


def test_batching_defaults(graph, tmp_path):
    generated = load_configs(generate_repository(tmp_path / "r", variant="d0", onnx=str(graph), copy_artifact=False))
    committed = load_configs(ROOT / "model_repository")  # regenerated with `make repo`
    for configs in (generated, committed):
        engine = configs["efficientdet_d0_engine"]
        assert engine.HasField("dynamic_batching") and not engine.dynamic_batching.preferred_batch_size
        assert engine.dynamic_batching.max_queue_delay_microseconds == ENGINE_QUEUE_DELAY_US["cpu"] == 0
        post = configs["efficientdet_d0_postprocess"]
        assert post.HasField("dynamic_batching") and post.dynamic_batching.max_queue_delay_microseconds == 0
        # Preprocess takes each request alone: one malformed BYTES request must not fail its batch-mates
        # (test_faults.py::test_a_malformed_request_fails_alone).
        assert not configs["efficientdet_d0_preprocess"].HasField("dynamic_batching")
    assert perf_input_path(ROOT / "model_repository", "efficientdet_d0").is_file()


def test_ensemble_names_its_batch_and_readers_follow(graph, tmp_path):
    """The ensembles declare max_batch_size 0 with the batch as their first dim (IMAGE [-1, 1] / [-1, -1, -1, 3],
    outputs [-1, ...]; configs.ENSEMBLE_MAX_BATCH_SIZE), the members batch: the validator takes that wiring, the
    front and the canary read the members' bound (8) and the dims without the batch, and the validator still
    refuses a batch above a member's and dims that disagree."""
    from edet_deploy.triton.front import check_inference, repository_models
    from edet_deploy.triton.supervisor import canary_request
    from edet_deploy.triton.verify import batch_bound

    repo = generate_repository(tmp_path / "r", variant="d0", onnx=str(graph), copy_artifact=False,
                               input_formats=("encoded", "decoded"))
    configs = load_configs(repo)
    for name, dims in (("efficientdet_d0", [-1, 1]), ("efficientdet_d0_decoded", [-1, -1, -1, 3])):
        ens = configs[name]
        assert ens.max_batch_size == 0 and list(ens.input[0].dims) == dims
        assert all(o.dims[0] == -1 for o in ens.output)
        assert batch_bound(ens, configs) == (8, True)
    assert batch_bound(configs["efficientdet_d0_engine"], configs) == (8, False)
    models = repository_models(repo)
    assert models["efficientdet_d0"].max_batch_size == 8 and models["efficientdet_d0"].inputs == (
        ("IMAGE", "BYTES", (1,)),)
    assert models["efficientdet_d0_decoded"].inputs == (("IMAGE", "UINT8", (-1, -1, 3)),)
    body, n = canary_request(models["efficientdet_d0"])
    assert json.loads(body[:n])["inputs"][0]["shape"] == [1, 1]
    body, n = canary_request(models["efficientdet_d0_decoded"])
    assert json.loads(body[:n])["inputs"][0]["shape"] == [1, 16, 16, 3]

    def request(batch):
        return {"inputs": [{"name": "IMAGE", "shape": [batch, 1], "datatype": "BYTES",
                            "parameters": {"binary_data_size": 5 * batch}}]}

    bound = models["efficientdet_d0"].max_batch_size
    assert check_inference(request(8), 40, bound) is None
    assert "batch 9" in check_inference(request(9), 45, bound)
    # The validator: a fixed batch dim above a member's max_batch_size, and dims that disagree with a member's.
    path = repo / "efficientdet_d0" / "config.pbtxt"
    text = path.read_text()
    path.write_text(text.replace("dims: -1\n  dims: 1\n}", "dims: 16\n  dims: 1\n}", 1))
    with pytest.raises(EdetError, match="batch dim 16 exceeds efficientdet_d0_preprocess's max_batch_size 8"):
        validate_repository(repo)
    path.write_text(text.replace("dims: -1\n  dims: 1\n}", "dims: 1\n}", 1))  # the old, batching-less dims
    with pytest.raises(EdetError, match=r"'IMAGE' is TYPE_STRING\[1\] but efficientdet_d0_preprocess.IMAGE wants"):
        validate_repository(repo)
    path.write_text(text)
    assert "efficientdet_d0" in validate_repository(repo)


# --- the plan and the server agree on TensorRT -------------------------------------------------------------

def fake_plan(graph: Path, tmp_path: Path, version: str, capability: str = "9.0") -> Path:
    """A plan file with the sidecar `edet-deploy build` writes (TensorRT itself is not installed here)."""
    from edet_deploy.io import sha256_file
    from edet_deploy.metadata import read_metadata

    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not really a plan")
    meta = dict(read_metadata(graph), tensorrt={"version": version, "gpu": "NVIDIA H100 80GB HBM3",
                                                "compute_capability": capability, "batch_profile": [1, 4, 8]},
                plan_sha256=sha256_file(plan))
    (tmp_path / "model.json").write_text(json.dumps(meta))
    return plan


def test_same_tensorrt():
    from edet_deploy.trt.compat import same_tensorrt

    assert same_tensorrt("11.4", "11.4.0.106") and same_tensorrt("11.4.0.106", "11.4.0.106")
    assert not same_tensorrt("11.4.0.106", "11.4.1.3") and not same_tensorrt("11.3", "11.4.0.106")
    assert not same_tensorrt("10.13.3.9", "11.4")
    with pytest.raises(EdetError):
        same_tensorrt("11", "11.4")


def test_gpu_repository_refuses_plan_from_other_tensorrt(graph, tmp_path):
    from edet_deploy.cli import main

    plan = fake_plan(graph, tmp_path, "10.13.3.9")
    with pytest.raises(EdetError, match=r"TensorRT 10\.13\.3\.9 .*TensorRT 11\.4"):
        generate_repository(tmp_path / "repo", variant="d0", engine=str(plan), target="gpu", tensorrt_version="11.4")
    proc = subprocess.run([sys.executable, "-m", "edet_deploy", "triton-repo", "--target", "gpu", "--engine",
                           str(plan), "--tensorrt-version", "11.4.0.106", "--out", str(tmp_path / "cli_repo")],
                          capture_output=True, text=True, cwd=ROOT)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "rebuild" in err[0], proc.stderr
    assert not (tmp_path / "cli_repo").exists()
    # without a stated version and no TensorRT here: one line asking for it
    assert main(["triton-repo", "--target", "gpu", "--engine", str(plan), "--out", str(tmp_path / "x")]) == 2


def test_gpu_repository_carries_plan_tensorrt_and_gpu(graph, tmp_path):
    plan = fake_plan(graph, tmp_path, "11.4.0.106")
    repo = generate_repository(tmp_path / "repo", variant="d0", engine=str(plan), target="gpu",
                               tensorrt_version="11.4")
    text = (repo / "efficientdet_d0_engine" / "config.pbtxt").read_text()
    from google.protobuf import text_format
    engine = text_format.Parse(text, model_config_pb2.ModelConfig())
    params = {k: v.string_value for k, v in engine.parameters.items()}
    assert params == {"tensorrt_version": "11.4.0.106", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert engine.platform == "tensorrt_plan" and not engine.dynamic_batching.preferred_batch_size
    assert engine.dynamic_batching.max_queue_delay_microseconds == ENGINE_QUEUE_DELAY_US["gpu"] > 0
    assert (repo / "efficientdet_d0_engine" / "1" / "model.plan").read_bytes() == plan.read_bytes()
    validate_repository(repo)


def test_runner_check_refuses_plan_from_other_tensorrt(graph, tmp_path, monkeypatch):
    """The TensorRT runner's check (trt.builder.check_plan_matches_machine) with a stand-in tensorrt module."""
    import types

    from edet_deploy.metadata import read_metadata
    from edet_deploy.trt import builder, compat

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.4.0.106"))
    monkeypatch.setattr(compat, "gpu_properties", lambda device=0: ("NVIDIA H100 80GB HBM3", "9.0"))
    old = read_metadata(fake_plan(graph, tmp_path, "11.3.0.99"))
    with pytest.raises(EdetError) as e:
        builder.check_plan_matches_machine(old)
    assert len(str(e.value).splitlines()) == 1 and "11.3.0.99" in str(e.value) and "11.4.0.106" in str(e.value)
    builder.check_plan_matches_machine(read_metadata(fake_plan(graph, tmp_path, "11.4.0.106")))  # accepted
    with pytest.raises(EdetError, match="compute capability 8.0"):
        builder.check_plan_matches_machine(read_metadata(fake_plan(graph, tmp_path, "11.4.0.106", "8.0")))


def test_compat_check_plan_command(graph, tmp_path):
    def check(*args):
        return subprocess.run([sys.executable, "-m", "edet_deploy.trt.compat", "check-plan", *args],
                              capture_output=True, text=True, cwd=ROOT)
    plan = fake_plan(graph, tmp_path, "11.4.0.106")
    ok = check(str(plan), "--tensorrt-version", "11.4", "--compute-capability", "9.0")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    stale = check(str(plan), "--tensorrt-version", "11.5", "--compute-capability", "9.0")
    assert stale.returncode == 1 and "11.4.0.106" in stale.stdout
    other_gpu = check(str(plan), "--tensorrt-version", "11.4", "--compute-capability", "8.6")
    assert other_gpu.returncode == 1 and "8.6" in other_gpu.stdout
    assert check(str(tmp_path / "missing.plan"), "--tensorrt-version", "11.4").returncode == 1


def test_grpc_front_refuses_a_taken_port_and_counts_its_slots():
    """GrpcFront binds in its constructor: a port something listens on is one clear error (no SO_REUSEPORT
    sharing). Started against no tritonserver, it answers health from `Upstream` itself and refuses inference
    with UNAVAILABLE, and the in-flight bound's slots all come back (Upstream.in_flight returns to 0)."""
    import socket

    import grpc
    import numpy as np
    import tritonclient.grpc as grpcclient

    from edet_deploy.measure import free_port
    from edet_deploy.triton.front import ModelInfo, Upstream
    from edet_deploy.triton.grpc_front import GrpcFront

    upstream = Upstream("127.0.0.1", free_port(), {"m": ModelInfo(8)}, grpc_port=free_port(), max_in_flight=2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(EdetError, match=f"grpc port {taken.getsockname()[1]} on 127.0.0.1 is already in use"):
            GrpcFront(upstream, "127.0.0.1", taken.getsockname()[1])
    front = GrpcFront(upstream, "127.0.0.1", 0).start()
    client = grpcclient.InferenceServerClient(front.url)
    try:
        assert client.is_server_live() and not client.is_server_ready()  # tritonserver not up
        upstream.up = True
        assert client.is_server_ready() and client.is_model_ready("m")
        upstream.down = {"m"}
        assert not client.is_model_ready("m")
        upstream.down = set()
        data = grpcclient.InferInput("x", [1, 4], "FP32")
        data.set_data_from_numpy(np.zeros((1, 4), np.float32))
        for _ in range(4):  # nothing listens behind it: UNAVAILABLE, and the slot comes back each time
            with pytest.raises(grpcclient.InferenceServerException) as refused:
                client.infer("m", [data], client_timeout=30)
            assert refused.value.status() == str(grpc.StatusCode.UNAVAILABLE)
        assert upstream.in_flight == 0
        upstream.in_flight = 2  # two requests running elsewhere: the bound refuses the next at once
        with pytest.raises(grpcclient.InferenceServerException, match="at capacity"):
            client.infer("m", [data], client_timeout=30)
        upstream.in_flight = 0
    finally:
        client.close()
        assert front.drain(1.0) == 0
        front.close()
