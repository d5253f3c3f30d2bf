"""TensorRT parts that run without TensorRT: plugin description and AOT launch, API names against TensorRT
11.4's bindings, the no-TensorRT message; FP16 graph structure."""
import ast
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

from edet_deploy import EdetError
from edet_deploy.cli import main
from edet_deploy.export import export_onnx
from edet_deploy.nms import NmsSettings
from edet_deploy.trt import plugin
from trt_api import TRT_API, TRT_PLUGIN_API

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    return export_onnx("d0", tmp_path_factory.mktemp("trt"), image_size=256, dynamic_batch=8,
                       pre_nms_top_k=500).onnx_path


def test_plugin_outputs_match_onnx_node(graph):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(graph)))
    node = next(n for n in model.graph.node if n.domain == "edet")
    assert plugin.PLUGIN_ID == f"{node.domain}::{node.op_type}"
    declared = {o.name: o for o in model.graph.output}
    from edet_deploy.nms.op import settings_from_node
    settings = settings_from_node(node)
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in
             ((a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute) if k in plugin.ATTRIBUTES}
    assert plugin.settings_from_attrs(**attrs) == settings  # what TensorRT hands the plugin, as the node says
    specs = plugin.output_specs("batch", 500, settings.max_detections)
    assert [s[0] for s in specs] == list(node.output)
    for name, dtype, shape in specs:
        t = declared[name].type.tensor_type
        assert onnx.helper.tensor_dtype_to_np_dtype(t.elem_type) == np.dtype(dtype)
        assert [d.dim_param or d.dim_value for d in t.shape.dim] == list(shape)


@pytest.mark.parametrize("arch", [80, 90])
def test_aot_launch_is_consistent(arch):
    s = NmsSettings()
    launch = plugin.aot_launch(500, s, arch)
    assert launch["kernel_name"] == "soft_nms_kernel" and f".entry {launch['kernel_name']}(" in launch["ptx"]
    assert f".target sm_{arch}" in launch["ptx"]
    assert launch["block_x"] == 32 * launch["num_warps"] and launch["extra_args"] == ["N"]
    # The kernel's runtime parameters in TensorRT's AOT order: 3 input pointers, N (u32), 4 output pointers,
    # then Triton's two scratch pointers, unused (0 bytes of scratch).
    entry = launch["ptx"][launch["ptx"].index(".entry"):launch["ptx"].index(")")]
    kinds = ["u32" if ".u32" in line else "ptr" for line in entry.splitlines() if ".param" in line]
    assert kinds[:8] == ["ptr"] * 3 + ["u32"] + ["ptr"] * 4
    from edet_deploy.kernels.soft_nms import compile_ptx
    assert compile_ptx(500, s.method_id, False, arch).scratch_bytes == 0
    # settings are compiled in: a different sigma gives different PTX
    other = plugin.aot_launch(500, NmsSettings(sigma=0.3), arch)
    assert other["ptx"] != launch["ptx"]


def _bindings_dir(version: str) -> Path:
    from trt_harness import BINDINGS, bindings_dir
    d = bindings_dir(version)
    if d is None:
        pytest.skip(f"{BINDINGS[version]}=={version} could not be had: not installed, no package index reachable "
                    f"and not in edet-deploy's wheel cache")
    return d


