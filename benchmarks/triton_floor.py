"""What serving through Triton costs beyond the work, at concurrency 1 (issue #29's ensemble-vs-in-process bar).
One server, one run, the sides timed in alternating blocks (the shared CPU drifts by up to 30% between blocks):

  in-process   the in-process pipeline (decode + letterbox + graph + soft-NMS + mapping), as `detect` runs it
  ensemble     the generated ensemble: preprocess -> engine -> postprocess, three Python-backend models
  fused        the same three stages in ONE Python model (this file's FusedModel): the ensemble without its two
               inner hops, the least a Triton layout of Python models can cost
  wait model   a Python model that only spins for the in-process p50 and returns canned detections (WaitModel),
  local wait   beside the same spin in this process: the floor of any Triton model at this latency

If `wait model / local wait` is above a ratio bar, no layout of Python-backend models can meet it on this machine.
Then the ensemble and the fused model under closed-loop load (`--concurrency`, twice, in opposite orders), to
see what the fused layout costs in throughput. The two models here are benchmark instruments, not served by
edet-deploy.

    python benchmarks/triton_floor.py [--engine-backend openvino] [--precision bf16|fp32] [--calls 120]
                                      [--protocol grpc|http]
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's edet_deploy, also in the stubs

# A model.py importing one of this file's models inside Triton's stub (which ignores PYTHONPATH: serve's
# environment paths come in EDET_DEPLOY_SYS_PATH, as for the generated shims).
SHIM = f'''import os, sys
sys.path[:0] = [p for p in os.environ.get("EDET_DEPLOY_SYS_PATH", "").split(os.pathsep) if p] + [{str(Path(__file__).parent)!r}]
from triton_floor import {{cls}} as TritonPythonModel
'''
FUSED, WAIT = "fused", "wait_model"


def _spin(seconds: float) -> None:
    """Busy for `seconds`: a stand-in for compute that keeps a core as busy as inference does."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class FusedModel:
    """Preprocess, engine and postprocess of the generated repository, run one after the other in one stub:
    the same code as the three ensemble members (their `prepare` / `run` / `output_tensors`)."""

    def initialize(self, args):
        from edet_deploy.triton.models.common import parameters
        from edet_deploy.triton.models.postprocess import TritonPythonModel as Postprocess
        from edet_deploy.triton.models.preprocess import TritonPythonModel as Preprocess
        engine = importlib.import_module(f"edet_deploy.triton.models.engine_{parameters(args)['engine_backend']}")
        self.pre, self.engine, self.post = Preprocess(), engine.TritonPythonModel(), Postprocess()
        for stage in (self.pre, self.engine, self.post):
            stage.initialize(args)

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        from edet_deploy.contract import IMAGE, OUTPUTS
        prepared = [self.pre.prepare(pb_utils.get_input_tensor_by_name(r, IMAGE).as_numpy()) for r in requests]
        outputs = self.engine.run(np.concatenate([p[0] for p in prepared]))
        responses, start = [], 0
        for images, scales, sizes in prepared:
            part = [outputs[k][start:start + len(images)] for k in OUTPUTS]
            responses.append(pb_utils.InferenceResponse(output_tensors=self.post.output_tensors(*part, scales, sizes)))
            start += len(images)
        return responses


class WaitModel:
    """Spins for the `wait_ms` parameter per request, then answers no detections in the ensemble's outputs."""

    def initialize(self, args):
        from edet_deploy.contract import OUTPUT_SPECS
        from edet_deploy.triton.models.common import parameters
        from edet_deploy.triton.models.postprocess import TritonPythonModel as Postprocess
        params = parameters(args)
        self.wait_s = float(params["wait_ms"]) / 1000
        self.post = Postprocess()
        self.post.initialize(args)
        k = int(params["max_detections"])
        self.outputs = [np.zeros(s.shape(1, k), s.dtype) for s in OUTPUT_SPECS]

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils
        responses = []
        for _ in requests:
            _spin(self.wait_s)
            responses.append(pb_utils.InferenceResponse(output_tensors=self.post.output_tensors(
                *self.outputs, np.ones((1, 1), np.float32), np.ones((1, 2), np.int32))))
        return responses


