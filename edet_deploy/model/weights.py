"""Loading and saving weights: our checkpoints and effdet (rwightman/efficientdet-pytorch) checkpoints,
from .pth (loaded with weights_only=True) or .safetensors."""
from __future__ import annotations

import io
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import EdetError
from ..io import atomic_path, existing_file
from ..log import logger

_META_KEY = "edet_deploy"  # where our checkpoints keep variant, class count, image size and class names
_LEVEL_FIRST_BN = re.compile(r"^((?:class|box)_net\.bn_rep)\.(\d+)\.(\d+)\.(weight|bias|running_mean|running_var|"
                             r"num_batches_tracked)$")


def read_checkpoint(path: str | os.PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Return (state_dict, metadata) from a .pth or .safetensors file; metadata is {} for foreign files.

    Accepts what effdet's / timm's `load_checkpoint` accepts: a bare state_dict, or one wrapped as
    {"state_dict_ema" | "model_ema" | "state_dict" | "model": ...} (EMA weights first, as timm's `use_ema=True`,
    and saying so), timm training checkpoints (their `args` is an argparse.Namespace), "module." / "_orig_mod." /
    "model." key prefixes. Pickled objects other than tensors are never loaded (weights_only)."""
    path = existing_file(path, "weights file")
    meta: Dict[str, Any] = {}
    try:
        size = path.stat().st_size
    except OSError as e:
        raise EdetError(f"cannot read weights {path}: {e.strerror}") from None
    if size == 0:
        raise EdetError(f"cannot read weights {path}: not a .pth / .safetensors checkpoint we can load "
                        f"(empty file, 0 bytes)")
    try:
        if _is_safetensors(path):
            from safetensors import safe_open
            from safetensors.torch import load_file
            state = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                raw = (f.metadata() or {}).get(_META_KEY)
            meta = json.loads(raw) if raw else {}
            if not isinstance(meta, dict):
                raise EdetError(f"weights {path}: its {_META_KEY!r} metadata is not a JSON object")
        else:
            obj = _torch_load(path)
            if isinstance(obj, dict) and isinstance(obj.get(_META_KEY), dict):
                meta = obj[_META_KEY]
            state = _unwrap(obj, path)
    except EdetError:
        raise
    except Exception as e:  # corrupt file, pickle with code objects, ...
        raise EdetError(f"cannot read weights {path}: not a .pth / .safetensors checkpoint we can load "
                        f"({type(e).__name__}: {_why_unreadable(path, e)})") from None
    return state, meta


def _is_safetensors(path: Path) -> bool:
    """By suffix, or by content (an 8-byte header length, then the JSON header): a safetensors file saved as
    .pth / .bin is read as what it is."""
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only, plus argparse.Namespace (the `args` of timm / effdet training checkpoints,
    which timm's own loader allows too); torch's TorchScript warning stays off stderr (we refuse the file)."""
    import argparse
    import warnings

    with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
        warnings.simplefilter("ignore")
        return torch.load(str(path), map_location="cpu", weights_only=True)


def _why_unreadable(path: Path, e: Exception) -> str:
    """torch's and safetensors' errors are paragraphs about weights_only: what the file is instead, and what to
    do, in a few words."""
    text = str(e)
    if "TorchScript" in text or "torchscript" in text:
        return ("a TorchScript archive (torch.jit.save), not a checkpoint: save the state_dict of the model it "
                "was scripted from, torch.save(model.state_dict(), 'model.pth')")
    if isinstance(e, EOFError) or "central directory" in text or "incomplete metadata" in text \
            or "file not fully covered" in text or "unexpected EOF" in text:
        return "truncated or corrupt: copy or download it again"
    try:
        unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - not a torch.save zip at all
        unsafe = None
    if unsafe:
        shown = ", ".join(unsafe[:3]) + (" ..." if len(unsafe) > 3 else "")
        models = ([g for g in unsafe if g.endswith(("EfficientDet", "DetBenchTrain", "DetBenchPredict"))]
                  or [g for g in unsafe if g.startswith("torch.nn.modules.")])
        if models:
            return (f"a pickled model object ({models[0]}), not a state_dict; unpickling it would run code from "
                    f"the file: re-save it as torch.save(model.state_dict(), 'model.pth')")
        return (f"it pickles Python objects ({shown}) that are not loaded, since unpickling them could run code "
                f"from the file: save the state_dict alone, torch.save(model.state_dict(), 'model.pth')")
    if isinstance(e, pickle.UnpicklingError):
        return "not written by torch.save (a plain pickle or another format)"
    return (text.strip().splitlines() or [""])[0].split(". ")[0][:160]  # torch's own is a whole paragraph


_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")  # timm's load_state_dict order
_EMA_KEYS = ("state_dict_ema", "model_ema")
_announced: set = set()


def _unwrap(obj: Any, path: Path | str = "") -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict) and obj[key]:
                if key in _EMA_KEYS and (str(path), key) not in _announced:
                    _announced.add((str(path), key))
                    logger.info("%s: using its EMA weights (%r), as effdet / timm do", path, key)
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        if isinstance(obj, dict):
            keys = [str(k) for k in obj][:5]
            what = f"a dict with keys {', '.join(keys) or '(none)'}{' ...' if len(obj) > 5 else ''}"
        else:
            what = f"a {type(obj).__name__}"
        raise EdetError(f"weights file {path} holds no state_dict of tensors ({what}; expected a state_dict, or "
                        f"one under {' / '.join(_WRAPPER_KEYS)})")
    return obj