@pytest.mark.parametrize("version", ["10.13.3.9", "11.4.0.106"])
def test_tensorrt_calls_exist_in_each_release(version):
    """How: every name our code calls is listed in tests/trt_api.py; each listed name must appear in the compiled
    bindings of that release's bindings wheel (pybind11 keeps the Python names as strings in tensorrt.so), and
    each tensorrt.plugin name must be defined in that wheel's plugin package sources."""
    d = _bindings_dir(version)
    init = (d / "__init__.py").read_text()
    assert f'__version__ = "{version}"' in init
    so = (d / "tensorrt.so").read_bytes()
    module_names = {t.id for node in ast.walk(ast.parse(init)) if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name)}  # __version__ is set by the package's __init__
    missing = [n for n in TRT_API if n.encode() not in so and n not in module_names]
    assert not missing, f"not in TensorRT {version} bindings: {missing}"
    plugin_src = "\n".join(p.read_text() for p in (d / "plugin").glob("*.py"))
    defined = {node.name for node in ast.walk(ast.parse(plugin_src))
               if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert set(TRT_PLUGIN_API) <= defined, set(TRT_PLUGIN_API) - defined
    # and the list is complete: every trt.X / trtp.X attribute used in our TensorRT code is in it
    used = set()
    for path in (ROOT / "edet_deploy" / "trt").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "trt":
                    used.add(("trt", node.attr))
                elif node.value.id == "trtp":
                    used.add(("trtp", node.attr))
    unlisted = {a for m, a in used if (m == "trt" and a not in TRT_API) or (m == "trtp" and a not in TRT_PLUGIN_API)}
    assert not unlisted, unlisted


def test_without_tensorrt_one_clear_line(graph, tmp_path, capsys):
    rc = main(["build", str(graph), "--out", str(tmp_path / "x.plan")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "TensorRT is not installed" in err and "pip install" in err
    assert not (tmp_path / "x.plan").exists()
    with pytest.raises(EdetError, match="TensorRT is not installed"):
        from edet_deploy.backends import create_runner
        create_runner("tensorrt", engine_path=str(graph))
    import edet_deploy  # still imports
    assert edet_deploy.create_model


def test_batch_profile_parsing():
    from edet_deploy.trt.builder import parse_batch
    assert parse_batch("1:4:8") == (1, 4, 8) and parse_batch("8") == (1, 8, 8)
    for bad in ("0:1:2", "4:2:8", "a", "1:2"):
        with pytest.raises(EdetError):
            parse_batch(bad)


def _benchmark_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_acceptance_script_is_valid_bash_and_dry_runs():
    import subprocess
    script = ROOT / "benchmarks" / "gpu_acceptance.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage" in out.stdout.lower()
    out = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for expected in ("pip install -q -e .[gpu,dev]", "nvidia-smi", "trtexec", "build --batch 1:8:8",
                     "AOT plugin", "ONNX Runtime", "INT8 engine mAP", "batch 1..8", "CUDA graphs",
                     "compute-sanitizer", "GPU-only", "summary.json"):
        assert expected in text, expected
    STEPS = _benchmark_module("gpu_acceptance").STEPS
    assert text.count("[d0] step ") == len(STEPS) >= 7


def test_gpu_acceptance_matching_refuses_empty_and_mismatched_detections():
    """The detection matcher behind the ORT comparison: 0 detections never pass; a shifted box fails."""
    matched = _benchmark_module("gpu_acceptance").matched
    ref = {"num_detections": np.array([[2]]), "detection_boxes": np.array([[[0, 0, 10, 10], [20, 20, 40, 40]]], np.float32),
           "detection_scores": np.array([[0.9, 0.5]], np.float32), "detection_classes": np.array([[1, 2]], np.int32)}
    assert matched(ref, ref, 0.99, 1e-3)["ok"]
    empty = {k: v.copy() for k, v in ref.items()}
    empty["detection_scores"][:] = 0.0
    assert not matched(empty, empty, 0.99, 1e-3)["ok"]  # 0 detections: not a pass
    moved = {k: v.copy() for k, v in ref.items()}
    moved["detection_boxes"][0, 1] += 3
    assert not matched(ref, moved, 0.99, 1e-3)["ok"]
    fewer = {k: v.copy() for k, v in ref.items()}
    fewer["detection_scores"][0, 1] = 0.1
    assert matched(ref, fewer, 0.99, 1e-3)["count_mismatch"] == [(0, 1, 0)]
    near = {k: v.copy() for k, v in ref.items()}
    near["detection_scores"][0, 1] = 0.3 - 5e-4  # crosses the 0.3 cut by less than the score tolerance
    ref_near = {k: v.copy() for k, v in ref.items()}
    ref_near["detection_scores"][0, 1] = 0.3 + 5e-4
    assert matched(ref_near, near, 0.99, 1e-3)["ok"]


def test_gpu_kernels_cpu_mode(tmp_path):
    """benchmarks/gpu_kernels.py --cpu: the kernel against the reference under the Triton interpreter."""
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_kernels.py"), "--cpu", "--cases", "12",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_kernels.json").read_text())
    assert report["correctness"]["ok"] and report["correctness"]["cases"] == 12
    assert set(report["correctness"]["per_method"]) == {"hard", "linear", "gaussian"}
    assert report["models"][0]["status"] == "ok" and report["models"][0]["eager_ms"] > 0
    assert "soft-NMS kernel vs CPU reference: 12/12" in (tmp_path / "gpu_kernels.md").read_text()


# --- TensorRT's own plugin code over a stand-in core (tests/trt_harness.py) ---------------------------------

def _edit_node(graph, tmp_path, name, **attrs):
    """A copy of `graph` whose plugin node has `attrs` set (None removes)."""
    model = onnx.load(str(graph))
    node = next(n for n in model.graph.node if n.domain == "edet")
    for key, value in attrs.items():
        kept = [a for a in node.attribute if a.name != key]
        del node.attribute[:]
        node.attribute.extend(kept)
        if value is not None:
            node.attribute.append(onnx.helper.make_attribute(key, value))
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    import shutil
    shutil.copy(Path(graph).with_suffix(".json"), path.with_suffix(".json"))
    return path


@pytest.fixture(params=["10.13.3.9", "11.4.0.106"])
def trt_py(request, monkeypatch):
    """TensorRT's Python package of each release we build with, over the stand-in core."""
    from trt_harness import tensorrt_python
    d = _bindings_dir(request.param)
    # the one machine query of the AOT build (no GPU here): build for an H100/H200
    monkeypatch.setattr(plugin, "target_arch", lambda: 90)
    with tensorrt_python(request.param, d) as trt:
        assert trt.__version__ == request.param
        yield trt


def test_plugin_builds_aot_as_tensorrt_would(graph, trt_py):
    """register -> creator fields -> loadFields -> create_plugin (node aot=1, build_engine's flags) -> output
    types and shapes -> formats -> tactics -> get_launch_params -> aot_impl -> get_kernel, all in TensorRT's
    Python code (10.13 and 11.4)."""
    from trt_harness import drive_plugin
    trt = trt_py
    plugin.register()
    res = drive_plugin(trt, graph)
    assert res["plugin_id"] == plugin.PLUGIN_ID and res["declared_fields"] == list(plugin.ATTRIBUTES)
    assert res["implementation"] == "AOT"
    assert res["attrs"]["method"] == "gaussian\x00"  # what the parser hands over; the plugin copes
    assert res["output_types"] == [trt.int32, trt.float32, trt.float32, trt.int32]
    model = onnx.load(str(graph))
    declared = {o.name: [d.dim_param or str(d.dim_value) for d in o.type.tensor_type.shape.dim]
                for o in model.graph.output}
    assert res["output_shapes"] == [declared[name] for name in res["node"].output]
    assert res["launch"]["grid_x"] == "batch" and res["launch"]["grid_y"] == "1"
    from edet_deploy.kernels.soft_nms import launch_params
    assert int(res["launch"]["block_x"]) == launch_params(1, 500).block[0]
    assert res["extra_args"] == [("500", trt.PluginArgDataType.INT32)]
    name, ptx = res["kernel_name"], res["ptx"].decode()
    assert name == "soft_nms_kernel" and ".target sm_90a" in ptx
    entry = ptx[ptx.index(f".entry {name}("):]
    entry = entry[:entry.index(")")]
    assert entry.count(".param") == 8  # exactly what TensorRT passes: 3 inputs, N, 4 outputs


# The first CUDA release that knows each GPU architecture (CUDA toolkit release notes): a PTX for that GPU may
# need at most that CUDA, whatever the TensorRT series' own oldest CUDA is.
FIRST_CUDA_OF_ARCH = {80: (11, 0), 86: (11, 1), 89: (11, 8), 90: (12, 0), 100: (12, 8), 120: (12, 8)}


@pytest.mark.parametrize("arch", sorted(FIRST_CUDA_OF_ARCH))
def test_plugin_ptx_loads_on_the_cuda_of_each_release(graph, trt_py, monkeypatch, arch):
    """The PTX that TensorRT's own aot_impl path returns (10.13 and 11.4), per GPU architecture: its `.version`
    needs no newer CUDA than the oldest the release runs with (10.13: CUDA 12.0, its CUDA 12 wheels; 11.x: CUDA
    13.0) or than the GPU needs anyway, by cuda-python's own PTX ISA -> CUDA table
    (cuda.bindings.utils.get_minimal_required_cuda_ver_from_ptx_ver, NVIDIA's PTX release history); and ptxas
    of that CUDA major (CUDA 12.9 from the nvidia-cuda-nvcc-cu12 wheel, CUDA 13 on PATH) assembles it."""
    import re
    import subprocess

    from cuda.bindings.utils import get_minimal_required_cuda_ver_from_ptx_ver as cuda_for_ptx

    from edet_deploy.trt.versions import series_of
    from trt_harness import drive_plugin, ptxas_for
    monkeypatch.setattr(plugin, "target_arch", lambda: arch)
    plugin.register()
    ptx = drive_plugin(trt_py, graph, enqueue_jit=False)["ptx"].decode()
    isa = re.search(r"^\.version (\d+\.\d+)$", ptx, re.M).group(1)
    target = re.search(r"^\.target (sm_\w+)", ptx, re.M).group(1)
    assert re.fullmatch(f"sm_{arch}a?", target), target
    series = series_of(trt_py.__version__)
    allowed = max(series.min_cuda, FIRST_CUDA_OF_ARCH[arch])
    needs = cuda_for_ptx(isa)
    assert needs <= allowed[0] * 1000 + allowed[1] * 10, (
        f"PTX ISA {isa} needs CUDA {needs}; TensorRT {series.name} on {target} runs with CUDA {allowed}")
    ptxas = ptxas_for(series.min_cuda[0])
    if ptxas is None:
        pytest.skip(f"no ptxas of CUDA {series.min_cuda[0]} here (PTX ISA {isa} checked against the table)")
    src = Path(str(graph)).parent / f"k_{trt_py.__version__}_{arch}.ptx"
    src.write_text(ptx)
    out = subprocess.run([str(ptxas), f"-arch={target}", str(src), "-o", str(src.with_suffix(".cubin"))],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_build_creates_strongly_typed_networks_that_prefer_aot(graph, tmp_path, trt_py, monkeypatch):
    """build_engine asks TensorRT's Builder for a network with network_flags: on 10.13 STRONGLY_TYPED (a 10.x
    network is weakly typed otherwise) and PREFER_AOT_PYTHON_PLUGINS; on 11.x (always strongly typed, the flag
    deprecated) only PREFER_AOT. The flags are those of that release's enum (the stand-in takes its members from
    the release's compiled module)."""
    from edet_deploy.trt.builder import build_engine, network_flags
    enum = trt_py.NetworkDefinitionCreationFlag
    expected = 1 << int(enum.PREFER_AOT_PYTHON_PLUGINS)
    if trt_py.__version__.startswith("10."):
        assert hasattr(enum, "EXPLICIT_BATCH")  # the 10.x core still has it: the stand-in follows the release
        expected |= 1 << int(enum.STRONGLY_TYPED)
    else:
        assert not hasattr(enum, "EXPLICIT_BATCH")
    assert network_flags(trt_py) == expected
    created = []

    class Builder:  # records what build_engine asks for, then stops the build
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            created.append(flags)
            raise EdetError("stop after create_network")

    monkeypatch.setattr(trt_py, "Builder", Builder)
    with pytest.raises(EdetError, match="stop after create_network"):
        build_engine(graph, tmp_path / "x.plan", batch="1:4:8")
    assert created == [expected] and not (tmp_path / "x.plan").exists()


def test_plugin_without_aot_choice_fails_like_tensorrt(graph, tmp_path, trt_py):
    """No `aot` attribute and no PREFER_* network flag: TensorRT's creator refuses (both implementations
    exist); our parser model predicts the same. With the flag build_engine sets, AOT is chosen."""
    from edet_deploy.trt import parser_rules
    from trt_harness import drive_plugin, plugin_node
    plugin.register()
    bare = _edit_node(graph, tmp_path, "bare", aot=None)
    with pytest.raises(ValueError, match="both AOT and JIT"):
        drive_plugin(trt_py, bare, network_flags=())
    assert "both AOT and JIT" in " ".join(parser_rules.resolve(plugin_node(onnx.load(str(bare))), ()).problems)
    assert drive_plugin(trt_py, bare)["implementation"] == "AOT"


def test_jit_impl_runs_until_the_gpu(graph, tmp_path, trt_py):
    """aot=0: the JIT plugin is created, shaped and enqueued by TensorRT's code; our impl receives the
    tensors and attributes and stops only at its first CUDA call (no GPU here)."""
    import traceback
    from trt_harness import drive_plugin
    plugin.register()
    res = drive_plugin(trt_py, _edit_node(graph, tmp_path, "jit", aot=0))
    assert res["implementation"] == "JIT"
    err = res["enqueue_error"]
    assert err is not None, "ran a CUDA kernel without a GPU?"
    tb = traceback.extract_tb(err.__traceback__)
    names = [f.name for f in tb]
    assert "soft_nms_jit" in names and "jit_soft_nms" in names, names
    # everything after our impl's frames is torch's CUDA runtime: the first device call, nothing of ours
    after = tb[names.index("jit_soft_nms") + 1:]
    assert after and all("/torch/" in f.filename for f in after), [(f.filename, f.name) for f in after]
    assert isinstance(err, (RuntimeError, AssertionError)), err


def test_parser_lookup_and_fields_follow_onnx_tensorrt(graph, tmp_path):
    from edet_deploy.trt import parser_rules
    from trt_harness import plugin_node
    node = plugin_node(onnx.load(str(graph)))
    assert parser_rules.lookup_order(node) == [("", "soft_nms", "1"), ("edet", "soft_nms", "1")]
    res = parser_rules.resolve(node)
    assert res.ok and res.found_by == "node domain" and res.request == "STRICT_AOT"
    kinds = {f.name: (f.field_type, f.length) for f in res.fields}
    assert kinds["method"] == ("CHAR", len("gaussian") + 1)
    assert kinds["sigma"] == ("FLOAT32", 1) and kinds["max_detections"] == ("INT32", 1)
    ns = plugin_node(onnx.load(str(_edit_node(graph, tmp_path, "ns", plugin_namespace="edet"))))
    assert parser_rules.resolve(ns).found_by == "attribute plugin_namespace"
    v2 = plugin_node(onnx.load(str(_edit_node(graph, tmp_path, "v2", plugin_version="2"))))
    assert "plugin not found" in parser_rules.resolve(v2).problems[0]


def test_check_reports_the_plugin_and_refuses_what_would_not_be_aot(graph, tmp_path, capsys):
    assert main(["check", str(graph)]) == 0
    out = capsys.readouterr().out
    assert "edet::soft_nms" in out and "CHAR[9]" in out and "INT32" in out and "FLOAT32" in out
    assert "implementation: AOT" in out and out.strip().splitlines()[-1].endswith("nothing TensorRT would reject")
    for name, attrs, expect in (("jit", {"aot": 0}, "JIT implementation"),
                                ("nover", {"plugin_version": "2"}, "plugin not found"),
                                ("badmethod", {"method": "soft"}, "would reject its attributes")):
        assert main(["check", str(_edit_node(graph, tmp_path, name, **attrs))]) == 1
        out = capsys.readouterr().out
        assert expect in out and "problem" in out.strip().splitlines()[-1], out


def test_detect_and_eval_engine_without_tensorrt_one_line(graph, tmp_path, capsys):
    from PIL import Image

    from edet_deploy.data import generate_shapes
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 48)).save(img)
    fake = tmp_path / "m.plan"
    fake.write_bytes(b"x")
    data = generate_shapes(tmp_path / "d", {"val": 2}, progress=False)
    for argv in (["detect", str(img), "--engine", str(fake)],
                 ["eval", "--engine", str(fake), "--data", str(data)]):
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "TensorRT is not installed" in err, (argv, err)


