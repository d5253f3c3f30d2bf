"""TensorRT-in-Python harness: TensorRT's real Python package over a stand-in for its compiled core, and a
driver that does to our exported graph what TensorRT's ONNX parser and builder do to a plugin node.

- `tensorrt_python(version)` puts together `tensorrt` as the `tensorrt-cu12/13` metapackages do (the bindings
  wheel's real `__init__.py`, `tensorrt.plugin` = its pure-Python plugin package) with `trt_standin` in place
  of `tensorrt_bindings/tensorrt.so`, for TensorRT 10.13.3.9 or 11.4.0.106 (BINDINGS): each wheel is read from a
  directory of its own (the installed dev-extra wheel, or one unpacked once into edet-deploy's cache).
- `drive_plugin(trt, graph)` follows onnx-tensorrt and the builder: find the creator (op_type, version and
  namespace attributes, then the node's domain), build the fields as loadFields does, create the plugin with
  the QuickPluginCreationRequest implied by the node and the network flags, then get_output_data_types ->
  get_output_shapes -> format negotiation -> configure_plugin -> tactics -> (AOT) get_launch_params and
  get_kernel, or (JIT) enqueue.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Iterator, Optional, Sequence

import numpy as np
import onnx

from edet_deploy.trt import parser_rules

ONNX_TO_TRT = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT32: "int32", onnx.TensorProto.UINT8: "uint8",
               onnx.TensorProto.FLOAT16: "float16"}


# The TensorRT releases whose Python code the tests run: version -> bindings wheel (both install the package
# `tensorrt_bindings`, so each is read from a directory of its own, never installed side by side).
BINDINGS = {"10.13.3.9": "tensorrt-cu12-bindings", "11.4.0.106": "tensorrt-cu13-bindings"}
# The CUDA each release's engines run with at the oldest (versions.SERIES min_cuda) and a wheel with that
# CUDA major's ptxas: the PTX our plugin returns must load and assemble there.
PTXAS_WHEELS = {12: "nvidia-cuda-nvcc-cu12==12.9.86"}


def wheel_dir(requirement: str, only: str = "") -> Optional[Path]:
    """The unpacked wheel of `requirement` (NAME==VERSION; its members under `only`, default all) in edet-deploy's
    cache, fetched once with `pip download --no-deps` (the wheel for this Python and platform) and reused
    offline; None when pip cannot get it (no index reachable)."""
    import os
    import shutil
    import subprocess
    import tempfile
    import zipfile

    from edet_deploy.contract import cache_dir

    target = cache_dir() / "wheels" / requirement.replace("==", "-")
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                              "--quiet", "-d", tmp, requirement], capture_output=True, text=True, timeout=600)
        wheels = list(Path(tmp).glob("*.whl"))
        if out.returncode != 0 or len(wheels) != 1:
            return None
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as z:
            members = [i for i in z.infolist() if i.filename.startswith(only)]
            z.extractall(unpacked, members)
            for info in members:  # zip extraction drops the executable bits (ptxas)
                mode = info.external_attr >> 16
                if mode & 0o111:
                    os.chmod(unpacked / info.filename, mode & 0o777)
        unpacked.mkdir(exist_ok=True)
        (unpacked / ".complete").write_text(requirement)
        try:
            unpacked.rename(target)
        except OSError:  # another process unpacked it first
            shutil.rmtree(unpacked, ignore_errors=True)
    return target if (target / ".complete").is_file() else None


def bindings_dir(version: str = "11.4.0.106") -> Optional[Path]:
    """`tensorrt_bindings/` of TensorRT `version`: the installed one (dev extra) when it is that version, else
    the bindings wheel unpacked in the cache."""
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is not None and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0])
        if f'__version__ = "{version}"' in (installed / "__init__.py").read_text():
            return installed
    unpacked = wheel_dir(f"{BINDINGS[version]}=={version}")
    return unpacked / "tensorrt_bindings" if unpacked else None


def ptxas_for(cuda_major: int) -> Optional[Path]:
    """A ptxas of CUDA `cuda_major`: the one on PATH when it is that CUDA, else the CUDA wheel's."""
    import re
    import shutil
    import subprocess

    candidates = [shutil.which("ptxas")]
    if cuda_major in PTXAS_WHEELS:
        unpacked = wheel_dir(PTXAS_WHEELS[cuda_major], only="nvidia/cuda_nvcc/bin/ptxas")
        candidates.append(str(unpacked / "nvidia" / "cuda_nvcc" / "bin" / "ptxas") if unpacked else None)
    for exe in filter(None, candidates):
        out = subprocess.run([exe, "--version"], capture_output=True, text=True)
        release = re.search(r"release (\d+)\.(\d+)", out.stdout)
        if out.returncode == 0 and release and int(release.group(1)) == cuda_major:
            return Path(exe)
    return None


