"""Generate a Triton model repository: the configs (`configs`), a `model.py` shim per Python model, the engine's
graph or plan with its metadata, and the tuning tools' inputs (`tuning`), from one checked `RepoSpec` (`spec`);
the result is re-read and cross-checked (`verify.validate_repository`) and signed (`verify.write_manifest`)."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

from .. import contract
from ..errors import EdetError
from ..io import staged_directory
from .configs import build_configs, config_text
from .models import SHIM
from .spec import RepoSpec
from .tuning import write_tuning_files
from .verify import validate_repository, write_manifest


def generate_repository(out: str | Path, *, tuning_images: Optional[Sequence[bytes]] = None,
                        **request: Any) -> Path:
    """Write the repository `RepoSpec.validate(out, **request)` describes; nothing is written unless every
    check passes. CPU targets need the ONNX graph (`onnx`, exported with a dynamic batch up to
    `max_batch_size`) and run it in `engine_backend` (default: the CPU default backend); GPU targets the
    TensorRT plan (`engine`), built by the TensorRT of the server that will load it: `tensorrt_version` (that of
    the target Triton image), else the installed one. `copy_artifact=False` writes configs and shims only.
    Beside the models: perf_analyzer input data per ensemble (from `tuning_images`, encoded images; default:
    generated scenes) and a Model Analyzer config. The artifact is verified (loads, matches its sidecar); an
    `out` holding models or files edet-deploy did not generate is refused unless `force`. `variant` and
    `precision` default to the artifact's (its metadata JSON); stated ones must agree with it."""
    from ..artifacts import inline_external_data
    from ..io import sha256_file
    from ..metadata import CHECKSUM_KEYS, ArtifactMetadata, write_metadata

    spec = RepoSpec.validate(out, **request)
    out = Path(out)
    configs = build_configs(spec)
    modules = {spec.preprocess_name(f): "preprocess" for f in spec.input_formats}
    modules[contract.postprocess_name(spec.name)] = "postprocess"
    if spec.target == "cpu":
        modules[contract.engine_name(spec.name)] = f"engine_{spec.engine_backend}"
    # Built whole in a staging directory and checked there, then moved into place: a failure, a full disk or
    # Ctrl-C leaves `out` as it was (a repository regenerated over leaves its earlier models intact).
    # Signed last, in the stage, under the commit's lock: the manifest moves in with the models (an interruption
    # cannot leave them unsigned) and covers the earlier models of `out` that stay, even while another
    # triton-repo commits into it; `serve` checks it at start and every reload.
    with staged_directory(out, last=lambda stage, kept: write_manifest(stage, kept_from=kept)) as stage:
        for name, config in configs.items():
            version = stage / name / "1"
            version.mkdir(parents=True)
            (stage / name / "config.pbtxt").write_text(config_text(config))
            if name in modules:
                (version / "model.py").write_text(SHIM.format(module=modules[name]))
        if spec.artifact is not None:
            artifact = "model.plan" if spec.target == "gpu" else "model.onnx"
            dst = stage / contract.engine_name(spec.name) / "1" / artifact
            key = CHECKSUM_KEYS[dst.suffix]
            typed = ArtifactMetadata.from_dict(spec.artifact_metadata)
            if spec.artifact_external_data:
                # A graph with its weights in a side file: the repository's model.onnx is the one file Triton's
                # engine model loads, so it gets the weights inline (its checksum is the copy's own).
                dst.write_bytes(inline_external_data(spec.artifact))
                checksum = sha256_file(dst)
            else:
                checksum = getattr(typed, key) or sha256_file(spec.artifact)
                shutil.copyfile(spec.artifact, dst)
                if sha256_file(dst) != checksum:
                    raise EdetError(f"{spec.artifact} changed while it was copied")
            write_metadata(dst, replace(typed, **{key: checksum}))  # the copy is verified when served
        write_tuning_files(stage, spec, tuning_images, name=out.name)
        validate_repository(stage)
    return out


def generate_repository_from_model(out: str | Path, *, model: Optional[str] = None, weights: Optional[str] = None,
                                   onnx: Optional[str] = None, target: str = "cpu", max_batch_size: int = 8,
                                   progress: bool = False, **kwargs: Any) -> Path:
    """`generate_repository` for `edet-deploy triton-repo`: a CPU target without a graph first exports `model`
    (default d0, with `weights`) into a hidden temporary folder, which goes away since the repository keeps its
    own copy. With a graph or plan, `model` None means the artifact's."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edet-triton-export-") as tmp:
        if target == "cpu" and not onnx:
            if max_batch_size < 1:
                raise EdetError("--max-batch must be >= 1")
            from ..export import export_onnx
            onnx = str(export_onnx(model or "d0", tmp, weights=weights, dynamic_batch=max_batch_size,
                                   progress=progress).onnx_path)
        return generate_repository(out, variant=model, onnx=onnx, target=target, max_batch_size=max_batch_size,
                                   **kwargs)
