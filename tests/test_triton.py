"""The generated repository served by the real tritonserver (CPU, Python backend) from nvidia-pytriton."""
import io
import json
import os
import platform
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edet_deploy import EdetError
from edet_deploy.detector import Detector
from edet_deploy.export import export_onnx
from conftest import assert_same_detections, encode, relabelled_graph

pytest.importorskip("tritonclient")
pytest.importorskip("pytriton")

from edet_deploy.triton.client import TritonDetectorClient  # noqa: E402
from edet_deploy.backends import DEFAULT_CPU_BACKEND  # noqa: E402
from edet_deploy.triton.configs import build_configs, config_text  # noqa: E402
from edet_deploy.triton.models import ENGINE_BACKENDS  # noqa: E402
from edet_deploy.triton.repo import generate_repository  # noqa: E402
from edet_deploy.triton.spec import RepoSpec  # noqa: E402
from edet_deploy.triton.verify import load_configs, validate_repository  # noqa: E402
from edet_deploy.measure import free_port  # noqa: E402
from edet_deploy.triton.server import TritonServer  # noqa: E402


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(0)
    shapes = [(300, 400), (180, 260), (256, 256)]
    return [encode(rng.integers(0, 255, (*s, 3), dtype=np.uint8), fmt) for s, fmt in zip(shapes, ["JPEG", "PNG", "JPEG"])]


CLASS_NAMES = [f"class {i}" for i in range(90)]


@pytest.fixture(scope="module")
def served(tmp_path_factory, random_d0_256):
    d = tmp_path_factory.mktemp("triton")
    named = relabelled_graph(random_d0_256, d / "named", class_names=CLASS_NAMES)  # labels in the responses
    repo = generate_repository(d / "repo", variant="d0", onnx=str(named), max_batch_size=8)
    server = TritonServer(repo, free_port(), free_port(), free_port(), log_file=d / "triton.log").start()
    yield server, random_d0_256
    server.stop()


def _assert_same_as_local(remote, local):
    """The ensemble's detections equal the in-process pipeline's, image by image."""
    assert len(remote) == len(local)
    for got, ref in zip(remote, local):
        assert len(got) == len(ref) == 100
        assert_same_detections(got.boxes, got.scores, got.classes, ref.boxes, ref.scores, ref.classes,
                               box_atol=1e-2, score_atol=1e-5)


def _served_detections(repo, pictures, tmp_path, model: str = "efficientdet_d0"):
    """A fresh server on `repo`: its detections for the pictures as one batch, then one request each."""
    server = TritonServer(repo, free_port(), free_port(), free_port(), log_file=tmp_path / "triton.log").start()
    try:
        client = TritonDetectorClient(server.grpc_url, model, "grpc")
        remote = client.detect(pictures) + [client.detect([p])[0] for p in pictures]
        client.close()
    finally:
        server.stop()
    return remote


def test_http_and_grpc_match_in_process(served, pictures):
    server, onnx_path = served
    local = Detector.from_onnx(onnx_path).detect(pictures)
    for url, proto in ((server.http_url, "http"), (server.grpc_url, "grpc")):
        client = TritonDetectorClient(url, "efficientdet_d0", proto)
        remote = client.detect(pictures)  # one request, batch of 3
        remote += [client.detect([p])[0] for p in pictures]  # and one request each
        client.close()
        _assert_same_as_local(remote, local + local)


