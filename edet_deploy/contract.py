"""The detection graph's contract, written once: input, candidate and output tensors, artifact names, the cache
folder and the Triton member and tensor names. The exporter, the ONNX schema, the TensorRT plugin, the Triton
generator and models, the client, postprocessing and the runners import these instead of spelling them out
(numpy and stdlib only, so the serving install and Triton's Python models can import it).

Outputs: num_detections [B,1] int32, detection_boxes [B,K,4] float32 (x1,y1,x2,y2, input pixels),
detection_scores [B,K] float32, detection_classes [B,K] int32; K = max_detections."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Tuple

# Graph input: uint8 RGB, resized and padded with the mean colour.
INPUT_NAME = "images"
INPUT_DTYPE = "uint8"
INPUT_LAYOUT = "NHWC"
# ONNX opsets the exporter writes: what torch's TorchScript exporter and TensorRT's parser both take.
EXPORT_OPSETS = (13, 21)

# ONNX element types by numpy dtype name (onnx.TensorProto values, so this module needs no onnx import).
ONNX_TYPES = {"float32": 1, "uint8": 2, "int32": 6}
# Triton config data types by numpy dtype name.
TRITON_TYPES = {"float32": "FP32", "uint8": "UINT8", "int32": "INT32"}


@dataclass(frozen=True)
class OutputSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: Callable  # (batch, K or N) -> shape; works with ints, dim names or TensorRT shape expressions

    @property
    def onnx_type(self) -> int:
        return ONNX_TYPES[self.dtype]

    @property
    def triton_type(self) -> str:
        return TRITON_TYPES[self.dtype]


OUTPUT_SPECS: Tuple[OutputSpec, ...] = (
    OutputSpec("num_detections", "int32", lambda b, k: (b, 1)),
    OutputSpec("detection_boxes", "float32", lambda b, k: (b, k, 4)),
    OutputSpec("detection_scores", "float32", lambda b, k: (b, k)),
    OutputSpec("detection_classes", "int32", lambda b, k: (b, k)),
)
OUTPUTS: Tuple[str, ...] = tuple(s.name for s in OUTPUT_SPECS)
NUM_DETECTIONS, DETECTION_BOXES, DETECTION_SCORES, DETECTION_CLASSES = OUTPUTS

# The decoded pre-NMS candidates (N = pre_nms_top_k): the soft-NMS node's inputs, and the outputs of a graph
# exported with --nms none.
CANDIDATE_SPECS: Tuple[OutputSpec, ...] = (
    OutputSpec("candidate_boxes", "float32", lambda b, n: (b, n, 4)),
    OutputSpec("candidate_scores", "float32", lambda b, n: (b, n)),
    OutputSpec("candidate_classes", "int32", lambda b, n: (b, n)),
)
CANDIDATES: Tuple[str, ...] = tuple(s.name for s in CANDIDATE_SPECS)


def artifact_name(variant: str, precision: str = "fp32", nms: bool = True) -> str:
    """File stem (and Triton model name) of a variant's graph: efficientdet_d0, efficientdet_d0.fp16,
    efficientdet_d0.int8-minmax; `_nonms` for a graph that stops at the candidates."""
    name = f"efficientdet_{variant}" + ("" if nms else "_nonms")
    return name if precision == "fp32" else f"{name}.{precision}"


# The most CPU threads a runner takes: the API's check (backends.base) and the CLI's --threads (cli_args.THREADS).
MAX_THREADS = 4096

CACHE_ENV = "EDET_DEPLOY_CACHE"


def _cache_problem(path: Path) -> str:
    """Why `path` cannot be the cache folder ('' when it can): it is created if missing (with its parents)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return "it is a file, not a folder"
    except OSError as e:
        return f"cannot create it: {e.strerror}"
    if not path.is_dir():
        return "it is not a folder"
    if not os.access(path, os.W_OK | os.X_OK):
        return "it is not writable" if os.access(path, os.F_OK) else "cannot reach it"
    return ""


def _fallback_cache(why: str) -> Path:
    """A private folder under the temporary directory, for a default cache that cannot be used (a read-only or
    unknown home): the cache only saves time, so the command goes on (with one warning) instead of failing."""
    import logging
    import tempfile

    uid = os.getuid() if hasattr(os, "getuid") else 0
    path = Path(tempfile.gettempdir()).absolute() / f"edet_deploy-cache-{uid}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.lstat()
        # A shared temporary folder: take only a real folder of ours, never one somebody else planted.
        usable = (not path.is_symlink() and path.is_dir() and st.st_uid == uid
                  and os.access(path, os.W_OK | os.X_OK))
    except OSError:
        usable = False
    if not usable:
        from .errors import EdetRuntimeError
        raise EdetRuntimeError(f"no usable cache folder: {why}, and {path} cannot be used either; set {CACHE_ENV} "
                               f"to a writable folder")
    if path not in _WARNED:
        _WARNED.add(path)
        logging.getLogger("edet_deploy").warning("%s; caching in %s instead (set %s to choose)", why, path, CACHE_ENV)
    return path


