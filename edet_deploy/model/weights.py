"""Loading and saving weights: our checkpoints and effdet (rwightman/efficientdet-pytorch) checkpoints,
from .pth (loaded with weights_only=True) or .safetensors."""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import EdetError
from ..io import atomic_path, existing_file

_META_KEY = "edet_deploy"  # where our checkpoints keep variant, class count, image size and class names
_LEVEL_FIRST_BN = re.compile(r"^((?:class|box)_net\.bn_rep)\.(\d+)\.(\d+)\.(weight|bias|running_mean|running_var|"
                             r"num_batches_tracked)$")


def read_checkpoint(path: str | os.PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Return (state_dict, metadata) from a .pth or .safetensors file; metadata is {} for foreign files."""
    path = existing_file(path, "weights file")
    meta: Dict[str, Any] = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file
            state = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                raw = (f.metadata() or {}).get(_META_KEY)
            meta = json.loads(raw) if raw else {}
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and isinstance(obj.get(_META_KEY), dict):
                meta = obj[_META_KEY]
            state = _unwrap(obj)
    except EdetError:
        raise
    except Exception as e:  # corrupt file, pickle with code objects, ...
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]  # torch's own is a whole paragraph
        raise EdetError(f"cannot read weights {path}: not a .pth / .safetensors checkpoint we can load "
                        f"({type(e).__name__}: {first})") from None
    return state, meta


def _unwrap(obj: Any) -> Dict[str, torch.Tensor]:
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EdetError("weights file holds no state_dict of tensors")
    return obj


def normalize_keys(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strip DataParallel / bench prefixes and convert effdet's level-first head batch-norm layout."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        m = _LEVEL_FIRST_BN.match(key)
        if m:  # bn_rep.{level}.{repeat}.x  ->  bn_rep.{repeat}.{level}.bn.x
            key = f"{m.group(1)}.{m.group(3)}.{m.group(2)}.bn.{m.group(4)}"
        out[key] = value
    # Drop anchors or other bench buffers that are not part of the network.
    return {k: v for k, v in out.items() if not k.startswith("anchors.")}


_CLASS_BIAS = "class_net.predict.conv_pw.bias"  # num_anchors * num_classes values


def checkpoint_num_classes(state: Dict[str, torch.Tensor], meta: Dict[str, Any], num_anchors: int) -> Optional[int]:
    """The class count a checkpoint was trained for: its metadata's, else what the class head's shape says
    (effdet files carry no metadata)."""
    if meta.get("num_classes"):
        return int(meta["num_classes"])
    bias = normalize_keys(state).get(_CLASS_BIAS)
    if bias is not None and bias.ndim == 1 and bias.shape[0] % num_anchors == 0:
        return bias.shape[0] // num_anchors
    return None


def load_weights(model: nn.Module, path: str | os.PathLike) -> Dict[str, Any]:
    """Load weights into `model` all-or-nothing. Returns the checkpoint's metadata ({} for effdet files)."""
    return load_checkpoint(model, *read_checkpoint(path), path)


def load_checkpoint(model: nn.Module, state: Dict[str, torch.Tensor], meta: Dict[str, Any],
                    path: str | os.PathLike) -> Dict[str, Any]:
    """Load a checkpoint already read from `path` into `model`; returns its metadata.

    Every key and shape is checked before any tensor is copied, so a mismatching file (another variant or
    class count) leaves the model untouched and the error names the first mismatches."""
    state = normalize_keys(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        parts = []
        if wrong:
            parts.append("shape mismatch: " + "; ".join(wrong[:3]))
        if missing:
            parts.append(f"{len(missing)} missing keys, first: {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, first: {', '.join(unexpected[:3])}")
        cfg = getattr(model, "config", None)
        file_classes = checkpoint_num_classes(state, meta, cfg.num_anchors) if cfg is not None else None
        if cfg is not None and not (missing or unexpected) and all(w.startswith("class_net.predict.") for w in wrong) \
                and file_classes and file_classes != cfg.num_classes:
            hint = f" (the file has {file_classes} classes, the model {cfg.num_classes}: pass num_classes={file_classes})"
        else:
            hint = f" (file made for variant {meta['variant']!r}?)" if meta.get("variant") else ""
        raise EdetError(f"weights {path} do not fit model {name}{hint}: " + " | ".join(parts))
    model.load_state_dict(state, strict=True)
    return meta


def save_weights(model: nn.Module, path: str | os.PathLike, extra_meta: Optional[Dict[str, Any]] = None) -> None:
    """Save model weights with the metadata needed to rebuild the model (atomic write)."""
    cfg = getattr(model, "config", None)
    meta: Dict[str, Any] = {}
    if cfg is not None:
        meta = {"variant": cfg.name, "num_classes": cfg.num_classes, "image_size": cfg.image_size}
    meta.update(extra_meta or {})
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Serialised in memory and written by Python: a full disk is then an OSError naming `path` (both libraries'
    # own writers report it as an error of theirs).
    if path.suffix == ".safetensors":
        from safetensors.torch import save
        data = save(state, metadata={_META_KEY: json.dumps(meta)})
    else:
        buffer = io.BytesIO()
        torch.save({"state_dict": state, _META_KEY: meta}, buffer)
        data = buffer.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def checkpoint_metadata(path: str | os.PathLike) -> Dict[str, Any]:
    return read_checkpoint(path)[1]
