"""A small client for the generated ensemble (HTTP or gRPC), returning `Detections` like the in-process path.
input_format="decoded" talks to the `<name>_decoded` ensemble: images are decoded here and sent as uint8 RGB,
which takes JPEG decoding off the server's Python preprocessing."""
from __future__ import annotations

import json
from http.client import HTTPException
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..contract import (CLASS_NAMES_PARAMETER, DETECTION_CLASSES, DETECTION_LABELS, IMAGE, INPUT_FORMATS,
                        artifact_name, ensemble_name)
from ..errors import EdetError, EdetRuntimeError
from ..postprocess import Detections, split_detections
from ..preprocess import ImageSource, decode_image

PROTOCOLS = ("http", "grpc")
# URL prefix -> (protocol, TLS)
SCHEMES = {"http": ("http", False), "https": ("http", True), "grpc": ("grpc", False)}
# Statuses meaning the request (or the model it names) was refused; any other failure is the server's.
REFUSED = {"400", "404", "StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"}


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def parse_url(url: str, protocol: Optional[str] = None) -> Tuple[str, str, bool]:
    """(host:port, protocol, TLS) from `url` (host:port, or with an http://, https:// or grpc:// prefix) and
    `protocol` (None: the prefix's, else http); a prefix that contradicts `protocol` is refused."""
    if protocol is not None and protocol not in PROTOCOLS:
        raise EdetError(f"protocol must be http or grpc, got {protocol!r}")
    address, ssl = url, False
    scheme, sep, rest = url.partition("://")
    if sep:
        if scheme.lower() not in SCHEMES:
            raise EdetError(f"--url {url}: unknown scheme {scheme}://; give host:port, or prefix it with "
                            f"{', '.join(s + '://' for s in SCHEMES)}")
        implied, ssl = SCHEMES[scheme.lower()]
        if protocol not in (None, implied):
            raise EdetError(f"--url {url} is {implied}, but --protocol is {protocol}")
        address, protocol = rest.rstrip("/"), implied
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in address for c in "/?#@ \t"):
        raise EdetError(f"--url {url} is not host:port (e.g. 127.0.0.1:8000)")
    return address, protocol or "http", ssl


