"""The HTTP front of `serve`: an asyncio HTTP/1.1 reverse proxy between clients and tritonserver's HTTP port.

Triton 2.51 trusts what it parses: a body of 10^6 `[` segfaults it, a batch dimension of 0 or 2^62 gives a
200 without the batch dimension, and its readiness endpoints answer 200 while a stub hangs. The front

- refuses, with one JSON `{"error": ...}` line like Triton's, JSON nested deeper than `max_depth`, bodies
  over `max_body` (413, before reading them), and inference inputs whose shape is not a list of positive
  integers, whose batch is outside 1..max_batch_size, or whose element count disagrees with the binary
  data it declares, and outputs that ask for the classification extension (a SIGFPE of tritonserver on a BYTES
  output) or carry a `binary_data` that is not a boolean (a 500);
- answers health itself from `Upstream` (what the supervisor knows), and 503 + Retry-After instead of
  forwarding while a model is being recovered or the server is restarting, or when `Upstream.max_in_flight`
  inference requests (over both fronts) are already running; Triton's "unknown model" for a model
  the repository has, and its "stub is not healthy", become that 503 too (both are over in seconds);
- forwards everything else unchanged (headers included, so the restricted-API key reaches Triton), keeping
  connections alive both ways, and streams the answer back.

It runs its own event loop in a thread (`start`, `drain`, `close`), so a synchronous supervisor can own it."""
from __future__ import annotations

import asyncio
import collections
import http
import json
import math
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import numpy as np

from .. import contract
from ..errors import EdetError
from ..log import logger
from ..preprocess import MAX_ENCODED_BYTES

MAX_DEPTH = 64  # legitimate requests nest 3-7 levels (inline tensors one level per dimension)
# The request limit the preprocess model applies to its images, plus room for the JSON part and the 4-byte
# length of each element, so that a body the model would accept is never refused here.
MAX_BODY = MAX_ENCODED_BYTES + (1 << 20)
MAX_HEAD = 64 << 10  # request line + headers
# tritonserver (libevhtp) drops the connection, answering nothing, on a request line or one header line of 8 KiB
# or more (measured on 2.51: 8180 bytes pass, 8192 do not): such requests are refused here with 414 / 431.
MAX_LINE = 8000
METHODS = ("GET", "HEAD", "POST")  # all the KServe v2 protocol uses (HEAD: health probes, answered here)
# Headers that must come once: Triton reads the first of several, the front the last.
SINGLE_HEADERS = {"inference-header-content-length", "content-type", "content-encoding", "host"}
RETRY_AFTER_S = 2
IDLE_TIMEOUT_S = 75.0  # a client connection waiting for its next request
BODY_TIMEOUT_S = 300.0
DRAIN_BODY_S = 10.0  # after a 413, how long the rest of the body is read and dropped so the client sees it
MAX_IDLE_UPSTREAM = 64
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "expect", "content-length"}
MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/([a-z_]+))?$")
# What a decoded path may hold: RFC 3986's path characters without '%' (the front forwards the decoded path, so
# that Triton routes what the front checked) and nothing that would change the request line.
SAFE_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@/-]*$")
TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # a method or header name (RFC 9110 5.6.2)
CHUNK_SIZE = re.compile(rb"^[0-9A-Fa-f]{1,15}$")
RECOVERABLE = re.compile(r"is not healthy|[Uu]nknown model|is not found|is not ready|not loaded")


@dataclass(frozen=True)
class ModelInfo:
    # The largest batch (first dim) a request may carry; 0: the model takes no batch. For an ensemble that
    # declares max_batch_size 0 and names its batch first (configs.ENSEMBLE_MAX_BATCH_SIZE), its members' bound.
    max_batch_size: int
    members: Tuple[str, ...] = ()  # an ensemble's step models
    inputs: Tuple[Tuple[str, str, Tuple[int, ...]], ...] = ()  # (name, KServe datatype, dims without batch)
    versions: Tuple[str, ...] = ("1",)  # the versions Triton serves (its version policy over the directories)


def repository_models(repo) -> Dict[str, ModelInfo]:
    """What the front and the supervisor need of a repository's configs."""
    from .verify import batch_bound, load_configs, model_config_pb2

    pb = model_config_pb2()
    configs = load_configs(repo)
    models = {}
    for name, cfg in configs.items():
        bound, batch_first = batch_bound(cfg, configs)
        inputs = tuple((t.name, pb.DataType.Name(t.data_type).replace("TYPE_", "").replace("STRING", "BYTES"),
                        tuple(t.dims)[1 if batch_first else 0:]) for t in cfg.input)
        members = tuple(s.model_name for s in cfg.ensemble_scheduling.step) if cfg.platform == "ensemble" else ()
        models[name] = ModelInfo(bound, members, inputs, served_versions(cfg, Path(repo) / name))
    return models