def test_batches_up_to_the_members_bound_equal_single_requests(served, pictures):
    """The ensemble declares max_batch_size 0 and names its batch first (configs.ENSEMBLE_MAX_BATCH_SIZE; its
    metadata stays IMAGE [-1, 1], as for a batching ensemble), the members batch: a request of 2..8 images still
    gives, per image, the detections of one request each, over HTTP and gRPC; 9 images (above the members'
    max_batch_size 8) are the request's fault (400 / INVALID_ARGUMENT from the preprocess member), not the
    server's (500)."""
    from edet_deploy.errors import EdetRuntimeError

    server, _ = served
    images = [pictures[i % len(pictures)] for i in range(9)]
    for url, proto in ((server.http_url, "http"), (server.grpc_url, "grpc")):
        client = TritonDetectorClient(url, "efficientdet_d0", proto)
        meta = client.client.get_model_metadata("efficientdet_d0")
        shape = meta["inputs"][0]["shape"] if proto == "http" else list(meta.inputs[0].shape)
        assert [int(d) for d in shape] == [-1, 1], meta
        singles = [client.detect([p])[0] for p in pictures]
        for b in (2, 5, 8):
            _assert_same_as_local(client.detect(images[:b]), [singles[i % len(pictures)] for i in range(b)])
        with pytest.raises(EdetError, match="batch") as refused:
            client.detect(images)
        assert not isinstance(refused.value, EdetRuntimeError), refused.value
        print(f"\n{proto}, batch of 9: {refused.value}")
        client.close()


