#!/usr/bin/env bash
# Container entrypoint: one mechanism for GPU and CPU serving, `edet-deploy serve` (HTTP and gRPC fronts with
# request guards, truthful per-member health and a bound on inference requests in flight ($EDET_MAX_IN_FLIGHT,
# default 256), supervisor that repairs dead and hung stubs, restricted admin APIs whose key only it
# holds, bounded drain on SIGTERM) running this image's tritonserver ($EDET_TRITONSERVER).
#
#   serve (default)  prepare, then exec `edet-deploy serve` on the repository
#   prepare          write the repository (building the engine if the cache lacks it) and exit: an init step
#   anything else    runs as given (e.g. Model Analyzer's docker mode starts `tritonserver ...` itself)
#
# EDET_TARGET=gpu (default): the engine is a TensorRT plan, tied to the TensorRT version and the GPU that built
# it, cached under $EDET_ENGINE_CACHE/<key>/ with key = TensorRT version + compute capability + the graph's
# checksum, so pods on the same GPU kind share one build (a shared volume; a lock file serializes builders;
# the TensorRT timing cache per TensorRT + GPU makes rebuilds of other graphs faster).
# EDET_TARGET=cpu: the ONNX graph runs in the Python engine model (OpenVINO / ONNX Runtime): staging, any node.
#
#   /models/onnx/efficientdet_<m>.onnx (+ .json)   input: `edet-deploy export --dynamic-batch 8`, read-only
#   $EDET_ENGINE_CACHE (default /models/engines)   plans + timing caches, shared by pods
#   $EDET_REPO (default /models/repository)        generated at every start (an emptyDir in Kubernetes)
set -euo pipefail

mode="${1:-serve}"
if [[ "$mode" != "serve" && "$mode" != "prepare" ]]; then
    exec "$@"
fi
shift || true

py="${EDET_PYTHON:-python3}"
edet="${EDET_DEPLOY:-edet-deploy}"
target="${EDET_TARGET:-gpu}"
models="${EDET_MODELS_DIR:-/models}"
model="${EDET_MODEL:-d0}"
name="efficientdet_${model}"
onnx="${EDET_ONNX:-$models/onnx/$name.onnx}"
cache="${EDET_ENGINE_CACHE:-$models/engines}"
repo="${EDET_REPO:-$models/repository}"
max_batch="${EDET_MAX_BATCH:-8}"
opt_batch="${EDET_OPT_BATCH:-4}"

say() { echo "edet-entrypoint: $*" >&2; }

need_graph() {
    if [[ ! -f "$onnx" ]]; then
        say "no ONNX graph at $onnx (export it with \`edet-deploy export --model $model" \
            "--dynamic-batch $max_batch\` and mount it there)"
        exit 2
    fi
}

prepare_gpu() {
    if [[ "${EDET_SKIP_IMAGE_CHECK:-0}" != "1" ]]; then
        # The Python TensorRT that builds the plan must be the libnvinfer Triton loads it with (one line if not).
        "$py" -m edet_deploy.trt.compat check-image
    fi
    local trt cc sum key plan reason
    trt="${EDET_TENSORRT_VERSION:-$("$py" -c 'from edet_deploy.trt.compat import installed_tensorrt_version as v
print(v() or "")')}"
    cc="${EDET_COMPUTE_CAPABILITY:-$("$py" -c 'import sys
from edet_deploy.errors import EdetError
from edet_deploy.trt.compat import gpu_properties
try:
    print(gpu_properties()[1])
except EdetError as e:
    sys.exit(f"edet-entrypoint: {e}")')}"
    if [[ -z "$trt" ]]; then
        say "no TensorRT Python bindings in this image: cannot build or check a plan"
        exit 1
    fi
    need_graph
    sum="$(sha256sum "$onnx" | cut -c1-16)"
    key="trt${trt}-sm${cc/./}-${sum}"
    plan="${EDET_PLAN:-$cache/$key/$name.plan}"
    mkdir -p "$(dirname "$plan")"
    {
        # One builder per key at a time (pods starting together on a shared volume); the others wait here and
        # then find the plan current.
        flock 9
        if ! reason="$("$py" -m edet_deploy.trt.compat check-plan "$plan" --tensorrt-version "$trt" \
                --compute-capability "$cc")"; then
            say "building the engine ($key): $reason"
            "$edet" build "$onnx" --out "$plan" --batch "1:$opt_batch:$max_batch" \
                --timing-cache "$cache/timing-trt${trt}-sm${cc/./}.cache"
        else
            say "engine cache hit: $plan"
        fi
    } 9>"$plan.lock"
    "$edet" triton-repo --model "$model" --target gpu --engine "$plan" --max-batch "$max_batch" --out "$repo" \
        --tensorrt-version "$trt"
}

prepare_cpu() {
    need_graph
    "$edet" triton-repo --model "$model" --target cpu --onnx "$onnx" --max-batch "$max_batch" --out "$repo"
}

case "$target" in
    gpu) prepare_gpu ;;
    cpu) prepare_cpu ;;
    *) say "EDET_TARGET must be gpu or cpu, got '$target'"; exit 2 ;;
esac

if [[ "$mode" == "prepare" ]]; then
    exit 0
fi
# The drain bound: Kubernetes' terminationGracePeriodSeconds must cover preStop + twice this (the front's
# drain, then tritonserver's own exit timeout for gRPC requests) + a margin (deploy/k8s, tested).
exec "$edet" serve --repo "$repo" --address "${EDET_ADDRESS:-0.0.0.0}" --http-port "${EDET_HTTP_PORT:-8000}" \
    --grpc-port "${EDET_GRPC_PORT:-8001}" --metrics-port "${EDET_METRICS_PORT:-8002}" \
    --grace-period "${EDET_GRACE_PERIOD:-30}" ${EDET_MAX_IN_FLIGHT:+--max-in-flight "$EDET_MAX_IN_FLIGHT"} "$@"