def served_versions(cfg, model_dir: Path) -> Tuple[str, ...]:
    """The version directories Triton serves under the config's version_policy (default: the latest one)."""
    present = sorted(int(d.name) for d in model_dir.iterdir() if d.is_dir() and _digits(d.name))
    policy = cfg.version_policy.WhichOneof("policy_choice")
    if policy == "all":
        chosen = present
    elif policy == "specific":
        chosen = [v for v in present if v in set(cfg.version_policy.specific.versions)]
    else:
        chosen = present[-max(1, cfg.version_policy.latest.num_versions):] if present else []
    return tuple(str(v) for v in chosen)


class Upstream:
    """The server behind the fronts, as its supervisor sees it (written by the supervisor, read by the fronts),
    and the inference requests in flight through them (at most `max_in_flight`; 0: no bound)."""

    def __init__(self, host: str, port: int, models: Dict[str, ModelInfo], grpc_port: Optional[int] = None,
                 max_in_flight: int = 0):
        self.host, self.port = host, port  # tritonserver's HTTP port (the HTTP front's upstream)
        self.grpc_port = grpc_port  # its gRPC port on loopback (the gRPC front's)
        self.models = models
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._lock = threading.Lock()  # the two fronts count from their own threads
        self.up = False  # tritonserver started and ready
        self.down: Set[str] = set()  # models being recovered
        # By model with stubs (an ensemble's members; see `succeeded`): inferences answered OK through the
        # fronts, and time.monotonic() of the latest. The canary's evidence that those stubs answer.
        self.completed: Dict[str, int] = {}
        self.last_success: Dict[str, float] = {}

    def dependencies(self, model: str) -> Set[str]:
        """The model itself and, for an ensemble, its members: it answers only when all of them do."""
        info = self.models.get(model)
        return {model, *(info.members if info else ())}

    def dependents(self, model: str) -> Set[str]:
        """The model and every ensemble that runs it."""
        return {model, *(name for name, info in self.models.items() if model in info.members)}

    def ready(self) -> bool:
        return self.up and not self.down

    def model_ready(self, model: str) -> bool:
        return self.up and not (self.dependencies(model) & self.down)

    def stub_models(self, model: str) -> Set[str]:
        """The models whose stubs an inference of `model` runs: an ensemble's members, else the model."""
        info = self.models.get(model)
        return set(info.members) if info and info.members else {model}

    def succeeded(self, model: Optional[str]) -> None:
        """An inference of `model` was answered OK: each stub it ran is alive. Only that: a request to one
        member says nothing of the others (a hung engine behind a busy preprocess model)."""
        if model not in self.models:
            return
        now = time.monotonic()
        with self._lock:
            for m in self.stub_models(model):
                self.completed[m] = self.completed.get(m, 0) + 1
                self.last_success[m] = now

    def unknown_version(self, model: Optional[str], version: Optional[str]) -> Optional[str]:
        """Triton's "unknown model" for a version of a repository model that it does not serve, or None. Said
        by the fronts: from Triton it would read as a model in recovery (503, retry), for good."""
        info = self.models.get(model)
        if not info or not version or version in info.versions:
            return None
        return (f"Request for unknown model: '{model}' version {version} is not found (served versions: "
                f"{', '.join(info.versions) or 'none'})")

    def admit(self) -> bool:
        """Take a slot for an inference request, or False when `max_in_flight` are running (then: 503)."""
        with self._lock:
            if self.max_in_flight and self.in_flight >= self.max_in_flight:
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def at_capacity(self) -> str:
        return (f"the server is at capacity: {self.max_in_flight} inference request(s) in flight; retry in "
                f"{RETRY_AFTER_S} s")


