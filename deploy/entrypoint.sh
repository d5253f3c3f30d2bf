#!/usr/bin/env bash
# Container entrypoint. `serve` (default): make sure a TensorRT plan for THIS GPU and THIS TensorRT exists
# (a plan is tied to both), build it from the ONNX graph if it is missing or stale, write the GPU Triton
# repository, then exec tritonserver. `prepare`: the same without serving (a Kubernetes init step).
# Anything else runs as given (e.g. Model Analyzer's docker mode starts `tritonserver ...` itself).
#
#   /models/onnx/efficientdet_<m>.onnx (+ .json)   input: graph exported elsewhere (`edet-deploy export
#                                                   --dynamic-batch 8`), mounted read-only
#   /models/engines/efficientdet_<m>.plan (+ .json) built here, reused while it matches
#   /models/repository/                             generated here (configs carry the plan's TensorRT and GPU)
set -euo pipefail

mode="${1:-serve}"
if [[ "$mode" != "serve" && "$mode" != "prepare" ]]; then
    exec "$@"
fi
shift || true

py="${EDET_PYTHON:-python3}"
edet="${EDET_DEPLOY:-edet-deploy}"
models="${EDET_MODELS_DIR:-/models}"
model="${EDET_MODEL:-d0}"
name="efficientdet_${model}"
onnx="${EDET_ONNX:-$models/onnx/$name.onnx}"
plan="${EDET_PLAN:-$models/engines/$name.plan}"
repo="${EDET_REPO:-$models/repository}"
max_batch="${EDET_MAX_BATCH:-8}"
opt_batch="${EDET_OPT_BATCH:-4}"
check_args=()
[[ -n "${EDET_TENSORRT_VERSION:-}" ]] && check_args+=(--tensorrt-version "$EDET_TENSORRT_VERSION")
[[ -n "${EDET_COMPUTE_CAPABILITY:-}" ]] && check_args+=(--compute-capability "$EDET_COMPUTE_CAPABILITY")

if [[ "${EDET_SKIP_IMAGE_CHECK:-0}" != "1" ]]; then
    # The Python TensorRT that builds the plan must be the libnvinfer Triton loads it with.
    "$py" -m edet_deploy.trt.compat check-image
fi

if ! reason="$("$py" -m edet_deploy.trt.compat check-plan "$plan" "${check_args[@]}")"; then
    echo "edet-entrypoint: building the engine: $reason" >&2
    if [[ ! -f "$onnx" ]]; then
        echo "edet-entrypoint: no ONNX graph at $onnx (export it with \`edet-deploy export --model $model" \
             "--dynamic-batch $max_batch\` and mount it there)" >&2
        exit 2
    fi
    mkdir -p "$(dirname "$plan")"
    "$edet" build "$onnx" --out "$plan" --batch "1:$opt_batch:$max_batch"
fi

tensorrt_args=()
[[ -n "${EDET_TENSORRT_VERSION:-}" ]] && tensorrt_args+=(--tensorrt-version "$EDET_TENSORRT_VERSION")
"$edet" triton-repo --model "$model" --target gpu --engine "$plan" --max-batch "$max_batch" --out "$repo" \
    "${tensorrt_args[@]}"

if [[ "$mode" == "prepare" ]]; then
    exit 0
fi
exec "${EDET_TRITONSERVER:-tritonserver}" --model-repository="$repo" --strict-readiness=true \
    --allow-metrics=true --allow-gpu-metrics=true --metrics-port=8002 "$@"