def _names(prefixes: Sequence[str]):
    return [k for k in sys.modules if any(k == p or k.startswith(p + ".") for p in prefixes)]


@contextlib.contextmanager
def tensorrt_python(version: str = "11.4.0.106", directory: Optional[Path] = None) -> Iterator[types.ModuleType]:
    """`import tensorrt` / `import tensorrt.plugin` inside the block give TensorRT `version`'s Python package
    (from `directory`, default bindings_dir(version)) over the stand-in core; everything is restored afterwards
    (and our plugin may register again)."""
    from edet_deploy.trt import plugin as our_plugin

    directory = directory or bindings_dir(version)
    prefixes = ("tensorrt", "tensorrt_bindings", "trt_standin")
    saved = {k: sys.modules.pop(k) for k in _names(prefixes)}
    on_path = importlib.util.find_spec("tensorrt_bindings") is not None and str(directory.parent) in sys.path
    if not on_path:
        sys.path.insert(0, str(directory.parent))
    try:
        standin = importlib.import_module("trt_standin")
        standin.configure((directory / "tensorrt.so").read_bytes())  # the enums this release's core has
        sys.modules["tensorrt_bindings.tensorrt"] = standin
        bindings = importlib.import_module("tensorrt_bindings")  # the wheel's __init__: `from .tensorrt import *`
        assert Path(bindings.__file__).parent == directory, bindings.__file__
        trt = types.ModuleType("tensorrt")  # the metapackage: `from tensorrt_bindings import *` + __version__
        trt.__dict__.update({k: getattr(bindings, k) for k in dir(bindings) if not k.startswith("_")})
        trt.__version__ = bindings.__version__
        trt.__path__ = []
        sys.modules["tensorrt"] = trt
        trt.plugin = sys.modules["tensorrt.plugin"] = importlib.import_module("tensorrt_bindings.plugin")
        our_plugin._registered = False
        yield trt
    finally:
        if not on_path:
            sys.path.remove(str(directory.parent))
        for k in _names(prefixes):
            del sys.modules[k]
        sys.modules.update(saved)
        our_plugin._registered = False


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def plugin_node(graph: onnx.ModelProto):
    nodes = [n for n in graph.graph.node if n.domain not in ("", "ai.onnx")]
    assert len(nodes) == 1, [n.op_type for n in nodes]
    return nodes[0]