_PREFIXES = ("module.", "_orig_mod.", "model.")  # DataParallel, torch.compile, effdet's DetBench


def normalize_keys(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strip DataParallel / bench prefixes and convert effdet's level-first head batch-norm layout."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:  # DataParallel, torch.compile and effdet's DetBench wrappers, in any order
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
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


def load_weights(model: nn.Module, path: str | os.PathLike, new_class_head: bool = False) -> Dict[str, Any]:
    """Load weights into `model` all-or-nothing. Returns the checkpoint's metadata ({} for effdet files).
    `new_class_head`: see `load_checkpoint`."""
    return load_checkpoint(model, *read_checkpoint(path), path, new_class_head=new_class_head)


def load_checkpoint(model: nn.Module, state: Dict[str, torch.Tensor], meta: Dict[str, Any],
                    path: str | os.PathLike, new_class_head: bool = False) -> Dict[str, Any]:
    """Load a checkpoint already read from `path` into `model`; returns its metadata.

    Every key and shape is checked before any tensor is copied, so a mismatching file (another variant or
    class count) leaves the model untouched and the error names the first mismatches. `new_class_head`
    (fine-tuning, as effdet's `reset_head`): a file whose only difference is its class count loads all but
    the last class layer, which keeps the model's fresh initialisation (logged)."""
    state = normalize_keys(state)
    expected = model.state_dict()
    if new_class_head:
        head = [k for k in expected if k.startswith("class_net.predict.conv_pw.")]
        if head and all(k in state for k in head) and any(state[k].shape != expected[k].shape for k in head):
            logger.info("%s: its class head (%s outputs) does not fit %s classes: loading the rest, the class "
                        "head starts fresh", path, state[head[-1]].shape[0],
                        getattr(getattr(model, "config", None), "num_classes", "the model's"))
            state = {**state, **{k: expected[k] for k in head}}
    # BatchNorm's num_batches_tracked is not a weight: files written without it (older PyTorch, TF ports) load,
    # as torch's own load_state_dict lets them, keeping the model's counters.
    state.update({k: v for k, v in expected.items() if k.endswith(".num_batches_tracked") and k not in state})
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
        looks_like = guess_variants(state)
        if cfg is not None and not (missing or unexpected) and all(w.startswith("class_net.predict.") for w in wrong) \
                and file_classes and file_classes != cfg.num_classes:
            hint = (f" (the file has {file_classes} classes, the model {cfg.num_classes}: pass num_classes="
                    f"{file_classes}, or --num-classes {file_classes})")
        elif meta.get("variant"):
            hint = f" (file made for variant {meta['variant']!r}?)"
        elif cfg is not None and looks_like and cfg.name not in looks_like:
            hint = f" (the file looks like a {' or '.join(looks_like)} checkpoint: --model {looks_like[0]})"
        else:
            hint = ""
        raise EdetError(f"weights {path} do not fit model {name}{hint}: " + " | ".join(parts))
    model.load_state_dict(state, strict=True)
    return meta


def guess_variants(state: Dict[str, torch.Tensor]) -> list:
    """The variants whose architecture a (normalised) state_dict has, by BiFPN width and depth, head depth,
    pyramid levels and backbone family (Lite backbones have no squeeze-excite); [] when none fits. D6 and D7
    differ only in input size and anchors, so a D6/D7 file gives both."""
    from ..configs import VARIANTS

    dw = state.get("class_net.predict.conv_dw.weight")
    if dw is None or dw.ndim != 4:
        return []
    cells = {int(m.group(1)) for k in state for m in [re.match(r"fpn\.cell\.(\d+)\.", k)] if m}
    heads = {int(m.group(1)) for k in state for m in [re.match(r"class_net\.conv_rep\.(\d+)\.", k)] if m}
    levels = {int(m.group(1)) for k in state for m in [re.match(r"class_net\.bn_rep\.0\.(\d+)\.", k)] if m}
    lite = not any(k.startswith("backbone.") and ".se." in k for k in state)
    return [c.name for c in VARIANTS.values()
            if (c.fpn_channels, c.fpn_repeats, c.head_repeats, c.num_levels, c.name.startswith("lite"))
            == (dw.shape[0], len(cells), len(heads), len(levels), lite)]


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