def json_depth(data: bytes, limit: int = MAX_DEPTH, chunk: int = 4 << 20) -> int:
    """Deepest nesting of `[`/`{` outside strings in JSON text (a quote counts when preceded by an even number
    of backslashes), vectorised; stops early once past `limit`. Chunked, to bound memory on large bodies."""
    a = np.frombuffer(data, np.uint8)
    deepest, depth, inside, run = 0, 0, 0, 0  # carried over chunks: depth, in-string parity, trailing backslashes
    for start in range(0, a.size, chunk):
        c = a[start:start + chunk]
        idx = np.arange(c.size, dtype=np.int64)
        backslash = c == 0x5C
        last_plain = np.maximum.accumulate(np.where(backslash, -1 - run, idx))  # last non-backslash index
        before = np.empty(c.size, np.int64)  # backslashes right before each byte
        before[0] = run
        before[1:] = idx[:-1] - last_plain[:-1]
        quote = (c == 0x22) & (before % 2 == 0)
        in_string = (np.cumsum(quote, dtype=np.int64) + inside) & 1
        outside = in_string == 0
        step = (((c == 0x5B) | (c == 0x7B)) & outside).astype(np.int32) - (((c == 0x5D) | (c == 0x7D)) & outside)
        levels = np.cumsum(step, dtype=np.int64) + depth
        deepest = max(deepest, int(levels.max()))
        if deepest > limit:
            return deepest
        depth, inside = int(levels[-1]), int(in_string[-1])
        run = int(c.size - 1 - last_plain[-1])
    return deepest


def _uint64(value: object) -> bool:
    return type(value) is int and 0 <= value < 2 ** 64


# Request parameters Triton 2.51's HTTP server reads itself: a value of another JSON type is its 500 ("Unable to
# parse 'priority'"). Other names are passed to the model, and Triton refuses their wrong types with a 400.
REQUEST_PARAMETERS = {
    "priority": ("a non-negative integer", _uint64),
    "timeout": ("a non-negative integer (microseconds)", _uint64),
    "sequence_id": ("a non-negative integer or a string", lambda v: _uint64(v) or isinstance(v, str)),
    "sequence_start": ("true or false", lambda v: type(v) is bool),
    "sequence_end": ("true or false", lambda v: type(v) is bool),
    "binary_data_output": ("true or false", lambda v: type(v) is bool),
}


def check_parameters(params: object) -> Optional[str]:
    """Why an inference request's own `parameters` are refused, or None."""
    if params is None:
        return None
    if not isinstance(params, dict):
        return "'parameters' must be a JSON object"
    for key, (kind, valid) in REQUEST_PARAMETERS.items():
        if key in params and not valid(params[key]):
            return f"parameter {key!r} must be {kind}, got {json.dumps(params[key])[:40]}"
    return None


class DuplicateKey(ValueError):
    """A JSON object naming a key twice: Python keeps the last value, Triton's parser (RapidJSON) the first, so
    the front would check one request and Triton run another (a forged batch, the classification SIGFPE)."""


def unique_keys(pairs: List[Tuple[str, object]]) -> Dict[str, object]:
    """json.loads' object_pairs_hook refusing a key named twice (`DuplicateKey`)."""
    obj: Dict[str, object] = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKey(key)
        obj[key] = value
    return obj


# Tensor parameters Triton parses itself (a wrong JSON type is its 500): name -> (what it must be, check).
TENSOR_PARAMETERS = {
    "shared_memory_region": ("a string", lambda v: isinstance(v, str)),
    "shared_memory_byte_size": ("a non-negative integer", _uint64),
    "shared_memory_offset": ("a non-negative integer", _uint64),
}


def _tensor_problem(kind: str, item: Dict) -> Optional[str]:
    """Why an input's or output's name or parameters have a JSON type Triton cannot parse, or None."""
    if not isinstance(item.get("name"), str):
        return f"each {kind} needs a string 'name', got {json.dumps(item.get('name'))[:40]}"
    params = item.get("parameters")
    if params is not None and not isinstance(params, dict):
        return f"{kind} {item['name']!r}: 'parameters' must be a JSON object"
    for key, (what, valid) in TENSOR_PARAMETERS.items():
        if key in (params or {}) and not valid(params[key]):
            return f"{kind} {item['name']!r}: {key} must be {what}"
    return None


def _leaves(data: object) -> Iterator[object]:
    if isinstance(data, list):
        for x in data:
            yield from _leaves(x)
    else:
        yield data


