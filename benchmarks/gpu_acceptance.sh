#!/usr/bin/env bash
# GPU acceptance in one command, on a machine with an NVIDIA GPU and TensorRT 11:
#   bash benchmarks/gpu_acceptance.sh [d0 d1 ...]
# For each variant: export (d0 uses the bundled shapes model), FP16 and INT8 (calibrated) twins, build the three
# engines, check detections against ONNX Runtime FP32 (same kept classes, box IoU > 0.98 on the top detections),
# and print batch-1 / batch-8 latency percentiles. d0 finishes in well under 10 minutes.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  echo "usage: bash benchmarks/gpu_acceptance.sh [VARIANT ...]   (default: d0; results in build/gpu_acceptance)"
  exit 0
fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
exec "$PY" benchmarks/gpu_acceptance.py "${@:-d0}"