@pytest.mark.server  # starts its own tritonserver (no `served` fixture)
def test_lite0_served_matches_in_process_with_its_own_fill(tmp_path):
    """The bundled (trained) shapes Lite0 in a Triton repository, served by the real tritonserver: a wide shapes
    picture (letterboxed: a third of the input is padding) gets the in-process detector's detections. The
    preprocess member pads with the Lite mean (127.5, from the graph's metadata through the `fill` parameter),
    not D0's ImageNet mean: with D0's colour the in-process detections of this picture differ, so equality
    here is the fill, not luck."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from edet_deploy import contract
    from edet_deploy.configs import MEAN_RGB
    from edet_deploy.data import CocoDataset, generate_shapes

    weights = Path(__file__).resolve().parents[1] / "edet_deploy" / "assets" / "shapes_lite0.safetensors"
    graph = export_onnx("lite0", tmp_path / "export", weights=str(weights), dynamic_batch=2).onnx_path
    repo = generate_repository(tmp_path / "repo", onnx=str(graph), max_batch_size=2)
    cfg = text_format.Parse((repo / "efficientdet_lite0_preprocess" / "config.pbtxt").read_text(),
                            model_config_pb2.ModelConfig())
    assert json.loads(cfg.parameters[contract.FILL_PARAMETER].string_value) == [127.5] * 3
    ds = CocoDataset(generate_shapes(tmp_path / "shapes", {"val": 1}, seed=3, progress=False), "val")
    scene = np.asarray(Image.open(ds.image_path(0)).convert("RGB"))
    wide = encode(scene[: scene.shape[0] * 2 // 3], "PNG")  # lossless: both sides decode the same pixels
    local = Detector.from_onnx(graph)
    assert local.fill == (127.5, 127.5, 127.5)
    want = local.detect([wide])
    remote = _served_detections(repo, [wide], tmp_path, "efficientdet_lite0")
    confident = want[0].scores > 0.3
    assert confident.any()  # the trained model finds the shapes: the comparison covers real detections
    _assert_same_as_local(remote, want + want)
    local.fill = MEAN_RGB  # D0's padding colour: other detections, so the equality above is the fill's doing
    d0_fill = local.detect([wide])[0]
    assert not np.allclose(d0_fill.scores, want[0].scores, atol=1e-5, rtol=0)


def test_locked_down_server_labels_come_with_each_response(served, pictures):
    """The config API is closed (the default): the client learns no class names at construction, and labels
    each detection from the labels its response carries."""
    server, _ = served
    client = TritonDetectorClient(server.grpc_url, "efficientdet_d0", "grpc")
    assert client.class_names is None
    dets = client.detect(pictures)
    client.close()
    assert all(len(d) for d in dets)
    assert [[d.label(i) for i in range(len(d))] for d in dets] == \
        [[CLASS_NAMES[c] for c in d.classes] for d in dets]


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edet_deploy", *argv], capture_output=True, text=True, timeout=300)


def test_client_command_url_prefixes_and_unknown_model(served, pictures, tmp_path):
    server, _ = served
    image = tmp_path / "a.jpg"
    image.write_bytes(pictures[0])
    for url in (f"http://{server.http_url}", f"grpc://{server.grpc_url}"):
        proc = _cli("client", str(image), "--url", url, "--min-score", "0", "--json", "-")
        assert proc.returncode == 0, proc.stderr
        assert len(json.loads(proc.stdout)[0]["detections"]) > 0
    proc = _cli("client", str(image), "--url", server.http_url, "--model", "efficientdet_d9")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "serves no model 'efficientdet_d9'" in lines[0]


def test_concurrent_clients(served, pictures):
    server, onnx_path = served
    expected = [d.scores[:5] for d in Detector.from_onnx(onnx_path).detect(pictures)]
    failures, done = [], []

    def worker(k):
        client = TritonDetectorClient(server.http_url if k % 2 else server.grpc_url, "efficientdet_d0",
                                      "http" if k % 2 else "grpc")
        try:
            for i in range(25):
                j = (k + i) % len(pictures)
                det = client.detect([pictures[j]])[0]
                if not np.allclose(det.scores[:5], expected[j], atol=1e-5):
                    failures.append((k, i, "wrong result"))
                done.append(1)
        except Exception as e:  # noqa: BLE001
            failures.append((k, repr(e)))
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not failures and len(done) == 16 * 25


def _http_infer(server, payload: bytes):
    """Raw HTTP (binary tensor extension) so that the status code itself is checked."""
    header = json.dumps({"inputs": [{"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(payload) + 4}}]}).encode()
    body = header + len(payload).to_bytes(4, "little") + payload
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/efficientdet_d0/infer", data=body,
                                 headers={"Inference-Header-Content-Length": str(len(header)),
                                          "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.parametrize("payload,match", [
    (b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 64, b"corrupt|not a decodable"),
    (b"", b"empty"),
    (b"just some text, not an image", b"not a decodable image"),
    ("huge", b"too large"),
])
def test_bad_requests_get_400_and_server_carries_on(served, pictures, payload, match):
    server, _ = served
    if payload == "huge":
        buf = io.BytesIO()
        Image.new("L", (20000, 20000)).save(buf, format="PNG")  # 400 MP declared, tiny file
        payload = buf.getvalue()
    status, body = _http_infer(server, payload)
    assert 400 <= status < 500, (status, body)
    import re
    assert re.search(match, body), body
    status, _ = _http_infer(server, pictures[0])
    assert status == 200


def test_health_and_metrics(served):
    server, _ = served
    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready") as r:
        assert r.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as r:
        text = r.read().decode()
    assert "nv_inference_request_success" in text and 'model="efficientdet_d0"' in text


def test_clean_shutdown(tmp_path, served):
    _, onnx_path = served
    repo = generate_repository(tmp_path / "repo", variant="d0", onnx=str(onnx_path))
    server = TritonServer(repo, free_port(), free_port(), free_port()).start()
    pgid = server.proc.pid
    server.stop()
    assert server.proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # neither the server nor any Python stub is left
    # Full command lines from /proc: `ps` would cut them to the terminal's width.
    holders = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(repo).encode() in cmdline.read_bytes():
                holders.append(cmdline.parent.name)
        except OSError:
            pass
    assert holders == []


@pytest.mark.parametrize("engine_backend", [b for b in ENGINE_BACKENDS if b != DEFAULT_CPU_BACKEND])
def test_other_engine_backend_matches_in_process(tmp_path, served, pictures, engine_backend):
    """The default engine is what `served` runs; here the other CPU engine, served by the real tritonserver: the
    same detections as the in-process pipeline of that backend, a batch of 3 (dynamic batch) and single
    requests."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    _, onnx_path = served
    repo = generate_repository(tmp_path / "repo", variant="d0", onnx=str(onnx_path), engine_backend=engine_backend)
    shim = (repo / "efficientdet_d0_engine" / "1" / "model.py").read_text()
    assert f"engine_{engine_backend} import TritonPythonModel" in shim
    cfg = text_format.Parse((repo / "efficientdet_d0_engine" / "config.pbtxt").read_text(),
                            model_config_pb2.ModelConfig())
    assert cfg.parameters["engine_backend"].string_value == engine_backend
    local = Detector.from_onnx(onnx_path, backend=engine_backend).detect(pictures)
    remote = _served_detections(repo, pictures, tmp_path)
    _assert_same_as_local(remote, local + local)


