"""The configs of a repository: `<name>` ensemble = `<name>_preprocess` (Python) -> `<name>_engine` (TensorRT
plan on GPU; on CPU a Python model running the ONNX graph in OpenVINO or ONNX Runtime) -> `<name>_postprocess`
(Python). Built as Triton `ModelConfig` protobufs (tritonclient ships the schema) and written as text, so they
always parse."""
from __future__ import annotations

import json
from typing import Dict, List

from .. import contract
from .spec import RepoSpec
from .verify import CONFIG_HEADER, model_config_pb2

# The engine's dynamic-batching window by target. CPU: none. The engine runs a D0 image in 20+ ms, so under load
# requests queue behind it and batch without waiting (benchmarks/triton_load.py measured the same mean batch at
# 0 us as at 1-4 ms), while a window is paid in full by every lone request (2 ms of a ~25 ms pipeline at
# concurrency 1, benchmarks/triton_engines.py). GPU: 2 ms, since a TensorRT engine finishes in a few ms and idles
# between requests, so staggered clients only meet in one batch if the scheduler waits (unmeasured on a
# GPU). No preferred_batch_size: with 1 "preferred", the scheduler never waits (Triton's docs advise leaving it
# unset for most models).
ENGINE_QUEUE_DELAY_US = {"cpu": 0, "gpu": 2000}
# Overload: Triton queues every request, so when requests arrive faster than the engine runs them the queue and
# the latency grow without bound and clients time out after the work was spent. The bound is not Triton's queue
# policy (default_queue_policy: max_queue_size, timeouts), which the generated engine carried until it was
# measured: with any queue policy, Triton 2.51's dynamic batcher now and then sleeps its 500 ms idle wait
# (default_wait_microseconds in DynamicBatchScheduler::BatcherThread) while requests wait and the instance is
# free: 3-13 of 740 requests waited ~510 ms in the engine's queue (Triton's trace), 0 of 740 without a policy
# (twice), whichever part of the policy was set; docs/serving.md. serve's fronts bound the work instead, over both
# protocols: at most MAX_IN_FLIGHT inference requests in flight (`serve --max-in-flight`); one more is refused at
# once with 503 / UNAVAILABLE, which a client retries. 256 by default: a burst of 200 requests (issue #24's
# memory test: 6000x4000 JPEGs) is answered whole, and at the bundled D0's ~60 img/s on 2 CPU cores the last
# admitted request waits ~4 s, the old policy's 5 s backstop. A tighter bound answers sooner under overload and
# refuses more (24: ~0.5 s); benchmarks/triton_overload.py measures both on CPU.
MAX_IN_FLIGHT = 256
# The ensemble declares no batching (max_batch_size 0) and names the batch as the first dim of its tensors
# (IMAGE [-1, 1], outputs [-1, ...]): Triton 2.51's gRPC keeps 32 bits of a batching ensemble's batch
# dimension, so a forged [0, 1], [2^32, 1] or [2^62, 1] with one image became batch 0, each member received a
# consistent [1, 1] and the answer was OK without the batch dimension. Without batching, Triton counts the
# elements against the full shape and refuses those requests itself (INVALID_ARGUMENT). The members keep their
# max_batch_size and dynamic batching (the batching happens there); the batch bound of a request to the ensemble
# is theirs (verify.batch_bound): serve's fronts enforce it (400 / INVALID_ARGUMENT), and behind them the
# preprocess member ("batch-size must be <= 8"). The ensemble's metadata is what it was (IMAGE [-1, 1]).
ENSEMBLE_MAX_BATCH_SIZE = 0


def _tensor(pb, name: str, dtype: str, dims: List[int]):
    return pb.ModelInput(name=name, data_type=getattr(pb, f"TYPE_{dtype}"), dims=dims)


def _output(pb, name: str, dtype: str, dims: List[int]):
    return pb.ModelOutput(name=name, data_type=getattr(pb, f"TYPE_{dtype}"), dims=dims)


def _det_outputs(pb, k: int, rename=lambda name: name, make=_output) -> list:
    # Triton dims leave out the batch dimension (max_batch_size > 0).
    return [make(pb, rename(s.name), s.triton_type, list(s.shape(0, k))[1:]) for s in contract.OUTPUT_SPECS]


def _image_input(pb, input_format: str, batch_first: bool = False):
    """The image input; `batch_first`: with the batch as an explicit leading dim (a non-batching ensemble)."""
    batch = [-1] if batch_first else []
    if input_format == "encoded":
        return _tensor(pb, contract.IMAGE, "STRING", [*batch, 1])
    return _tensor(pb, contract.IMAGE, "UINT8", [*batch, -1, -1, 3])