def check_inference(request: object, binary_size: int, max_batch_size: Optional[int]) -> Optional[str]:
    """Why an inference request's JSON part is refused, or None. `max_batch_size`: the model's batch bound
    (`ModelInfo.max_batch_size`; 0: no batch dim; None: a model the repository lacks). Triton 2.51 answers 200
    without the batch dimension for a batch of 0 or 2^62, and 500 for shapes that are not integers."""
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        return "the inference request must be a JSON object with a list of 'inputs'"
    reason = check_parameters(request.get("parameters"))
    if reason:
        return reason
    if "id" in request and not isinstance(request["id"], str):
        return "'id' must be a string"
    declared = 0
    for item in request["inputs"]:
        if not isinstance(item, dict):
            return "each input must be a JSON object"
        problem = _tensor_problem("input", item)
        if problem:
            return problem
        if not isinstance(item.get("datatype"), str):
            return f"input {item['name']!r}: 'datatype' must be a string"
        if "data" in item and (not isinstance(item["data"], list) or (
                item["datatype"] == "BYTES" and not all(isinstance(x, str) for x in _leaves(item["data"])))):
            return f"input {item['name']!r}: 'data' must be a list" + (" of strings" if item["datatype"] == "BYTES"
                                                                          else "")
        name, shape = item.get("name"), item.get("shape")
        if not (isinstance(shape, list) and all(type(d) is int and 0 < d < 2 ** 63 for d in shape)
                and (shape or max_batch_size == 0)):
            return f"input {name!r}: the shape must be a list of positive integers, got {json.dumps(shape)[:80]}"
        if max_batch_size and shape[0] > max_batch_size:
            return f"input {name!r}: batch {shape[0]} is more than the model's limit of {max_batch_size}"
        size = (item.get("parameters") or {}).get(contract.BINARY_DATA_SIZE)  # a JSON object (`_tensor_problem`)
        if size is None:
            continue
        if type(size) is not int or size < 0:
            return f"input {name!r}: {contract.BINARY_DATA_SIZE} must be a non-negative integer"
        declared += size
        elements = math.prod(shape)
        width = contract.FIXED_DATATYPE_BYTES.get(item.get("datatype"))
        if width is not None and elements * width != size:
            return (f"input {name!r}: shape {shape} of {item.get('datatype')} is {elements * width} bytes, "
                    f"but {contract.BINARY_DATA_SIZE} is {size}")
        if item.get("datatype") == "BYTES" and elements * contract.BYTES_LENGTH_PREFIX > size:
            return f"input {name!r}: shape {shape} has more elements than {size} bytes of BYTES data can hold"
    if declared != binary_size:
        return f"the inputs declare {declared} bytes of binary data, the body carries {binary_size}"
    return check_outputs(request.get("outputs"))


def check_outputs(outputs: object) -> Optional[str]:
    """Why an inference request's `outputs` are refused, or None. Triton 2.51 dies of SIGFPE (the whole server,
    every model) on the classification extension asked of a BYTES output (detection_labels), and answers 500 for a
    `binary_data` or `classification` of the wrong JSON type. A detector has nothing to classify: the extension is
    refused for every output."""
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        return "'outputs' must be a list of JSON objects"
    for item in outputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return "each output must be a JSON object with a string 'name'"
        problem = _tensor_problem("output", item)
        if problem:
            return problem
        params = item.get("parameters") or {}  # a JSON object, or absent (`_tensor_problem`)
        if "classification" in params:
            return f"output {item['name']!r}: the classification extension is not supported by these models"
        if "binary_data" in params and type(params["binary_data"]) is not bool:
            return f"output {item['name']!r}: binary_data must be true or false"
    return None