def test_bf16_openvino_engine_matches_in_process_bf16(tmp_path, served, pictures):
    """`triton-repo --precision bf16`: the OpenVINO engine runs the FP32 graph in bfloat16, served by the real
    tritonserver; the same detections as in-process bf16 at the same batch sizes (bf16 is not f32, so the
    reference is bf16 too)."""
    from edet_deploy.backends.openvino import cpu_has_bf16
    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 instructions (AVX512_BF16 or AMX)")
    _, onnx_path = served
    repo = generate_repository(tmp_path / "repo", variant="d0", onnx=str(onnx_path), precision="bf16")
    local = Detector.from_onnx(onnx_path, backend="openvino", bf16=True)
    want = local.detect(pictures) + [local.detect([p])[0] for p in pictures]
    remote = _served_detections(repo, pictures, tmp_path)
    _assert_same_as_local(remote, want)
    with pytest.raises(EdetError, match="bf16"):
        generate_repository(tmp_path / "r2", variant="d0", onnx=str(onnx_path), precision="bf16",
                            engine_backend="onnxruntime")


def test_engine_backend_choice(served, tmp_path):
    _, onnx_path = served
    repo = generate_repository(tmp_path / "r1", variant="d0", onnx=str(onnx_path), copy_artifact=False)
    shim = (repo / "efficientdet_d0_engine" / "1" / "model.py").read_text()
    assert f"engine_{DEFAULT_CPU_BACKEND} import TritonPythonModel" in shim
    with pytest.raises(EdetError, match="engine backend"):
        generate_repository(tmp_path / "r2", variant="d0", onnx=str(onnx_path), engine_backend="tvm")
    with pytest.raises(EdetError, match="--target cpu"):
        generate_repository(tmp_path / "r3", variant="d0", engine=str(onnx_path), target="gpu",
                            engine_backend="openvino")