def build_configs(spec: RepoSpec) -> Dict[str, object]:
    """The ModelConfig protobufs of a repository, by model name: per input format a preprocess model and an
    ensemble, one engine and one postprocess shared by all."""
    pb = model_config_pb2()
    s, k, mb = spec.image_size, spec.max_detections, spec.max_batch_size
    names = {"engine": contract.engine_name(spec.name), "post": contract.postprocess_name(spec.name)}
    queue_delay_us = ENGINE_QUEUE_DELAY_US[spec.target] if spec.queue_delay_us is None else spec.queue_delay_us

    def params(d: Dict[str, str]) -> Dict[str, object]:
        return {key: pb.ModelParameter(string_value=str(v)) for key, v in d.items()}

    cpu = pb.ModelInstanceGroup.KIND_CPU
    gpu = pb.ModelInstanceGroup.KIND_GPU

    def preprocess(input_format: str):
        return pb.ModelConfig(
            name=spec.preprocess_name(input_format), backend="python", max_batch_size=mb,
            input=[_image_input(pb, input_format)],
            output=[_output(pb, contract.INPUT_NAME, "UINT8", [s, s, 3]), _output(pb, contract.SCALE, "FP32", [1]),
                    _output(pb, contract.ORIG_SIZE, "INT32", [2])],
            instance_group=[pb.ModelInstanceGroup(count=spec.preprocess_instances, kind=cpu)],
            # No dynamic batching: Triton checks a BYTES input while it gathers a batch, so one malformed
            # request (a string length past its data) failed every request batched with it. Alone, each
            # request fails or succeeds by itself; decoding is per image anyway, in parallel instances.
            parameters=params({"image_size": s, "input_format": input_format,
                               contract.FILL_PARAMETER: json.dumps([float(v) for v in spec.fill])}))
    warmup = pb.ModelWarmup(name="zeros", batch_size=1, inputs={contract.INPUT_NAME: pb.ModelWarmup.Input(
        data_type=pb.TYPE_UINT8, dims=[s, s, 3], zero_data=True)})
    engine = pb.ModelConfig(
        name=names["engine"], max_batch_size=mb, input=[_tensor(pb, contract.INPUT_NAME, "UINT8", [s, s, 3])],
        output=_det_outputs(pb, k),
        dynamic_batching=pb.ModelDynamicBatching(max_queue_delay_microseconds=queue_delay_us,
                                                 preferred_batch_size=[b for b in spec.preferred_batch_sizes
                                                                       if b <= mb]),
        model_warmup=[warmup])
    if spec.target == "gpu":
        engine.platform = "tensorrt_plan"
        engine.default_model_filename = "model.plan"
        engine.instance_group.append(pb.ModelInstanceGroup(count=spec.engine_instances, kind=gpu))
        if spec.cuda_graphs:
            engine.optimization.cuda.graphs = True
        # What the plan was built with, readable from the server (`GET /v2/models/<engine>/config`).
        for key, value in params({k: v for k, v in spec.plan.items() if v}).items():
            engine.parameters[key].CopyFrom(value)
    else:
        engine.backend = "python"
        engine.instance_group.append(pb.ModelInstanceGroup(count=spec.engine_instances, kind=cpu))
        for key, value in params({"onnx_file": "model.onnx", "precision": spec.precision,
                                  "engine_backend": spec.engine_backend}).items():
            engine.parameters[key].CopyFrom(value)
    post_out = _det_outputs(pb, k)
    if spec.class_names:
        post_out.append(_output(pb, contract.DETECTION_LABELS, "STRING", [k]))
    post = pb.ModelConfig(
        name=names["post"], backend="python", max_batch_size=mb,
        input=[*_det_outputs(pb, k, contract.raw_output_name, _tensor),
               _tensor(pb, contract.SCALE, "FP32", [1]), _tensor(pb, contract.ORIG_SIZE, "INT32", [2])],
        output=post_out, instance_group=[pb.ModelInstanceGroup(count=spec.postprocess_instances, kind=cpu)],
        dynamic_batching=pb.ModelDynamicBatching(max_queue_delay_microseconds=spec.stage_queue_delay_us),
        parameters=params({contract.CLASS_NAMES_PARAMETER: json.dumps(spec.class_names)}))

    Step = pb.ModelEnsembling.Step
    configs: Dict[str, object] = {}
    for input_format in spec.input_formats:
        pre = preprocess(input_format)
        steps = [
            Step(model_name=pre.name, model_version=-1, input_map={contract.IMAGE: contract.IMAGE},
                 output_map={contract.INPUT_NAME: "preprocessed_images", contract.SCALE: contract.SCALE,
                             contract.ORIG_SIZE: contract.ORIG_SIZE}),
            Step(model_name=names["engine"], model_version=-1, input_map={contract.INPUT_NAME: "preprocessed_images"},
                 output_map={o: contract.raw_output_name(o) for o in contract.OUTPUTS}),
            Step(model_name=names["post"], model_version=-1,
                 input_map={**{raw: raw for raw in map(contract.raw_output_name, contract.OUTPUTS)},
                            contract.SCALE: contract.SCALE, contract.ORIG_SIZE: contract.ORIG_SIZE},
                 output_map={o.name: o.name for o in post_out}),
        ]
        name = spec.ensemble_name(input_format)
        # No batching declared, the batch named first (see ENSEMBLE_MAX_BATCH_SIZE); the members batch.
        configs[name] = pb.ModelConfig(name=name, platform="ensemble", max_batch_size=ENSEMBLE_MAX_BATCH_SIZE,
                                       input=[_image_input(pb, input_format, batch_first=True)],
                                       output=[_output(pb, o.name, pb.DataType.Name(o.data_type)[5:],
                                                       [-1, *o.dims]) for o in post_out],
                                       ensemble_scheduling=pb.ModelEnsembling(step=steps),
                                       parameters=post.parameters)
        configs[pre.name] = pre
    configs[names["engine"]] = engine
    configs[names["post"]] = post
    return configs


def config_text(config) -> str:
    """A ModelConfig as the config.pbtxt the generator writes (its header marks it as ours)."""
    from google.protobuf import text_format
    return CONFIG_HEADER + text_format.MessageToString(config)
