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
from edet_deploy.trt.api import TRT_API, TRT_PLUGIN_API

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
             ((a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute)}
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
    from edet_kernels.soft_nms import compile_ptx
    assert compile_ptx(500, s.method_id, False, arch).scratch_bytes == 0
    # settings are compiled in: a different sigma gives different PTX
    other = plugin.aot_launch(500, NmsSettings(sigma=0.3), arch)
    assert other["ptx"] != launch["ptx"]


def _bindings_dir() -> Path:
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tensorrt-cu13-bindings (dev extra) not installed")
    return Path(list(spec.submodule_search_locations)[0])


def test_tensorrt_calls_exist_in_11_4():
    """How: every name our code calls is listed in trt/api.py; each listed name must appear in the compiled
    bindings of the tensorrt-cu13-bindings 11.4.0.106 wheel (pybind11 keeps the Python names as strings in
    tensorrt.so), and each tensorrt.plugin name must be defined in that wheel's plugin package sources."""
    d = _bindings_dir()
    so = (d / "tensorrt.so").read_bytes()
    missing = [n for n in TRT_API if n.encode() not in so]
    assert not missing, f"not in TensorRT 11.4 bindings: {missing}"
    plugin_src = "\n".join(p.read_text() for p in (d / "plugin").glob("*.py"))
    defined = {node.name for node in ast.walk(ast.parse(plugin_src))
               if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert set(TRT_PLUGIN_API) <= defined, set(TRT_PLUGIN_API) - defined
    # and the list is complete: every trt.X / trtp.X attribute used in our TensorRT code is in it
    used = set()
    for path in [*(ROOT / "edet_deploy" / "trt").glob("*.py"), ROOT / "edet_deploy" / "backends" / "trt.py"]:
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


def test_gpu_acceptance_script_is_valid_bash():
    import subprocess
    script = ROOT / "benchmarks" / "gpu_acceptance.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage" in out.stdout.lower()
