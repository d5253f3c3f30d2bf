"""A small client for the generated ensemble (HTTP or gRPC), returning `Detections` like the in-process path.
input_format="decoded" talks to the `<name>_decoded` ensemble: images are decoded here and sent as uint8 RGB,
which takes JPEG decoding off the server's Python preprocessing."""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from ..contract import (DETECTION_BOXES, DETECTION_CLASSES, DETECTION_SCORES, NUM_DETECTIONS, artifact_name)
from ..errors import EdetError
from ..postprocess import Detections
from ..preprocess import ImageSource, decode_image


class TritonDetectorClient:
    def __init__(self, url: str = "127.0.0.1:8000", model: str = artifact_name("d0"), protocol: str = "http",
                 timeout: float = 60.0, input_format: str = "encoded"):
        if input_format not in ("encoded", "decoded"):
            raise EdetError(f"input format must be encoded or decoded, got {input_format!r}")
        self.protocol = protocol
        self.model = model
        self.input_format = input_format
        self.url = url
        try:
            if protocol == "http":
                import tritonclient.http as tc
                self.client = tc.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
            elif protocol == "grpc":
                import tritonclient.grpc as tc
                self.client = tc.InferenceServerClient(url)
            else:
                raise EdetError(f"protocol must be http or grpc, got {protocol!r}")
        except ImportError:
            raise EdetError("the Triton client needs tritonclient: pip install 'edet-deploy[serve]'") from None
        self.tc = tc
        self.class_names: Sequence[str] = []

    def infer_raw(self, encoded: Sequence[ImageSource]) -> dict:
        """Send images (one request, batch = len(encoded)) and return the outputs by name. Encoded format:
        JPEG/PNG bytes; decoded format: anything `decode_image` reads (bytes, paths, HxWx3 uint8 arrays),
        all of one size."""
        if self.input_format == "decoded":
            arrays = [decode_image(x, name=f"image {i}") for i, x in enumerate(encoded)]
            if len({a.shape for a in arrays}) > 1:
                raise EdetError("decoded images in one request must share a size: send them one per request")
            data = np.stack(arrays)
            inp = self.tc.InferInput("IMAGE", list(data.shape), "UINT8")
        else:
            data = np.array([[bytes(b)] for b in encoded], dtype=object)
            inp = self.tc.InferInput("IMAGE", list(data.shape), "BYTES")
        inp.set_data_from_numpy(data)
        try:
            result = self.client.infer(self.model, [inp])
        except self.tc.InferenceServerException as e:
            if e.status() in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED") or "failed to connect" in (e.message() or ""):
                raise EdetError(f"cannot reach a Triton server at {self.url} over {self.protocol}: "
                                f"{(e.message() or '').splitlines()[0] if e.message() else e}") from None
            raise EdetError(f"server rejected the request: {e.message()}") from None
        except (OSError, ConnectionError) as e:  # HTTP client: refused, reset, unresolvable host
            raise EdetError(f"cannot reach a Triton server at {self.url} over {self.protocol}: {e}") from None
        names = [o["name"] if isinstance(o, dict) else o.name for o in
                 (result.get_response()["outputs"] if self.protocol == "http" else result.get_response().outputs)]
        return {n: result.as_numpy(n) for n in names}

    def detect(self, encoded: Sequence[ImageSource], min_score: float = 0.0) -> List[Detections]:
        out = self.infer_raw(encoded)
        dets = []
        for i in range(len(encoded)):
            n = int(out[NUM_DETECTIONS][i].reshape(-1)[0])
            scores = out[DETECTION_SCORES][i, :n]
            keep = scores >= min_score
            labels = out.get("detection_labels")
            names: Optional[list] = None
            if labels is not None:
                classes = out[DETECTION_CLASSES][i, :n]
                mapping = {int(c): (lab.decode() if isinstance(lab, bytes) else str(lab))
                           for c, lab in zip(classes, labels[i, :n])}
                names = [mapping.get(c, str(c)) for c in range(max(mapping) + 1)] if mapping else None
            dets.append(Detections(out[DETECTION_BOXES][i, :n][keep], scores[keep],
                                   out[DETECTION_CLASSES][i, :n][keep].astype(np.int64), names))
        return dets

    def server_ready(self) -> bool:
        try:
            return bool(self.client.is_server_ready())
        except Exception:  # noqa: BLE001
            return False

    def close(self) -> None:
        self.client.close()