_WARNED: set = set()


def cache_dir() -> Path:
    """Where exports, compiled models and Triton backends are cached, as an absolute path (the Triton Python
    models run in another working directory): $EDET_DEPLOY_CACHE (created if missing; one that cannot be created
    or written is an EdetRuntimeError, exit 1), else ~/.cache/edet_deploy, else (no home, or a read-only one) a
    private folder under the temporary directory. An empty EDET_DEPLOY_CACHE counts as unset."""
    configured = os.environ.get(CACHE_ENV, "")
    if configured:
        path = Path(configured).expanduser().absolute()
        problem = _cache_problem(path)
        if problem:
            from .errors import EdetRuntimeError
            raise EdetRuntimeError(f"{CACHE_ENV}={configured} cannot be the cache folder: {problem}; point it to "
                                   f"a writable folder (or unset it)")
        return path
    try:
        path = (Path.home() / ".cache" / "edet_deploy").absolute()
    except (RuntimeError, KeyError, OSError):  # no HOME and no passwd entry (a container's arbitrary uid)
        return _fallback_cache("the home folder is unknown (HOME unset, no passwd entry)")
    problem = _cache_problem(path)
    return _fallback_cache(f"the default cache folder {path} is unusable ({problem})") if problem else path


def point_numba_cache() -> None:
    """numba caches compiled kernels beside their source, else under the home folder: an install the user cannot
    write (system-wide) and no usable home left it no locator ("cannot cache function ...") and the soft-NMS
    failed. Then its cache goes into ours. Call before numba is imported (it reads the variable once)."""
    if "NUMBA_CACHE_DIR" not in os.environ and not os.access(Path(__file__).parent, os.W_OK):
        os.environ["NUMBA_CACHE_DIR"] = str(cache_dir() / "numba")


# Triton: the ensemble <name> (encoded input) and <name>_decoded run <name>_preprocess[_decoded] ->
# <name>_engine -> <name>_postprocess.
# How an ensemble takes its images: encoded bytes (JPEG, PNG, ...) or uint8 RGB the client decoded.
INPUT_FORMATS = ("encoded", "decoded")


def ensemble_name(name: str, input_format: str = "encoded") -> str:
    return name if input_format == "encoded" else f"{name}_{input_format}"


def preprocess_name(name: str, input_format: str = "encoded") -> str:
    return f"{name}_preprocess" + ("" if input_format == "encoded" else f"_{input_format}")


def engine_name(name: str) -> str:
    return f"{name}_engine"


def postprocess_name(name: str) -> str:
    return f"{name}_postprocess"


def member_names(name: str) -> Tuple[str, str, str]:
    """The models the encoded ensemble `name` composes, in order."""
    return preprocess_name(name), engine_name(name), postprocess_name(name)


# The checksums of every file of a repository's model directories (configs, shims, graphs, sidecars), written by
# `triton-repo` at the repository's top level (Triton's scan skips files there) in `sha256sum` format, so that
# `sha256sum -c` checks it too; `serve` checks it at start and before every reload.
REPOSITORY_MANIFEST = "edet_manifest.sha256"

# Triton wire names: the ensemble's image input (per image BYTES [1] encoded, UINT8 [H, W, 3] decoded; the
# ensemble names the batch first: [-1, 1], [-1, -1, -1, 3], see triton/configs.ENSEMBLE_MAX_BATCH_SIZE); what the
# preprocess model hands on beside the graph input (INPUT_NAME): the letterbox scale and the original
# (height, width); the engine's outputs renamed on their way to the postprocess model; the labels that
# model adds to the graph outputs when the repository has class names, which are also the ensemble config's
# parameter CLASS_NAMES_PARAMETER (a JSON list), so a client can read them once.
IMAGE = "IMAGE"
SCALE = "scale"
ORIG_SIZE = "orig_size"
DETECTION_LABELS = "detection_labels"
CLASS_NAMES_PARAMETER = "class_names"
# The preprocess model's letterbox padding colour (a JSON list: the graph metadata's `mean`, the variant's).
FILL_PARAMETER = "fill"


def raw_output_name(output: str) -> str:
    """The ensemble tensor carrying the engine's `output` (graph pixels) to the postprocess model."""
    return f"raw_{output}"


# Triton's HTTP/REST wire (KServe v2 and its binary tensor extension), as the front in `serve` reads it: the
# header giving the length of the JSON part of a body whose tail is binary tensor data, the input parameter
# giving each input's share of that tail, and the bytes per element of the fixed-size datatypes (BYTES
# elements are each a 4-byte length plus the bytes).
INFERENCE_HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_DATA_SIZE = "binary_data_size"
FIXED_DATATYPE_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
                        "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
BYTES_LENGTH_PREFIX = 4
