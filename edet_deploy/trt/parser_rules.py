"""What TensorRT's ONNX parser does with a plugin node, modelled without TensorRT (read from onnx-tensorrt's
`FallbackPluginImporter`, `importPluginCreator`, `loadFields` and `createPlugin`, TensorRT 10.x/11.x):

1. Lookup: plugin name = the node's op_type, version = attribute `plugin_version` (default "1"), namespace =
   attribute `plugin_namespace` (default ""); if no creator matches, the node's domain is tried as namespace.
2. Fields: one per field name the creator declares (a QDP creator declares the registered attributes, in
   registration order), read from the node's attribute of that name. FLOAT -> kFLOAT32, INT -> kINT32,
   STRING -> kCHAR with the terminating NUL counted in the length, FLOATS/INTS -> arrays. A declared name the
   node lacks is skipped with a warning.
3. AOT or JIT (quickly deployable plugins): a node attribute `aot` decides (1 -> STRICT_AOT, 0 -> STRICT_JIT);
   otherwise the network flags PREFER_AOT_PYTHON_PLUGINS / PREFER_JIT_PYTHON_PLUGINS give PREFER_AOT /
   PREFER_JIT, else UNKNOWN, which fails when the plugin has both implementations.

`edet-deploy check` reports this resolution; tests/trt_harness.py feeds exactly these fields to TensorRT's
own plugin code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..nms import op as nms_op

# The plugin-related network flags `edet-deploy build` creates its network with (builder.network_flags adds
# STRONGLY_TYPED on TensorRT 10.x; 11.x networks are always strongly typed).
BUILD_NETWORK_FLAGS: Tuple[str, ...] = ("PREFER_AOT_PYTHON_PLUGINS",)


@dataclass(frozen=True)
class PluginSpec:
    """What a registered plugin creator exposes to the parser."""
    namespace: str
    name: str
    version: str
    field_names: Tuple[str, ...]
    has_aot: bool
    has_jit: bool

    @property
    def plugin_id(self) -> str:
        return f"{self.namespace}::{self.name}"


def soft_nms_spec() -> PluginSpec:
    """Our plugin as `trt/plugin.py` registers it."""
    from .plugin import ATTRIBUTES, PLUGIN_VERSION
    return PluginSpec(nms_op.DOMAIN, nms_op.OP_TYPE, PLUGIN_VERSION, ATTRIBUTES, has_aot=True, has_jit=True)


@dataclass(frozen=True)
class ParserField:
    """A plugin field as loadFields builds it: `data` is the raw buffer, `length` its element count."""
    name: str
    field_type: str  # PluginFieldType name: FLOAT32, INT32, CHAR, ...
    data: bytes
    length: int

    def as_array(self) -> np.ndarray:
        dtype = {"FLOAT32": np.float32, "INT32": np.int32, "CHAR": np.int8}[self.field_type]
        return np.frombuffer(self.data, dtype=dtype)

    def __str__(self) -> str:
        if self.field_type == "CHAR":
            return f"{self.name}: CHAR[{self.length}] {self.data!r}"
        value = self.as_array()
        return f"{self.name}: {self.field_type} {value[0] if value.size == 1 else value.tolist()}"


@dataclass
class PluginResolution:
    node: str
    tried: List[Tuple[str, str, str]]  # (namespace, name, version) in lookup order
    found: Optional[PluginSpec] = None
    found_by: str = ""
    fields: List[ParserField] = field(default_factory=list)
    request: str = ""
    implementation: str = ""  # "AOT" | "JIT" | "" (creation would fail)
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.implementation == "AOT"


def node_attributes(node) -> Dict[str, object]:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _attr_kinds(node) -> Dict[str, int]:
    return {a.name: a.type for a in node.attribute}


def lookup_order(node) -> List[Tuple[str, str, str]]:
    """(namespace, name, version) candidates in the order the parser tries them."""
    attrs = node_attributes(node)
    version = _text(attrs.get("plugin_version", "1"))
    namespace = _text(attrs.get("plugin_namespace", ""))
    order = [(namespace, node.op_type, version)]
    if node.domain != namespace:
        order.append((node.domain, node.op_type, version))
    return order


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def load_fields(node, field_names: Sequence[str]) -> Tuple[List[ParserField], List[str]]:
    """The fields onnx-tensorrt's loadFields builds from `node` for a creator declaring `field_names`, and the
    declared names the node lacks."""
    from onnx import AttributeProto

    attrs, kinds = node_attributes(node), _attr_kinds(node)
    fields, missing = [], []
    for name in field_names:
        if name not in attrs:
            missing.append(name)
            continue
        kind, value = kinds[name], attrs[name]
        if kind == AttributeProto.FLOAT:
            fields.append(ParserField(name, "FLOAT32", np.float32(value).tobytes(), 1))
        elif kind == AttributeProto.INT:
            fields.append(ParserField(name, "INT32", np.int32(value).tobytes(), 1))
        elif kind == AttributeProto.STRING:
            raw = bytes(value) + b"\x00"  # std::string copied with its terminator, length counted with it
            fields.append(ParserField(name, "CHAR", raw, len(raw)))
        elif kind == AttributeProto.FLOATS:
            arr = np.asarray(value, np.float32)
            fields.append(ParserField(name, "FLOAT32", arr.tobytes(), arr.size))
        elif kind == AttributeProto.INTS:
            arr = np.asarray(value, np.int32)
            fields.append(ParserField(name, "INT32", arr.tobytes(), arr.size))
        else:
            raise ValueError(f"attribute {name!r} of type {AttributeProto.AttributeType.Name(kind)} "
                             f"is unsupported as a plugin field")
    return fields, missing


def creation_request(node, network_flags: Sequence[str] = BUILD_NETWORK_FLAGS) -> str:
    """The QuickPluginCreationRequest the parser passes to a quickly-deployable plugin's creator."""
    attrs = node_attributes(node)
    if "aot" in attrs:
        return "STRICT_AOT" if int(attrs["aot"]) else "STRICT_JIT"
    aot, jit = "PREFER_AOT_PYTHON_PLUGINS" in network_flags, "PREFER_JIT_PYTHON_PLUGINS" in network_flags
    if aot and jit:
        raise ValueError("PREFER_AOT_PYTHON_PLUGINS and PREFER_JIT_PYTHON_PLUGINS cannot both be set")
    return "PREFER_JIT" if jit else "PREFER_AOT" if aot else "UNKNOWN"