class TritonDetectorClient:
    """Connects at construction: the model must be served (its metadata is read), and the class names come
    from the ensemble's config where the server opens that API (`serve --open-api model-config`); otherwise
    from the labels each response carries. Unreachable server: EdetRuntimeError; unknown model or a refused
    request: EdetError."""

    def __init__(self, url: str = "127.0.0.1:8000", model: str = artifact_name("d0"),
                 protocol: Optional[str] = None, timeout: float = 60.0, input_format: str = "encoded"):
        if input_format not in INPUT_FORMATS:
            raise EdetError(f"input format must be {' or '.join(INPUT_FORMATS)}, got {input_format!r}")
        address, self.protocol, ssl = parse_url(url, protocol)
        self.input_format = input_format
        self.url = url
        try:
            if self.protocol == "http":
                import tritonclient.http as tc
                self.client = tc.InferenceServerClient(address, connection_timeout=timeout, network_timeout=timeout,
                                                       ssl=ssl)
            else:
                import tritonclient.grpc as tc
                self.client = tc.InferenceServerClient(address)
        except ImportError:
            raise EdetError("the Triton client needs tritonclient: pip install 'edet-deploy[serve]'") from None
        self.tc = tc
        self.model = self._resolve_model(model)
        self.class_names: Optional[Tuple[str, ...]] = self._read_class_names()

    def _call(self, fn: Callable, *args, what: str = "the request"):
        """One call to the server, its failures as one-line errors: a refused request is the user's
        (EdetError), a server that is unreachable, goes away or fails is not (EdetRuntimeError)."""
        try:
            return fn(*args)
        except self.tc.InferenceServerException as e:
            message = _first_line(e.message() or str(e))
            if str(e.status()) in REFUSED:
                raise EdetError(f"server rejected {what}: {message}") from None
            if str(e.status()) in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "None") \
                    and "restricted" not in message:
                raise EdetRuntimeError(f"cannot reach a Triton server at {self.url} over {self.protocol}: "
                                       f"{message}") from None
            raise EdetRuntimeError(f"the server failed {what}: {message}") from None
        except (OSError, HTTPException) as e:  # HTTP client: refused, reset, unresolvable host, closed mid-call
            raise EdetRuntimeError(f"cannot reach a Triton server at {self.url} over {self.protocol}: "
                                   f"{_first_line(str(e)) or type(e).__name__}") from None

    def _input_type(self, model: str) -> Optional[str]:
        """The datatype of `model`'s image input; None when the server does not serve `model`."""
        try:
            meta = self._call(self.client.get_model_metadata, model, what=f"the metadata request for {model}")
        except EdetRuntimeError:
            raise
        except EdetError:  # unknown model
            return None
        inputs = meta["inputs"] if isinstance(meta, dict) else [{"name": i.name, "datatype": i.datatype}
                                                                 for i in meta.inputs]
        return next((i["datatype"] for i in inputs if i["name"] == IMAGE), "")

    def _resolve_model(self, model: str) -> str:
        """The ensemble for this input format: decoded images go to `<model>_decoded` unless `model` is a
        decoded ensemble already (UINT8 input)."""
        dtype = self._input_type(model)
        if dtype is None:
            raise EdetError(f"the server at {self.url} serves no model {model!r}")
        if self.input_format == "decoded" and dtype != "UINT8":
            decoded = ensemble_name(model, "decoded")
            if self._input_type(decoded) is None:
                raise EdetError(f"the server at {self.url} serves no {decoded!r} for --input-format decoded: "
                                f"generate the repository with `triton-repo --input-format encoded,decoded`")
            return decoded
        return model

    def _read_class_names(self) -> Optional[Tuple[str, ...]]:
        """The ensemble config's class names; None where the server keeps its config API closed."""
        try:
            config = self._call(self.client.get_model_config, self.model, what="the config request")
        except EdetRuntimeError as e:
            if "restricted" in str(e):  # a locked-down server: the labels come with each response instead
                return None
            raise
        params = config.get("parameters", {}) if isinstance(config, dict) else config.config.parameters
        value = params.get(CLASS_NAMES_PARAMETER)
        if value is None:
            return ()
        return tuple(json.loads(value["string_value"] if isinstance(value, dict) else value.string_value))

    def infer_raw(self, encoded: Sequence[ImageSource]) -> Dict[str, np.ndarray]:
        """Send images (one request, batch = len(encoded)) and return the outputs by name. Encoded format:
        JPEG/PNG bytes; decoded format: anything `decode_image` reads (bytes, paths, HxWx3 uint8 arrays),
        all of one size."""
        if self.input_format == "decoded":
            arrays = [decode_image(x, name=f"image {i}") for i, x in enumerate(encoded)]
            if len({a.shape for a in arrays}) > 1:
                raise EdetError("decoded images in one request must share a size: send them one per request")
            data = np.stack(arrays)
            inp = self.tc.InferInput(IMAGE, list(data.shape), "UINT8")
        else:
            data = np.array([[bytes(b)] for b in encoded], dtype=object)
            inp = self.tc.InferInput(IMAGE, list(data.shape), "BYTES")
        inp.set_data_from_numpy(data)
        result = self._call(self.client.infer, self.model, [inp])
        names = [o["name"] if isinstance(o, dict) else o.name for o in
                 (result.get_response()["outputs"] if self.protocol == "http" else result.get_response().outputs)]
        return {n: result.as_numpy(n) for n in names}

    def _labels(self, out: Dict[str, np.ndarray]) -> Optional[List[str]]:
        """Class names from the labels a response carries (the config was closed): those of the classes in it,
        the others named by their number."""
        labels = out.get(DETECTION_LABELS)
        if labels is None:
            return None
        seen = {int(c): (lab.decode() if isinstance(lab, bytes) else str(lab))
                for c, lab in zip(out[DETECTION_CLASSES].reshape(-1), labels.reshape(-1)) if lab}
        return [seen.get(c, str(c)) for c in range(max(seen) + 1)] if seen else None

    def detect(self, encoded: Sequence[ImageSource], min_score: float = 0.0) -> List[Detections]:
        out = self.infer_raw(encoded)
        names = self.class_names if self.class_names is not None else self._labels(out)
        # Boxes arrive in original pixels: the postprocess model mapped them.
        return split_detections(out, None, None, list(names) if names else None, min_score)

    def server_ready(self) -> bool:
        try:
            return bool(self.client.is_server_ready())
        except Exception:  # noqa: BLE001
            return False

    def close(self) -> None:
        self.client.close()