def test_gpu_repository_configs_validate(tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    spec = RepoSpec(variant="d3", image_size=896, max_detections=100, class_names=["a", "b"], target="gpu",
                    cuda_graphs=True)
    configs = build_configs(spec)
    repo = tmp_path / "gpu"
    for name, cfg in configs.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(config_text(cfg))
        if cfg.backend == "python":
            (repo / name / "1" / "model.py").write_text("")
    assert len(validate_repository(repo)) == 4
    engine = text_format.Parse((repo / "efficientdet_d3_engine" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert engine.platform == "tensorrt_plan" and engine.optimization.cuda.graphs
    assert engine.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert engine.model_warmup[0].inputs["images"].dims == [896, 896, 3]
    # Break the wiring: the cross-check must notice.
    post = repo / "efficientdet_d3_postprocess" / "config.pbtxt"
    post.write_text(post.read_text().replace("TYPE_FP32", "TYPE_FP16", 1))
    with pytest.raises(EdetError, match="wants|declared"):
        validate_repository(repo)


def _run_as_a_stub(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh Python process that imports the Triton models as a stub does (Triton's
    triton_python_backend_utils, which exists only inside a stub, stood in by an empty module)."""
    preamble = ("import sys, types\n"
                "sys.modules['triton_python_backend_utils'] = types.ModuleType('triton_python_backend_utils')\n")
    return subprocess.run([sys.executable, "-c", preamble + code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])


def test_python_models_do_not_import_torch(random_d0_256):
    """Neither importing the models nor making the engines' runners brings torch into a stub (onnxruntime-
    extensions tries to import it)."""
    code = (
        "import edet_deploy.triton.models.preprocess, edet_deploy.triton.models.postprocess\n"
        "import edet_deploy.triton.models.engine_onnxruntime, edet_deploy.triton.models.engine_openvino\n"
        "import edet_deploy.backends.openvino, edet_deploy.backends.onnxrt\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        f"graph = {str(random_d0_256)!r}\n"
        "ort = edet_deploy.triton.models.engine_onnxruntime.TritonPythonModel().make_runner(graph, 1)\n"
        "ov = edet_deploy.triton.models.engine_openvino.TritonPythonModel()\n"
        "ov.cache_dir, ov.precision = False, 'fp32'\n"
        "ov.make_runner(graph, 1)\n"
        "assert 'torch' not in sys.modules, 'torch imported by a runner'\n"
        "print('ok')\n")
    out = _run_as_a_stub(code)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_engine_runners_hand_back_freed_memory_and_do_not_spin(random_d0_256, tmp_path):
    """The engine stubs' runners, made in a fresh process as a stub makes them (OpenVINO: with a compiled-model
    cache, written then read): what loading freed is already back with the OS (a malloc_trim afterwards finds
    little; before the runners trimmed it found 290-350 MB here, 144 MB of the f32 engine stub's 685 MB for the
    bundled D0), and ONNX Runtime's threads do not spin after a run (they burnt up to a core the other stubs
    need)."""
    code = (
        "import ctypes\n"
        "import edet_deploy.triton.models.engine_onnxruntime as eo, edet_deploy.triton.models.engine_openvino as ev\n"
        "rss = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) >> 10\n"
        "trim = ctypes.CDLL(None).malloc_trim\n"
        f"graph = {str(random_d0_256)!r}\n"
        "for i in range(2):  # compiles and writes the cache, then loads from it\n"
        "    ov = ev.TritonPythonModel()\n"
        f"    ov.cache_dir, ov.precision = {str(tmp_path / 'ovcache')!r}, 'fp32'\n"
        "    runner = ov.make_runner(graph, None)\n"
        "    before = rss(); trim(0); print(f'openvino{i}', before - rss())\n"
        "    del runner\n"
        "ort = eo.TritonPythonModel().make_runner(graph, None)\n"
        "before = rss(); trim(0); print('onnxruntime', before - rss())\n"
        "print('spin', ort.session.get_session_options().get_session_config_entry("
        "'session.intra_op.allow_spinning'))\n")
    out = _run_as_a_stub(code)
    assert out.returncode == 0, out.stderr
    got = dict(line.split() for line in out.stdout.splitlines())
    assert max(int(got["openvino0"]), int(got["openvino1"]), int(got["onnxruntime"])) < 24, got  # MB
    assert got["spin"] == "0"


def test_committed_repository_is_what_the_generator_writes(tmp_path):
    """model_repository/ (configs and shims, committed) equals a fresh generation from the bundled model: a change
    of the generator or of the default engine backend shows up here until `make repo` is rerun."""
    from edet_deploy.demo import ASSET
    committed = Path(__file__).resolve().parents[1] / "model_repository"
    res = export_onnx("d0", tmp_path / "export", weights=str(ASSET), dynamic_batch=8)
    fresh = generate_repository(tmp_path / "repo", variant="d0", onnx=str(res.onnx_path), copy_artifact=False)
    # model_analyzer.yaml names the output path: it is compared by test_serving's tuning-file test instead
    names = sorted(str(p.relative_to(fresh)) for p in fresh.rglob("*") if p.is_file() and p.suffix != ".yaml")
    assert names == sorted(str(p.relative_to(committed)) for p in committed.rglob("*")
                           if p.is_file() and p.suffix in (".pbtxt", ".py", ".json", ".sha256"))
    for name in names:
        assert (fresh / name).read_text() == (committed / name).read_text(), name


def _one_line_error(argv, capsys) -> tuple:
    from edet_deploy.cli import main

    rc = main(argv)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith(("INFO ", "WARNING "))]
    return rc, lines


def _engine_params(repo: Path, name: str = "efficientdet_d0_engine") -> dict:
    return {k: v.string_value for k, v in load_configs(repo)[name].parameters.items()}


def test_triton_repo_takes_variant_and_precision_from_the_graph(served, tmp_path, capsys):
    from edet_deploy.cli import main

    _, onnx_path = served
    int8 = relabelled_graph(onnx_path, tmp_path / "int8", precision="int8")
    assert main(["triton-repo", "--onnx", str(int8), "--no-copy", "--out", str(tmp_path / "r_int8")]) == 0
    assert _engine_params(tmp_path / "r_int8")["precision"] == "int8"
    d2 = relabelled_graph(onnx_path, tmp_path / "d2", variant="d2")
    assert main(["triton-repo", "--onnx", str(d2), "--no-copy", "--out", str(tmp_path / "r_d2")]) == 0
    assert "efficientdet_d2" in load_configs(tmp_path / "r_d2")
    # Stated flags that agree with the graph are accepted; bf16 runs an fp32 graph in bfloat16.
    assert main(["triton-repo", "--onnx", str(d2), "--model", "efficientdet-d2", "--precision", "fp32", "--no-copy",
                 "--out", str(tmp_path / "r_d2b")]) == 0
    assert main(["triton-repo", "--onnx", str(onnx_path), "--precision", "bf16", "--engine-backend", "openvino",
                 "--no-copy", "--out", str(tmp_path / "r_bf16")]) == 0
    assert _engine_params(tmp_path / "r_bf16")["precision"] == "bf16"
    # Unstated, an FP32 graph on the OpenVINO engine runs bf16 where this CPU has bf16 instructions (logged with
    # the CPU); --precision fp32 keeps f32; ONNX Runtime runs the graph's.
    from edet_deploy.backends.openvino import cpu_has_bf16
    assert _engine_params(tmp_path / "r_d2", "efficientdet_d2_engine")["precision"] == ("bf16" if cpu_has_bf16() else "fp32")
    assert "OpenVINO runs the network in" in capsys.readouterr().err
    assert _engine_params(tmp_path / "r_d2b", "efficientdet_d2_engine")["precision"] == "fp32"
    assert main(["triton-repo", "--onnx", str(onnx_path), "--engine-backend", "onnxruntime", "--no-copy",
                 "--out", str(tmp_path / "r_ort")]) == 0
    assert _engine_params(tmp_path / "r_ort")["precision"] == "fp32"
    capsys.readouterr()


def test_engine_compiles_every_batch_size_before_ready(served, pictures):
    """The OpenVINO engine reports, in tritonserver's log, every batch size 1..max_batch compiled while the
    model loaded, and its precision; requests of several batch sizes later add no compilation line."""
    server, _ = served
    client = TritonDetectorClient(server.grpc_url, "efficientdet_d0", "grpc")
    for n in (3, 1, 2):
        assert len(client.detect((pictures * 3)[:n])) == n
    client.close()
    lines = [ln for ln in server.log_file.read_text(errors="replace").splitlines() if "compiled at load" in ln]
    assert len(lines) == 1, lines
    assert "batch sizes [1, 2, 3, 4, 5, 6, 7, 8] compiled at load in" in lines[0]
    assert "OpenVINO runs the network in f32 (as asked)" in lines[0]


@pytest.mark.parametrize("graph_says,flags,message", [
    ({"precision": "fp16"}, ["--precision", "int8"], "is fp16, not int8"),
    ({"precision": "int8"}, ["--precision", "bf16", "--engine-backend", "openvino"], "is int8, not bf16"),
    ({"variant": "d2"}, ["--model", "d0"], "holds d2, not d0"),
])
def test_triton_repo_refuses_flags_that_contradict_the_graph(served, tmp_path, capsys, graph_says, flags, message):
    _, onnx_path = served
    graph = relabelled_graph(onnx_path, tmp_path / "g", **graph_says)
    rc, lines = _one_line_error(["triton-repo", "--onnx", str(graph), *flags, "--out", str(tmp_path / "r")], capsys)
    assert rc == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "r").exists()


def test_serve_refuses_a_repository_without_its_graph(served, tmp_path):
    """A repository written without the graph (as the committed model_repository is before `make repo`): one
    line naming the missing file and the command that writes it, before any server starts."""
    _, onnx_path = served
    repo = generate_repository(tmp_path / "model_repository", variant="d0", onnx=str(onnx_path), copy_artifact=False)
    proc = _cli("serve", "--repo", str(repo), "--http-port", str(free_port()), "--grpc-port", str(free_port()),
                "--metrics-port", str(free_port()))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr  # no "starting tritonserver" either
    missing = repo / "efficientdet_d0_engine" / "1" / "model.onnx"
    assert f"{missing} is missing: run `make repo` or `edet-deploy triton-repo --out {repo} --onnx GRAPH`" in lines[0]
    assert str(repo) not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


@pytest.mark.parametrize("case", ["num_too_large", "num_negative", "size_negative", "scale_nan"])
def test_postprocess_called_directly_validates_its_inputs(served, case):
    """The postprocess member is reachable by name: what it gets from a client instead of the engine is checked
    (0 <= num_detections <= K, positive sizes, finite values) and refused with a 400 for that request alone."""
    import tritonclient.http as httpclient

    from edet_deploy import contract
    server, _ = served
    k = 100
    values = {contract.NUM_DETECTIONS: np.array([[3]], np.int32),
              contract.DETECTION_BOXES: np.zeros((1, k, 4), np.float32),
              contract.DETECTION_SCORES: np.zeros((1, k), np.float32),
              contract.DETECTION_CLASSES: np.zeros((1, k), np.int32)}
    scale, size = np.array([[0.5]], np.float32), np.array([[480, 640]], np.int32)
    if case == "num_too_large":
        values[contract.NUM_DETECTIONS][:] = 10**9
    elif case == "num_negative":
        values[contract.NUM_DETECTIONS][:] = -5
    elif case == "size_negative":
        size[:] = -1
    else:
        scale[:] = np.nan
    tensors = [(contract.raw_output_name(n), v) for n, v in values.items()] + [(contract.SCALE, scale),
                                                                                (contract.ORIG_SIZE, size)]
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        inputs = []
        for name, v in tensors:
            inp = httpclient.InferInput(name, list(v.shape), "INT32" if v.dtype == np.int32 else "FP32")
            inp.set_data_from_numpy(v)
            inputs.append(inp)
        with pytest.raises(httpclient.InferenceServerException) as e:
            client.infer(contract.postprocess_name("efficientdet_d0"), inputs)
        assert e.value.status() == "400", e.value
        assert "must be" in e.value.message(), e.value.message()
        # The member carries on: the ensemble still answers.
        detector = TritonDetectorClient(server.grpc_url, "efficientdet_d0", "grpc")
        assert len(detector.detect([encode(np.zeros((64, 64, 3), np.uint8), "PNG")])) == 1
        detector.close()
    finally:
        client.close()


def test_manifest_covers_every_served_file_and_resign_checks_first(tmp_path, random_d0_256, capsys):
    """The manifest lists every file of the model directories and `sha256sum -c` (an independent reader) agrees;
    each kind of change is named in one problem for its model only; --resign refuses a graph without its
    sidecar and signs an intended config edit."""
    from edet_deploy.cli import main
    from edet_deploy.contract import REPOSITORY_MANIFEST
    from edet_deploy.triton.verify import load_configs, model_problems, verify_served_repository

    repo = generate_repository(tmp_path / "repo", variant="d0", onnx=str(random_d0_256), max_batch_size=8)
    listed = sorted(ln.split("  ", 1)[1] for ln in (repo / REPOSITORY_MANIFEST).read_text().splitlines())
    assert listed == sorted(str(p.relative_to(repo)) for p in repo.glob("*/**/*") if p.is_file())
    check = subprocess.run(["sha256sum", "--strict", "-c", REPOSITORY_MANIFEST], cwd=repo, capture_output=True,
                           text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == len(listed), check.stdout + check.stderr
    assert model_problems(repo) == {}
    (repo / "efficientdet_d0_engine" / "1" / "__pycache__").mkdir()  # what a stub writes: not a change
    (repo / "efficientdet_d0_engine" / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"x")
    assert model_problems(repo) == {}
    post = repo / "efficientdet_d0_postprocess" / "config.pbtxt"
    assert post.read_text().count("count: 1") == 1
    post.write_text(post.read_text().replace("count: 1", "count: 2"))  # an intended edit: two instances
    extra = repo / "efficientdet_d0_preprocess" / "1" / "extra.py"
    extra.write_text("")
    problems = model_problems(repo)
    assert sorted(problems) == ["efficientdet_d0_postprocess", "efficientdet_d0_preprocess"]
    assert "config.pbtxt does not match" in problems["efficientdet_d0_postprocess"]
    assert "extra.py is not in the manifest" in problems["efficientdet_d0_preprocess"]
    extra.unlink()
    with pytest.raises(EdetError, match="config.pbtxt does not match.*--resign"):
        verify_served_repository(repo)
    sidecar = repo / "efficientdet_d0_engine" / "1" / "model.json"
    saved = sidecar.read_bytes()
    sidecar.unlink()
    assert "has no metadata sidecar" in model_problems(repo)["efficientdet_d0_engine"]
    rc, lines = _one_line_error(["triton-repo", "--resign", str(repo)], capsys)
    assert rc == 2 and len(lines) == 1 and "model.onnx has no metadata sidecar" in lines[0], lines  # never signed
    sidecar.write_bytes(saved)
    assert main(["triton-repo", "--resign", str(repo)]) == 0
    assert model_problems(repo) == {}
    assert not (repo / "efficientdet_d0_engine" / "1" / "__pycache__").exists()
    verify_served_repository(repo)
    assert load_configs(repo)["efficientdet_d0_postprocess"].instance_group[0].count == 2


def test_execution_clock_marks_each_call_once_and_overrides_too():
    """A model instance keeps when its execute() began (the supervisor's proof of a stuck instance), readable
    from outside through /proc: 0.0 while idle, the start while inside, a subclass overriding execute() and
    calling ours counted as one call. A path that is no clock (a pid reused) reads 0.0 without blocking."""
    import time

    from edet_deploy.triton.models.common import WatchedModel, find_exec_clock, read_exec_clock

    seen = []

    class Model(WatchedModel):
        def initialize(self, args):
            self.args = args

        def execute(self, requests):
            seen.append(read_exec_clock(path))
            return requests

    class Wrapper(Model):  # a user's subclass: its own execute around ours
        def execute(self, requests):
            seen.append(read_exec_clock(path))
            out = super().execute(requests)
            seen.append(read_exec_clock(path))
            return out

    model = Wrapper()
    model.initialize({})
    path = f"/proc/{os.getpid()}/fd/{model._exec_clock.fd}"
    assert find_exec_clock(os.getpid()) is not None  # this one, or another model's made earlier in this process
    assert read_exec_clock(path) == 0.0
    before = time.monotonic()
    assert model.execute([1]) == [1]
    assert len(seen) == 3 and before <= seen[0] <= time.monotonic() and seen[0] == seen[1] == seen[2]
    assert read_exec_clock(path) == 0.0
    r, w = os.pipe()  # a pid reused: its fd is now a pipe with a writer and nothing to read
    try:
        assert read_exec_clock(f"/proc/{os.getpid()}/fd/{r}") == 0.0
    finally:
        os.close(r)
        os.close(w)
    os.close(model._exec_clock.fd)