# --- TensorRT 10.13 and 11.x: plans, images, readiness, install extras ---------------------------------------

@pytest.mark.parametrize("built,image,why", [
    ("10.13.3.9", "10.13.3.9", None), ("10.13.3.9", "10.13", None), ("11.4.0.106", "11.4", None),
    ("10.13.3.9", "11.4.0.106", "another major version (10.x vs 11.x)"),
    ("11.4.0.106", "10.13.3.9", "another major version (11.x vs 10.x)"),
    ("10.13.3.9", "10.14.1.48", "rebuild it there")])
def test_check_plan_compares_within_a_major(graph, tmp_path, built, image, why):
    """The container's `check-plan` (subprocess, as the entrypoint runs it): a 10.13 plan in a 10.13 image is
    served, across majors it is refused in one line saying so; inside a major only the same release loads."""
    import subprocess
    import sys
    from test_serving import fake_plan
    plan = fake_plan(graph, tmp_path, built)
    proc = subprocess.run([sys.executable, "-m", "edet_deploy.trt.compat", "check-plan", str(plan),
                           "--tensorrt-version", image, "--compute-capability", "9.0"],
                          capture_output=True, text=True, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and proc.returncode == (0 if why is None else 1), proc.stdout + proc.stderr
    if why:
        assert why in lines[0] and built in lines[0] and image in lines[0]


@pytest.mark.parametrize("library,bindings,cuda,expect", [
    ("10.13.3.9", "10.13.3.9", "13.0.2.006", "== libnvinfer 10.13.3.9 (TensorRT 10.13)"),
    ("11.4.0.106", "11.4.0.106", "13.0", "== libnvinfer 11.4.0.106 (TensorRT 11.x)"),
    ("10.13.3.9", "11.4.0.106", "13.0.2.006", "another major than the server's libnvinfer 10.13.3.9"),
    ("10.13.3.9", "10.13.0.35", "12.9.1", "pip install tensorrt-cu12==10.13.3.9`"),
    ("10.13.3.9", "10.13.0.35", "13.0.2.006", "pip install tensorrt-cu13==10.13.3.9`"),
    ("10.11.0.33", "10.11.0.33", "12.9.1", "edet-deploy builds with TensorRT 10.13 and 11.x")])
def test_check_image_names_the_series_and_the_wheel(monkeypatch, capsys, library, bindings, cuda, expect):
    """`check-image`: the bindings that build must be the release of the server's libnvinfer, of a series we
    build with; a mismatch names the wheel for the image's CUDA (NVIDIA's images set CUDA_VERSION)."""
    from edet_deploy.trt import compat
    monkeypatch.setenv("CUDA_VERSION", cuda)
    monkeypatch.setattr(compat, "runtime_library_version", lambda: library)
    monkeypatch.setattr(compat, "installed_tensorrt_version", lambda: bindings)
    rc = compat.main(["check-image"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and expect in out[0], out
    assert rc == (0 if expect.startswith("==") else 1)
    if "tensorrt-cu12" in expect:
        assert "tensorrt-cu13" not in out[0]
    if "tensorrt-cu13" in expect:
        assert "tensorrt-cu12" not in out[0]


def test_check_says_which_tensorrt_is_ready(graph, tmp_path, capsys):
    """`check` names the TensorRT series that would import the graph, from its opset and ops: our export is
    ready for both; a graph at opset 22 only for 11.x (10.13's parser is documented up to 21), and still
    exits 0; at opset 25 for neither (exit 1, the last line says why)."""
    import json
    assert main(["check", str(graph)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == "ready for TensorRT 10.13 and 11.x", lines
    for opset, rc, expect in ((22, 0, "ready for TensorRT 11.x (not 10.13: opset 22 is above the 21"),
                              (25, 1, "ready for no supported TensorRT")):
        model = onnx.load(str(graph))
        next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = opset
        path = tmp_path / f"opset{opset}.onnx"
        onnx.save(model, str(path))
        import shutil
        shutil.copy(Path(graph).with_suffix(".json"), path.with_suffix(".json"))
        assert main(["check", str(path)]) == rc
        out = capsys.readouterr().out.strip().splitlines()
        assert expect in out[-2] and (rc == 0 or expect in out[-1]), out
        assert main(["check", str(path), "--json"]) == rc
        report = json.loads(capsys.readouterr().out)
        assert bool(report["tensorrt"]["10.13"]) and bool(report["tensorrt"]["11.x"]) == (opset > 24)


def test_readiness_of_ops_imported_from_later_releases():
    from edet_deploy.trt.versions import readiness
    ready = readiness(["Conv", "Attention"], 21)
    assert ready["11.x"] == [] and ready["10.13"] == ["Attention is imported from TensorRT 10.14 on"]
    assert readiness(["Conv", "TopK"], 17) == {"10.13": [], "11.x": []}


def test_install_extras_admit_each_series():
    """pyproject.toml has an extra per TensorRT series and CUDA major (versions.SERIES); each pins the series'
    wheel to its major, and pip resolves that requirement to a release of the series (`pip download
    --no-deps`: the TensorRT metapackages cannot resolve their libraries here, they fetch them at install)."""
    import re
    import subprocess
    import sys
    import tempfile
    import tomllib

    from packaging.requirements import Requirement

    from edet_deploy.trt.versions import SERIES, series_of
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == ["edet-deploy[tensorrt11]"]
    for s in SERIES:
        for cuda, wheel, extra in s.wheels:
            reqs = {Requirement(r).name: Requirement(r) for r in extras[extra]}
            spec = reqs[wheel].specifier
            assert spec.contains(f"{s.major}.{s.min_minor}.0.1") and not spec.contains(f"{s.major + 1}.0.0")
            assert not spec.contains(f"{s.major}.{max(s.min_minor - 1, 0)}.9") or s.min_minor == 0
            assert {"cuda-python", "triton"} <= set(reqs)
            assert reqs["cuda-python"].specifier.contains(f"{cuda}.9.0")
            with tempfile.TemporaryDirectory() as tmp:
                out = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                                      str(reqs[wheel])], capture_output=True, text=True, timeout=600)
                if out.returncode != 0 and any(e in out.stderr for e in ("NewConnectionError", "Network is "
                                                                         "unreachable", "name resolution")):
                    pytest.skip("no package index reachable")
                assert out.returncode == 0, out.stderr[-2000:]
                (got,) = [p.name for p in Path(tmp).iterdir()]
                version = re.match(rf"{wheel.replace('-', '_')}-([\d.]+?)(\.tar\.gz|-)", got).group(1)
                assert series_of(version) is s, (extra, got)