def add_models(repo: Path, wait_ms: float) -> None:
    """The fused and wait models beside the generated ones: the fused one takes the preprocess model's input,
    the postprocess model's outputs and every member's parameters; the wait model the same interface."""
    from edet_deploy import contract
    from edet_deploy.triton.configs import config_text
    from edet_deploy.triton.verify import load_configs
    configs = load_configs(repo)
    name = next(n for n, c in configs.items() if c.platform == "ensemble")
    pre, engine, post = (configs[m] for m in contract.member_names(name))
    for model, cls in ((FUSED, "FusedModel"), (WAIT, "WaitModel")):
        config = type(post)()
        config.CopyFrom(post)
        config.name = model
        del config.input[:]
        config.input.extend(pre.input)
        for member in (pre, engine) if model == FUSED else (pre,):
            for key, value in member.parameters.items():
                config.parameters[key].CopyFrom(value)
        config.parameters["wait_ms"].string_value = f"{wait_ms:.3f}"
        config.parameters["max_detections"].string_value = str(post.output[1].dims[0])
        (repo / model / "1").mkdir(parents=True, exist_ok=True)
        (repo / model / "config.pbtxt").write_text(config_text(config))
        (repo / model / "1" / "model.py").write_text(SHIM.format(cls=cls))
    for f in (repo / engine.name / "1").iterdir():
        if f.suffix in (".onnx", ".json"):
            shutil.copyfile(f, repo / FUSED / "1" / f.name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine-backend", default="openvino", choices=("openvino", "onnxruntime"))
    ap.add_argument("--precision", default=None, help="fp32 | bf16 (OpenVINO; default: the CPU's, as triton-repo)")
    ap.add_argument("--protocol", default="grpc", choices=("grpc", "http"),
                    help="the client's protocol for the c=1 blocks (gRPC: what the load levels use)")
    ap.add_argument("--calls", type=int, default=120, help="calls per side, in 6 blocks each")
    ap.add_argument("--concurrency", default="1,4,8,16", help="load levels for ensemble vs fused ('' skips them)")
    ap.add_argument("--requests", type=int, default=15, help="requests per client per load level")
    ap.add_argument("--images", default="build/shapes", help="COCO-format dataset whose val images are sent")
    ap.add_argument("--work", default="build/triton_floor")
    ap.add_argument("--out", default="benchmarks/results/triton_floor")
    args = ap.parse_args(argv)

    from edet_deploy.backends import create_runner, precision_options
    from edet_deploy.backends.openvino import default_precision
    from edet_deploy.data import CocoDataset, generate_shapes
    from edet_deploy.detector import Detector
    from edet_deploy.measure import CpuPressure, alternating_blocks, free_port, machine_info, percentiles
    from edet_deploy.triton.client import TritonDetectorClient
    from edet_deploy.triton.load import _stats, run_load, server_split
    from edet_deploy.triton.models.engine_onnxruntime import RUNNER_OPTIONS
    from edet_deploy.triton.repo import generate_repository
    from edet_deploy.triton.server import TritonServer
    sys.path.insert(0, str(Path(__file__).parent))
    from triton_engines import export_graph

    precision = args.precision or ("fp32" if args.engine_backend != "openvino" else default_precision())
    bf16 = precision == "bf16"
    if not Path(args.images).exists():
        generate_shapes(args.images, {"val": 32}, progress=False)
    ds = CocoDataset(args.images, "val")
    blobs = [ds.image_path(i).read_bytes() for i in range(min(32, len(ds)))]
    work = Path(args.work)
    graph = export_graph(ROOT / "model_repository", work)
    options = {**precision_options(args.engine_backend, bf16),
               **(RUNNER_OPTIONS if args.engine_backend == "onnxruntime" else {})}
    local = Detector(create_runner(args.engine_backend, onnx_path=str(graph), **options))
    for b in blobs[:5]:
        local.detect([b])
    wait_ms = percentiles(alternating_blocks({"in-process": local.detect}, blobs, 30, rounds=1)["in-process"])["p50"]
    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    generate_repository(repo, variant="d0", onnx=str(graph), engine_backend=args.engine_backend, precision=precision)
    add_models(repo, wait_ms)
    server = TritonServer(repo, free_port(), free_port(), free_port(), open_apis=["statistics"], force=True,
                          log_file=work / "tritonserver.log").start()
    try:
        url = server.grpc_url if args.protocol == "grpc" else server.http_url
        clients = {side: TritonDetectorClient(url, model, args.protocol)
                   for side, model in (("ensemble", "efficientdet_d0"), ("fused", FUSED), ("wait model", WAIT))}
        sides = {"in-process": local.detect, **{k: c.detect for k, c in clients.items()},
                 "local wait": lambda _: _spin(wait_ms / 1000)}
        for fn in sides.values():
            for b in blobs[:3]:
                fn([b])
        models = ["efficientdet_d0", FUSED, WAIT]
        before = _stats(clients["ensemble"].client, models)
        with CpuPressure() as pressure:
            times = alternating_blocks(sides, blobs, args.calls)
        split = server_split(before, _stats(clients["ensemble"].client, models))
        for c in clients.values():
            c.close()
        conc = [int(c) for c in args.concurrency.split(",") if c.strip()]
        load = {"efficientdet_d0": [], FUSED: []}
        for order in ((["efficientdet_d0", FUSED], [FUSED, "efficientdet_d0"]) if conc else ()):
            for model in order:
                rows = run_load(server.grpc_url, blobs, model=model, concurrencies=conc,
                                requests_per_client=args.requests, composing=None if model != FUSED else [FUSED])
                load[model].append([{k: r[k] for k in ("concurrency", "p50_ms", "p99_ms", "throughput_img_s")}
                                    for r in rows])
    finally:
        server.stop()
        local.runner.close()
    p50 = {k: percentiles(v)["p50"] for k, v in times.items()}
    ratios = {"ensemble / in-process": p50["ensemble"] / p50["in-process"],
              "fused / in-process": p50["fused"] / p50["in-process"],
              "wait model / local wait": p50["wait model"] / p50["local wait"]}
    report = {"machine": machine_info(None), "engine_backend": args.engine_backend, "precision": precision,
              "protocol": args.protocol,
              "wait_ms": round(wait_ms, 3), "calls_per_side": args.calls, "cpu_pressure_pct": pressure.pct,
              "p50_ms": {k: round(v, 3) for k, v in p50.items()},
              "p90_ms": {k: round(percentiles(v)["p90"], 3) for k, v in times.items()},
              "ratios": {k: round(v, 3) for k, v in ratios.items()}, "server_ms": split, "load": load}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    lines = [f"# What serving through Triton costs at concurrency 1\n",
             f"Machine: {m['cpu']} ({m['cpu_flags']}), {m['cores']} cores, no GPU; {m['date']}; CPU pressure "
             f"{pressure.pct}% during the blocks. Bundled D0 (256 px), engine {args.engine_backend} {precision}, "
             f"{'gRPC' if args.protocol == 'grpc' else 'HTTP'}, {args.calls} calls per side in 6 alternating blocks; "
             f"`python benchmarks/triton_floor.py --protocol {args.protocol}`.\n",
             "| side | p50 ms | p90 ms | Triton's own time per request ms |", "|---|---:|---:|---:|"]
    served = {"ensemble": "efficientdet_d0", "fused": FUSED, "wait model": WAIT}
    for k in sides:
        s = split.get(served.get(k, ""), {})
        own = f"{s['request_ms']:.2f}" if s else ""
        lines.append(f"| {k} | {p50[k]:.2f} | {report['p90_ms'][k]:.2f} | {own} |")
    lines += ["", "| ratio of p50s | value |", "|---|---:|"]
    lines += [f"| {k} | **{v:.2f}x** |" for k, v in ratios.items()]
    lines += ["", f"The wait model spins {wait_ms:.2f} ms (the in-process p50 measured first) and returns canned "
              "detections: `wait model / local wait` is what Triton adds to a request of this length when the model "
              "does no work of its own, the floor under any layout of Python-backend models on this machine."]
    if conc:
        lines += ["", f"Closed loop, {args.requests} requests per client, img/s (p50 ms) in two passes, the second in the "
                  "opposite order:\n", "| concurrency | ensemble | fused |", "|---:|---|---|"]
        for i, c in enumerate(conc):
            cell = lambda m: " / ".join(f"{p[i]['throughput_img_s']:.0f} ({p[i]['p50_ms']:.0f})" for p in load[m])  # noqa: E731
            lines.append(f"| {c} | {cell('efficientdet_d0')} | {cell(FUSED)} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
