"""A stand-in for `tensorrt_bindings/tensorrt.so`, the compiled core of TensorRT's Python bindings.

TensorRT's libraries cannot be installed on a CPU machine, but everything else of the real Python package
can: `tensorrt_bindings/__init__.py` and the pure-Python `tensorrt.plugin` package (the quickly deployable
plugin API) from the bindings wheels of TensorRT 10.13 and 11.4. This module provides only what the compiled
module would: enums, plain data holders (PluginField, Dims, tensor descriptors), the plugin base classes
(whose C++ sides do nothing the Python side can observe), the plugin registry, and a symbolic dimension
expression builder. It implements nothing of the plugin framework: registration, validation, field
decoding, plugin creation, shape and launch-parameter logic all run as TensorRT ships them.
"""
from __future__ import annotations

import enum
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np


class _Enum(enum.IntEnum):
    """pybind11 enums compare, hash and print by name."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


class DataType(_Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10


float32, float16, int8, int32, bool, uint8, fp8, bfloat16, int64, int4, fp4 = (  # noqa: A001 - TensorRT's names
    DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32, DataType.BOOL, DataType.UINT8, DataType.FP8,
    DataType.BF16, DataType.INT64, DataType.INT4, DataType.FP4)

TensorFormat = _Enum("TensorFormat", "LINEAR CHW2 HWC8 CHW4 CHW16 CHW32 DHWC8 CDHW32 HWC DLA_LINEAR DLA_HWC4 "
                     "HWC16 DHWC", start=0)
PluginFieldType = _Enum("PluginFieldType", "FLOAT16 FLOAT32 FLOAT64 INT8 INT16 INT32 CHAR DIMS UNKNOWN BF16 INT64 "
                        "FP8 INT4 FP4", start=0)
DimensionOperation = _Enum("DimensionOperation", "SUM PROD MAX MIN SUB EQUAL LESS FLOOR_DIV CEIL_DIV", start=0)
PluginArgType = _Enum("PluginArgType", "INT", start=0)
PluginArgDataType = _Enum("PluginArgDataType", "INT8 INT16 INT32", start=0)
QuickPluginCreationRequest = _Enum("QuickPluginCreationRequest", "UNKNOWN PREFER_JIT PREFER_AOT STRICT_JIT "
                                   "STRICT_AOT", start=0)
TensorRTPhase = _Enum("TensorRTPhase", "BUILD RUNTIME", start=0)
# NvInfer.h's values; which members a release has is read from its compiled module (configure): 10.x still has
# EXPLICIT_BATCH (deprecated), 11.x dropped it.
_NETWORK_FLAGS = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2,
                  "PREFER_AOT_PYTHON_PLUGINS": 3}
NetworkDefinitionCreationFlag = _Enum("NetworkDefinitionCreationFlag", dict(list(_NETWORK_FLAGS.items())[1:]))
TensorIOMode = _Enum("TensorIOMode", "NONE INPUT OUTPUT", start=0)

# numpy dtype of PluginField.data for each field type (the bindings expose the buffer as such an array)
_FIELD_DTYPES = {PluginFieldType.FLOAT16: np.float16, PluginFieldType.FLOAT32: np.float32,
                 PluginFieldType.FLOAT64: np.float64, PluginFieldType.INT8: np.int8, PluginFieldType.INT16: np.int16,
                 PluginFieldType.INT32: np.int32, PluginFieldType.INT64: np.int64, PluginFieldType.CHAR: np.int8,
                 PluginFieldType.UNKNOWN: np.uint8}


class ILogger:
    class Severity(_Enum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        pass


class Logger(ILogger):
    def __init__(self, min_severity: "ILogger.Severity" = ILogger.Severity.WARNING) -> None:
        self.min_severity = min_severity
        self.messages: List[Tuple[ILogger.Severity, str]] = []

    def log(self, severity: "ILogger.Severity", msg: str) -> None:
        self.messages.append((severity, msg))


class ICudaEngine: ...
class IExecutionContext: ...
class Runtime: ...
class IHostMemory: ...
class Builder: ...
class INetworkDefinition: ...
class OnnxParser: ...
class IBuilderConfig: ...
class ITensor: ...


class Dims(list):
    MAX_DIMS = 8

    def __init__(self, shape: Iterable[int] | int = ()) -> None:
        super().__init__([0] * shape if isinstance(shape, int) else [int(d) for d in shape])


class IDimensionExpr:
    """A dimension: a known constant, or a named symbol / an expression over them (printed)."""

    def __init__(self, value: Optional[int] = None, text: Optional[str] = None) -> None:
        self.value, self.text = value, text if text is not None else str(value)

    def is_constant(self) -> bool:
        return self.value is not None

    def get_constant_value(self) -> int:
        if self.value is None:
            raise RuntimeError(f"{self.text} is not a build-time constant")
        return self.value

    def __repr__(self) -> str:
        return self.text


_OPS = {DimensionOperation.SUM: ("+", lambda a, b: a + b), DimensionOperation.PROD: ("*", lambda a, b: a * b),
        DimensionOperation.MAX: ("max", max), DimensionOperation.MIN: ("min", min),
        DimensionOperation.SUB: ("-", lambda a, b: a - b), DimensionOperation.EQUAL: ("==", lambda a, b: int(a == b)),
        DimensionOperation.LESS: ("<", lambda a, b: int(a < b)), DimensionOperation.FLOOR_DIV: ("//", lambda a, b: a // b),
        DimensionOperation.CEIL_DIV: ("ceildiv", lambda a, b: -(-a // b))}


class IExprBuilder:
    def constant(self, value: int) -> IDimensionExpr:
        return IDimensionExpr(int(value))

    def operation(self, op: DimensionOperation, a: IDimensionExpr, b: IDimensionExpr) -> IDimensionExpr:
        sym, fn = _OPS[op]
        if a.is_constant() and b.is_constant():
            return IDimensionExpr(fn(a.value, b.value))
        return IDimensionExpr(None, f"({a.text} {sym} {b.text})")

    def declare_size_tensor(self, index: int, opt: IDimensionExpr, upper: IDimensionExpr) -> IDimensionExpr:
        return IDimensionExpr(None, f"size_tensor{index}")


class DimsExprs(list):
    def __init__(self, n: int | Iterable[IDimensionExpr] = 0) -> None:
        super().__init__([None] * n if isinstance(n, int) else list(n))


class PluginTensorDesc:
    def __init__(self) -> None:
        self.dims, self.type, self.format, self.scale = Dims(), DataType.FLOAT, TensorFormat.LINEAR, -1.0


class DynamicPluginTensorDesc:
    def __init__(self) -> None:
        self.desc, self.min, self.max, self.opt = PluginTensorDesc(), Dims(), Dims(), Dims()


class PluginField:
    """name, data (a numpy array typed by `type`; bytes for CHAR/UNKNOWN become int8/uint8), type, size."""

    def __init__(self, name: str = "", data=None, type: PluginFieldType = PluginFieldType.FLOAT32) -> None:  # noqa: A002
        dtype = _FIELD_DTYPES.get(type, np.uint8)
        if data is None:
            data = np.zeros(0, dtype)
        elif isinstance(data, (bytes, bytearray)):
            data = np.frombuffer(bytes(data), dtype=dtype).copy()
        else:
            data = np.asarray(data)
            if data.dtype != dtype and data.size:
                data = data.astype(dtype)
        self.name, self.data, self.type, self.size = name, data, type, int(data.size)


class PluginFieldCollection(list):
    pass


class ISymExpr:
    def __init__(self) -> None:
        self.type = self.dtype = self.expr = None


class IPluginV3:
    def __init__(self) -> None:
        pass


class IPluginV3QuickCore: ...
class IPluginV3QuickBuild: ...
class IPluginV3QuickRuntime: ...
class IPluginV3QuickAOTBuild: ...
class IPluginCreatorV3Quick:
    def __init__(self) -> None:
        pass


class IPluginRegistry:
    def __init__(self) -> None:
        self._creators: Dict[Tuple[str, str, str], object] = {}

    def register_creator(self, creator, namespace: str = "") -> bool:
        key = (creator.name, creator.plugin_version, namespace)
        if key in self._creators:
            return False
        self._creators[key] = creator
        return True

    def get_creator(self, name: str, version: str, namespace: str = ""):
        return self._creators.get((name, version, namespace))

    @property
    def all_creators(self) -> list:
        return list(self._creators.values())


_REGISTRY = IPluginRegistry()


def configure(compiled_module: bytes) -> None:
    """Give the enums that differ between releases the members the real `tensorrt.so` of that release names
    (pybind11 keeps every Python name as a string in the binary)."""
    global NetworkDefinitionCreationFlag
    NetworkDefinitionCreationFlag = _Enum("NetworkDefinitionCreationFlag", {
        name: value for name, value in _NETWORK_FLAGS.items() if name.encode() in compiled_module})


def get_plugin_registry() -> IPluginRegistry:
    return _REGISTRY