class Refused(Exception):
    """A request answered by the front itself: (status, message, extra headers)."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.headers, self.close = status, message, headers or {}, close


def _response(status: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None, keep: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    lines += [f"Content-Length: {len(body)}", f"Connection: {'keep-alive' if keep else 'close'}", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def _error(status: int, message: str, headers: Optional[Dict[str, str]] = None, keep: bool = True) -> bytes:
    return _response(status, json.dumps({"error": message}).encode(),
                     {"Content-Type": "application/json", **(headers or {})}, keep)


def _parse_head(head: bytes) -> Tuple[str, str, str, List[Tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not TOKEN.match(parts[0]):
        raise ValueError("malformed start line")
    fields = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not TOKEN.match(name) or any(c < " " and c != "\t" or c == "\x7f" for c in value):
            raise ValueError("malformed header line")
        fields.append((name, value.strip(" \t")))
    return parts[0], parts[1], parts[2], fields


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()  # str.isdigit alone takes '²' and other Unicode digits


def _content_length(fields: List[Tuple[str, str]]) -> Tuple[Optional[int], bool]:
    """(Content-Length, chunked) of a message; ValueError when they are ambiguous."""
    lengths = {v for k, v in fields if k.lower() == "content-length"}
    encodings = [v.lower() for k, v in fields if k.lower() == "transfer-encoding"]
    chunked = bool(encodings)
    if chunked and (lengths or encodings != ["chunked"]):
        raise ValueError("unsupported Transfer-Encoding")
    if len(lengths) > 1 or any(not _digits(v) for v in lengths):
        raise ValueError("invalid Content-Length")
    return (int(lengths.pop()) if lengths else None), chunked


def origin_path(target: str) -> Tuple[str, str]:
    """(decoded path, raw query) of a request target, or Refused. The absolute form (`http://host/v2/...`,
    which servers must accept) is reduced to its path, so every check sees the path Triton will route."""
    if target.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(target)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    raw, _, query = target.partition("?")
    try:
        path = urllib.parse.unquote(raw, errors="strict") if raw.isascii() else ""
    except UnicodeDecodeError:
        path = ""
    if not SAFE_PATH.match(path) or not all("!" <= c <= "~" for c in query):
        raise Refused(400, f"malformed request target {target[:80]!r}: a path such as /v2/models/<name>/infer",
                      close=True)
    return path, query


class Front:
    """Listen on (address, port) and forward to `upstream` (see the module docstring). The socket is bound in
    the constructor, so a taken port is refused before anything else starts."""

    def __init__(self, upstream: Upstream, address: str, port: int, max_depth: int = MAX_DEPTH,
                 max_body: int = MAX_BODY, retry_after: int = RETRY_AFTER_S):
        self.upstream = upstream
        self.max_depth, self.max_body, self.retry_after = max_depth, max_body, retry_after
        family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((address, port))
            self.sock.listen(1024)
        except OSError:
            self.sock.close()
            raise EdetError(f"http port {port} on {address} is already in use; choose another (--http-port) or "
                            f"stop what listens there") from None
        self.address, self.port = address, self.sock.getsockname()[1]
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.thread: Optional[threading.Thread] = None
        self.server: Optional[asyncio.AbstractServer] = None
        self.connections: Dict[asyncio.StreamWriter, bool] = {}  # -> busy with a request
        self.idle: List[Tuple[Tuple[str, int], asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.draining = False

    @property
    def url(self) -> str:
        return f"{self.address}:{self.port}"

    # -- lifecycle (called from other threads) --------------------------------------------------------------
    def start(self) -> "Front":
        started = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            self.server = self.loop.run_until_complete(
                asyncio.start_server(self._serve_client, sock=self.sock, limit=MAX_HEAD))
            started.set()
            self.loop.run_forever()
            self.loop.close()

        self.thread = threading.Thread(target=run, name="edet-front", daemon=True)
        self.thread.start()
        started.wait(30)
        return self

    def drain(self, grace: float) -> int:
        """Stop accepting, close idle connections, let requests in flight finish for up to `grace` s;
        returns how many were still running then."""
        if self.loop is None or self.loop.is_closed():
            return 0
        return asyncio.run_coroutine_threadsafe(self._drain(grace), self.loop).result(grace + 10)

    def close(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        self.sock.close()

    async def _drain(self, grace: float) -> int:
        self.draining = True
        self.server.close()
        for writer, busy in list(self.connections.items()):
            if not busy:
                writer.close()
        deadline = time.monotonic() + grace
        while any(self.connections.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for _, _, writer in self.idle:
            writer.close()
        self.idle.clear()
        return sum(self.connections.values())

    async def _close(self) -> None:
        self.server.close()
        for writer in [*self.connections, *(w for _, _, w in self.idle)]:
            writer.close()
        self.idle.clear()

    # -- one client connection ------------------------------------------------------------------------------
    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections[writer] = False
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Not set on sockets accepted from a listener we bound: without it, an answer written as head then
            # body waits for the client's delayed ACK (+40 ms per request, measured).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while not self.draining:
                try:
                    head = await asyncio.wait_for(self._read_head(reader), IDLE_TIMEOUT_S)
                except Refused as r:
                    writer.write(_error(r.status, r.message, r.headers, keep=False))
                    break
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    break
                self.connections[writer] = True
                try:
                    keep = await self._request(head, reader, writer)
                except Refused as r:
                    writer.write(_error(r.status, r.message, r.headers, keep=not r.close))
                    keep = not r.close
                self.connections[writer] = False
                if not keep:
                    break
                await writer.drain()
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        except Exception:  # a bug of ours must not end the front: this connection only
            logger.exception("front: unexpected error on a client connection")
        finally:
            self.connections.pop(writer, None)
            writer.close()

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> bytes:
        """The request line and headers, CRLF-terminated, or Refused: a line Triton would drop (MAX_LINE), more
        than MAX_HEAD in all, or lines ended by a bare LF (answered at once instead of waiting for a CRLF)."""
        lines: List[bytes] = []
        total = 0
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:  # one line longer than the whole bound
                raise Refused(431, "request line and headers are too large") from None
            total += len(line)
            if total > MAX_HEAD:
                raise Refused(431, "request line and headers are too large")
            if not line.endswith(b"\r\n"):
                raise Refused(400, "malformed request: lines must end with CRLF")
            if line == b"\r\n":
                if lines:
                    return b"".join(lines) + b"\r\n"
                continue  # empty lines before a request line are ignored (RFC 9112 2.2)
            if len(line) > MAX_LINE:
                raise Refused(431 if lines else 414, f"the {'header line' if lines else 'request line'} is "
                                                     f"longer than {MAX_LINE} bytes")
            lines.append(line)

    async def _request(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Handle one request; returns whether the client connection stays open."""
        try:
            method, target, version, fields = _parse_head(head)
            length, chunked = _content_length(fields)
        except (ValueError, UnicodeDecodeError) as e:
            raise Refused(400, f"malformed request: {e}", close=True) from None
        headers = {k.lower(): v for k, v in fields}
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep = ("close" not in tokens) if version == "HTTP/1.1" else ("keep-alive" in tokens)
        keep = keep and not self.draining
        try:
            return await self._handle(method, target, fields, headers, length, chunked, keep, reader, writer)
        except Refused as r:
            if keep or r.close:
                raise
            raise Refused(r.status, r.message, r.headers, close=True) from None  # the client asked to close

    async def _handle(self, method: str, target: str, fields: List[Tuple[str, str]], headers: Dict[str, str],
                      length: Optional[int], chunked: bool, keep: bool, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> bool:
        path, query = origin_path(target)
        target = path + (f"?{query}" if query else "")  # what is forwarded: the path checked here
        match = MODEL_PATH.match(path)
        model = match.group(1) if match else None
        version = match.group(2) if match else None
        action = match.group(3) if match else None

        if action in ("generate", "generate_stream"):
            # Triton's generate extension makes inputs of a request's JSON fields, past the checks above; these
            # are not text-generation models.
            raise Refused(400, f"the {action} extension is not supported by these models",
                          close=bool(length or chunked))
        if length is not None and length > self.max_body:
            await self._discard(reader, length)
            raise Refused(413, f"request too large: a body of {length} bytes; the limit is {self.max_body} bytes",
                          close=True)
        health = path in ("/v2/health/live", "/v2/health/ready") or action == "ready"
        counts = collections.Counter(k.lower() for k, _ in fields)
        repeated = sorted(k for k in SINGLE_HEADERS if counts[k] > 1)
        if repeated:  # Triton reads the first, the front the last: one request for each of them
            raise Refused(400, f"header {repeated[0]} given more than once", close=True)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":  # the checks read the body as sent: compressed, it is not what Triton parses
            raise Refused(415, f"Content-Encoding {encoding[:20]!r} is not accepted: send the request "
                               f"uncompressed", close=True)
        # HEAD only where the front answers it: Triton answers HEAD with a body, which would stay in a pooled
        # upstream connection and become the next client's answer.
        if method not in METHODS or (health and method == "POST") or (method == "HEAD" and not health):
            raise Refused(405, f"method {method} is not allowed here",
                          {"Allow": "GET, HEAD" if health else ", ".join(METHODS)},
                          close=bool(length or chunked) or method == "HEAD")  # after HEAD, a body misleads: close
        # Metadata, readiness and inference; a restricted API (config, stats) keeps Triton's refusal first.
        unknown = self.upstream.unknown_version(model, version) if action in (None, "ready", "infer") else None
        if unknown:
            raise Refused(404, unknown, close=bool(length or chunked))
        if health:
            if length or chunked:
                raise Refused(400, "health requests carry no body", close=True)
            answer = self._health(path, model, keep)
            writer.write(answer if method == "GET" else answer[:answer.index(b"\r\n\r\n") + 4])
            return keep
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await asyncio.wait_for(self._read_body(reader, length, chunked), BODY_TIMEOUT_S)
        if len(body) > (1 << 20):  # seconds of numpy and json on a large inline body: off the event loop
            await asyncio.get_running_loop().run_in_executor(None, self._guard, body, headers, model, action)
        elif body:
            self._guard(body, headers, model, action)
        if model in self.upstream.models and not self.upstream.model_ready(model):
            raise Refused(503, f"model {model} is being recovered; retry", {"Retry-After": str(self.retry_after)},
                          close=not keep)
        known = model if model in self.upstream.models else None
        if action != "infer":
            return await self._forward(method, target, fields, body, writer, keep, known, False)
        if not self.upstream.admit():
            raise Refused(503, self.upstream.at_capacity(), {"Retry-After": str(self.retry_after)}, close=not keep)
        try:
            return await self._forward(method, target, fields, body, writer, keep, known, True)
        finally:
            self.upstream.release()

    def _health(self, path: str, model: Optional[str], keep: bool) -> bytes:
        if path == "/v2/health/live":
            return _response(200, keep=keep)
        if path == "/v2/health/ready":
            ok, what = self.upstream.ready(), "the server is"
        elif model in self.upstream.models:
            ok, what = self.upstream.model_ready(model), f"model {model} is"
        else:
            return _error(404, f"Request for unknown model: '{model}' is not found", keep=keep)
        if ok:
            return _response(200, keep=keep)
        return _error(503, f"{what} not ready", {"Retry-After": str(self.retry_after)}, keep=keep)

    def _guard(self, body: bytes, headers: Dict[str, str], model: Optional[str], action: Optional[str]) -> None:
        declared = headers.get(contract.INFERENCE_HEADER_LENGTH.lower())
        if declared is not None:
            if not _digits(declared) or int(declared) > len(body):
                raise Refused(400, f"{contract.INFERENCE_HEADER_LENGTH} {declared[:40]!r} does not fit a body "
                                   f"of {len(body)} bytes")
            json_part = body[:int(declared)]
        else:
            json_part = body
        if json_depth(json_part, self.max_depth) > self.max_depth:
            raise Refused(400, f"JSON nested deeper than {self.max_depth} levels")
        if action != "infer":
            return
        try:
            request = json.loads(json_part, object_pairs_hook=unique_keys)
        except DuplicateKey as e:
            raise Refused(400, f"the inference request names {str(e)[:40]!r} twice in one JSON object") from None
        except (ValueError, RecursionError):
            raise Refused(400, "the inference request is not valid JSON") from None
        info = self.upstream.models.get(model)
        reason = check_inference(request, len(body) - len(json_part), info.max_batch_size if info else None)
        if reason:
            raise Refused(400, reason)

    async def _read_body(self, reader: asyncio.StreamReader, length: Optional[int], chunked: bool) -> bytes:
        if not chunked:
            return await reader.readexactly(length) if length else b""
        parts, total = [], 0
        while True:
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError:
                raise Refused(400, "malformed chunked body: a chunk-size line too long", close=True) from None
            digits = line.split(b";", 1)[0].strip(b" \t\r\n")
            if not CHUNK_SIZE.match(digits):
                raise Refused(400, "malformed chunked body", close=True)
            size = int(digits, 16)
            if size == 0:
                try:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers: dropped
                        pass
                except asyncio.LimitOverrunError:
                    raise Refused(400, "malformed chunked body: a trailer line too long", close=True) from None
                return b"".join(parts)
            total += size
            if total > self.max_body:
                raise Refused(413, f"request too large: the limit is {self.max_body} bytes", close=True)
            parts.append(await reader.readexactly(size))
            if await reader.readexactly(2) != b"\r\n":
                raise Refused(400, "malformed chunked body", close=True)

    @staticmethod
    async def _discard(reader: asyncio.StreamReader, length: int) -> None:
        """Read and drop a refused body for a while: a client that sends it all before reading (urllib, most
        libraries) then sees the 413 instead of a reset connection. Nothing is kept."""
        deadline = time.monotonic() + DRAIN_BODY_S
        while length > 0 and time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(reader.read(min(length, 1 << 20)), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return
            if not data:
                return
            length -= len(data)

    # -- upstream ---------------------------------------------------------------------------------------------
    async def _connect(self, fresh: bool) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        key = (self.upstream.host, self.upstream.port)
        while self.idle and not fresh:
            k, r, w = self.idle.pop()
            if k == key and not r.at_eof() and not w.is_closing():
                return r, w, True
            w.close()
        r, w = await asyncio.wait_for(asyncio.open_connection(*key, limit=MAX_HEAD), 5)
        return r, w, False

    def _release(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if len(self.idle) < MAX_IDLE_UPSTREAM and not self.draining:
            self.idle.append(((self.upstream.host, self.upstream.port), r, w))
        else:
            w.close()

    def _unavailable(self, model: Optional[str], keep: bool, why: str) -> Refused:
        what = f"model {model}" if model else "the server"
        return Refused(503, f"{what} is unavailable ({why}); retry", {"Retry-After": str(self.retry_after)},
                       close=not keep)

    async def _forward(self, method: str, target: str, fields: List[Tuple[str, str]], body: bytes,
                       writer: asyncio.StreamWriter, keep: bool, model: Optional[str], infer: bool) -> bool:
        head = [f"{method} {target} HTTP/1.1"]
        head += [f"{k}: {v}" for k, v in fields if k.lower() not in HOP_BY_HOP]
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(body)}")
        request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        for attempt in (0, 1):
            try:
                r, w, reused = await self._connect(fresh=attempt > 0)
            except (OSError, asyncio.TimeoutError):
                raise self._unavailable(model, keep, "the server is restarting") from None
            try:
                w.write(request)
                await w.drain()
                status_head = await r.readuntil(b"\r\n\r\n")
                break
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                w.close()
                # A pooled connection the server had closed: nothing was received, send again once.
                if reused and attempt == 0 and not (isinstance(e, asyncio.IncompleteReadError) and e.partial):
                    continue
                raise self._unavailable(model, keep, "the server closed the connection") from None
        try:
            start, _, _ = status_head.partition(b"\r\n")
            status = int(start.split(b" ", 2)[1])
            _, _, _, upstream_fields = _parse_head(b"GET / HTTP/1.1" + status_head[len(start):])
            length, chunked = _content_length(upstream_fields)
        except (ValueError, IndexError):
            w.close()
            raise Refused(502, "malformed answer from tritonserver", close=True) from None
        up_tokens = {t.strip().lower() for k, v in upstream_fields if k.lower() == "connection" for t in v.split(",")}
        reusable = "close" not in up_tokens
        no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
        if no_body:
            length, chunked = 0, False
        if length is None and not chunked:
            reusable, keep = False, False  # the body ends when the server closes

        if model and status in (400, 404, 500, 503) and length is not None and length <= MAX_HEAD:
            # Small errors are read whole: a model in recovery shows as unknown/unhealthy for a moment.
            data = await r.readexactly(length)
            self._release(r, w) if reusable else w.close()
            if RECOVERABLE.search(data.decode("utf-8", "replace")):
                raise self._unavailable(model, keep, "it is being recovered")
            writer.write(self._relayed_head(start, upstream_fields, keep, chunked=False, length=length) + data)
            return keep
        if infer and status == 200:
            self.upstream.succeeded(model)
        writer.write(self._relayed_head(start, upstream_fields, keep, chunked, length))
        try:
            await self._relay(r, writer, length, chunked)
        except (ConnectionError, asyncio.IncompleteReadError):
            w.close()
            return False  # the answer was cut: the client must not take what follows as the next answer
        self._release(r, w) if reusable else w.close()
        return keep

    @staticmethod
    def _relayed_head(start: bytes, fields: List[Tuple[str, str]], keep: bool, chunked: bool,
                      length: Optional[int]) -> bytes:
        lines = [start.decode("latin-1")]
        lines += [f"{k}: {v}" for k, v in fields if k.lower() not in HOP_BY_HOP]
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        elif length is not None:
            lines.append(f"Content-Length: {length}")
        lines.append(f"Connection: {'keep-alive' if keep else 'close'}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    @staticmethod
    async def _relay(r: asyncio.StreamReader, writer: asyncio.StreamWriter, length: Optional[int],
                     chunked: bool) -> None:
        async def copy(n: int) -> None:
            while n > 0:
                data = await r.read(min(n, 1 << 16))
                if not data:
                    raise asyncio.IncompleteReadError(b"", n)
                writer.write(data)
                n -= len(data)
                await writer.drain()

        if chunked:
            while True:
                line = await r.readuntil(b"\r\n")
                writer.write(line)
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while True:
                        trailer = await r.readuntil(b"\r\n")
                        writer.write(trailer)
                        if trailer == b"\r\n":
                            return
                await copy(size + 2)
        elif length is not None:
            await copy(length)
        else:
            while data := await r.read(1 << 16):
                writer.write(data)
                await writer.drain()
