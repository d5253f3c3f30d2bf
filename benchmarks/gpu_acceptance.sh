#!/usr/bin/env bash
# GPU acceptance in one command, on a fresh machine with an NVIDIA GPU, its driver and the package registries:
#   bash benchmarks/gpu_acceptance.sh [--dry-run] [VARIANT ...]      (default: d0)
# Installs .[gpu] (TensorRT 11, cuda-python) into .venv, prints driver / CUDA / TensorRT / torch / Triton
# versions, then runs benchmarks/gpu_acceptance.py: FP32 / FP16 / INT8 engines with their build logs, the
# soft-NMS layer checked to be the AOT plugin (engine inspector, plan contents, a process that never
# registers the plugin, trtexec when present), detections matched with ONNX Runtime (INT8 by mAP), batch
# 1..8, the CUDA-graph path with alternating batch sizes, compute-sanitizer memcheck when present, GPU-only
# and end-to-end latency. Summary: build/gpu_acceptance/summary.{json,md}. --dry-run prints every step.
set -euo pipefail
DRY=0
ARGS=()
for a in "$@"; do
  case "$a" in
    -h|--help)
      echo "usage: bash benchmarks/gpu_acceptance.sh [--dry-run] [VARIANT ...]   (default: d0; results in build/gpu_acceptance)"
      echo "  --dry-run   print every step (install, versions, builds, checks) without running any"
      exit 0 ;;
    --dry-run) DRY=1 ;;
    *) ARGS+=("$a") ;;
  esac
done
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PY=.venv/bin/python

run() {  # print, then run unless --dry-run
  echo "+ $*"
  if [[ $DRY == 0 ]]; then "$@"; fi
}

echo "== 1/3 install: .venv with edet-deploy[gpu,dev] (TensorRT 11, cuda-python, ONNX Runtime, pycocotools)"
if [[ ! -x $PY ]]; then run "$PYTHON" -m venv .venv; fi
run "$PY" -m pip install -q --upgrade pip
run "$PY" -m pip install -q -e '.[gpu,dev]'

echo "== 2/3 versions"
if [[ $DRY == 0 ]]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not found"
  "$PY" - <<'EOF'
import importlib
for name in ("tensorrt", "torch", "triton", "onnxruntime", "cuda.bindings"):
    try:
        m = importlib.import_module(name)
        print(f"{name}: {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001 - report and go on; the acceptance run names what is missing
        print(f"{name}: not importable ({type(e).__name__}: {e})")
import torch
print(f"CUDA (torch): {torch.version.cuda}; GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
EOF
  command -v trtexec >/dev/null && echo "trtexec: $(command -v trtexec)" || echo "trtexec: not on PATH (that step uses a plugin-free Python process instead)"
  command -v compute-sanitizer >/dev/null && echo "compute-sanitizer: $(command -v compute-sanitizer)" || echo "compute-sanitizer: not on PATH (memcheck step skipped)"
else
  echo "+ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader"
  echo "+ $PY -c 'import tensorrt, torch, triton, onnxruntime; print versions; torch.version.cuda'"
  echo "+ command -v trtexec; command -v compute-sanitizer"
fi

echo "== 3/3 acceptance"
if [[ $DRY == 1 ]]; then
  PYRUN=$PY; [[ -x $PYRUN ]] || PYRUN=$PYTHON
  exec "$PYRUN" benchmarks/gpu_acceptance.py --dry-run "${ARGS[@]:-d0}"
fi
exec "$PY" benchmarks/gpu_acceptance.py "${ARGS[@]:-d0}"