def implementation_for(spec: PluginSpec, request: str) -> Tuple[str, str]:
    """("AOT" | "JIT" | "", why) as the QDP creator decides from the request."""
    if request == "STRICT_AOT":
        return ("AOT", "") if spec.has_aot else ("", "AOT requested, but the plugin has no AOT implementation")
    if request == "STRICT_JIT":
        return ("JIT", "") if spec.has_jit else ("", "JIT requested, but the plugin has no JIT implementation")
    if spec.has_aot and spec.has_jit:
        if request in ("PREFER_AOT", "PREFER_JIT"):
            return request[len("PREFER_"):], ""
        return "", ("the plugin has both AOT and JIT implementations and neither the node (attribute aot) nor "
                    "the network (PREFER_AOT_PYTHON_PLUGINS) chooses")
    return ("AOT", "") if spec.has_aot else ("JIT", "")


def resolve(node, network_flags: Sequence[str] = BUILD_NETWORK_FLAGS,
            registered: Sequence[PluginSpec] = ()) -> PluginResolution:
    """How TensorRT's parser would turn `node` into a plugin layer, given the creators `registered` (default:
    ours). Problems are what would make the build fail or the engine depend on Python at run time."""
    registered = list(registered) or [soft_nms_spec()]
    res = PluginResolution(node=node.name or node.output[0], tried=lookup_order(node))
    by_key = {(s.namespace, s.name, s.version): s for s in registered}
    for i, key in enumerate(res.tried):
        if key in by_key:
            res.found = by_key[key]
            res.found_by = ("attribute plugin_namespace" if i == 0 and "plugin_namespace" in node_attributes(node)
                            else "node domain" if key[0] == node.domain else "default namespace ''")
            break
    if res.found is None:
        res.problems.append("no plugin creator matches " + " or ".join(f"{ns}::{name} v{v}" for ns, name, v in
                                                                     res.tried) + " (plugin not found)")
        return res
    try:
        res.fields, missing = load_fields(node, res.found.field_names)
    except ValueError as e:
        res.problems.append(str(e))
        return res
    if missing:
        res.problems.append(f"attributes {missing} missing: the plugin has no defaults for them")
    try:
        res.request = creation_request(node, network_flags)
    except ValueError as e:
        res.problems.append(str(e))
        return res
    res.implementation, why = implementation_for(res.found, res.request)
    if why:
        res.problems.append(why)
    elif res.implementation == "JIT":
        res.problems.append(f"{res.request} selects the JIT implementation: the engine would need Python and "
                            f"torch at run time (trtexec and Triton's tensorrt_plan backend cannot run it)")
    if res.found.plugin_id == soft_nms_spec().plugin_id and not missing:
        try:
            decoded_settings(res.fields)
        except Exception as e:  # noqa: BLE001 - reported as a finding
            res.problems.append(f"the plugin would reject its attributes: {e}")
    return res


def decoded_settings(fields: Sequence[ParserField]):
    """The NmsSettings our plugin builds from these fields, decoding them as TensorRT's QDP creator does
    (CHAR bytes decoded as they are, NUL included)."""
    from .plugin import settings_from_attrs
    values = {}
    for f in fields:
        arr = f.as_array()
        values[f.name] = f.data.decode("utf-8") if f.field_type == "CHAR" else arr[0].item()
    return settings_from_attrs(**values)