def drive_plugin(trt, graph_path, network_flags: Sequence[str] = parser_rules.BUILD_NETWORK_FLAGS,
                 batch: int = 2, enqueue_jit: bool = True) -> Dict:
    """Parse + build the plugin node of `graph_path` as TensorRT would; returns what each step produced."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(graph_path)), strict_mode=True)
    node = plugin_node(model)
    infos = {v.name: v for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    out: Dict = {"node": node}

    # onnx-tensorrt FallbackPluginImporter: creator lookup, then loadFields over the creator's field names
    registry = trt.get_plugin_registry()
    creator, namespace = None, None
    for namespace, name, version in parser_rules.lookup_order(node):
        creator = registry.get_creator(name, version, namespace)
        if creator is not None:
            break
    assert creator is not None, "Plugin not found, are the plugin name, version, and namespace correct?"
    out["plugin_id"] = f"{namespace}::{creator.name}"
    declared = [f.name for f in creator.field_names]
    out["declared_fields"] = declared
    fields, missing = parser_rules.load_fields(node, declared)
    out["fields"], out["missing"] = fields, missing
    fc = trt.PluginFieldCollection([trt.PluginField(f.name, f.data, getattr(trt.PluginFieldType, f.field_type))
                                    for f in fields])
    request = getattr(trt.QuickPluginCreationRequest, parser_rules.creation_request(node, network_flags))
    plugin = creator.create_plugin(node.op_type, namespace, fc, trt.TensorRTPhase.BUILD, request)
    out["implementation"] = "AOT" if isinstance(plugin, trt.IPluginV3QuickAOTBuild) else "JIT"
    out["attrs"] = dict(plugin.attrs)

    # builder: types, symbolic shapes, formats, tactics
    in_shapes = [_dims(infos[i]) for i in node.input]
    in_types = [getattr(trt, ONNX_TO_TRT[infos[i].type.tensor_type.elem_type]) for i in node.input]
    out["output_types"] = list(plugin.get_output_data_types(in_types, [len(s) for s in in_shapes]))
    eb = trt.IExprBuilder()
    in_exprs = [trt.DimsExprs([eb.constant(d) if isinstance(d, int) else trt.IDimensionExpr(None, d) for d in s])
                for s in in_shapes]
    out["output_shapes"] = [[repr(e) for e in dims] for dims in plugin.get_output_shapes(in_exprs, [], eb)]

    def desc(shape, dtype):
        d = trt.DynamicPluginTensorDesc()
        d.desc.dims = trt.Dims([-1 if isinstance(x, str) else x for x in shape])
        d.desc.type, d.desc.format = dtype, trt.TensorFormat.LINEAR
        d.min = trt.Dims([1 if isinstance(x, str) else x for x in shape])
        d.opt = d.max = trt.Dims([batch if isinstance(x, str) else x for x in shape])
        return d

    out_shapes = [[int(x) if x.isdigit() else x for x in s] for s in out["output_shapes"]]
    ins = [desc(s, t) for s, t in zip(in_shapes, in_types)]
    outs = [desc(s, t) for s, t in zip(out_shapes, out["output_types"])]
    combos = plugin.get_supported_format_combinations(ins + outs, len(ins))
    out["formats"] = [(c.type, c.format) for c in combos]
    plugin.configure_plugin(ins, outs)
    out["tactics"] = plugin.get_valid_tactics()
    plugin.set_tactic(0)

    if out["implementation"] == "AOT":
        launch, setter = SimpleNamespace(), _SymExprSetter()
        plugin.get_launch_params(in_exprs, ins + outs, len(ins), launch, setter, eb)
        out["launch"] = {k: repr(getattr(launch, k).expr) for k in ("grid_x", "grid_y", "grid_z", "block_x",
                                                                   "block_y", "block_z", "shared_mem")}
        out["extra_args"] = [(repr(e.expr), e.dtype) for e in setter.exprs]
        out["kernel_name"], out["ptx"] = plugin.get_kernel([d.desc for d in ins], [d.desc for d in outs])
    elif enqueue_jit:
        out["enqueue_error"] = _enqueue(trt, plugin, ins, outs, batch)
    return out


class _SymExprSetter:
    """TensorRT's ISymExprs: nbSymExprs, then one ISymExpr per index."""

    def __init__(self):
        self.exprs, self.nbSymExprs = [], 0

    def __setitem__(self, index, value):
        assert index < self.nbSymExprs, "set more symbolic arguments than announced"
        self.exprs.append(value)


def _enqueue(trt, plugin, ins, outs, batch):
    """enqueue with device pointers, as the runtime does; on a machine without a GPU the impl can only get as
    far as its first CUDA call. Returns that exception (None if it ran)."""
    def concrete(d):
        p = trt.PluginTensorDesc()
        p.dims = trt.Dims([batch if x < 0 else x for x in d.desc.dims])
        p.type, p.format = d.desc.type, d.desc.format
        return p

    in_desc, out_desc = [concrete(d) for d in ins], [concrete(d) for d in outs]
    def strides(ds):
        return [tuple(int(np.prod(d.dims[i + 1:])) for i in range(len(d.dims))) for d in ds]

    try:
        plugin.enqueue(in_desc, out_desc, [0x1000] * len(ins), [0x2000] * len(outs), strides(in_desc),
                       strides(out_desc), 0)
    except Exception as e:  # noqa: BLE001 - returned for the test to judge
        return e
    return None
