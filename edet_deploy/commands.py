"""The subcommands and their registry. Each imports its heavy dependencies inside the handler."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, Tuple

from .cli_args import (BATCH, COUNT, FRACTION, IMAGE_SIZE, INSTANCES, PORT, SEED, THREADS, Bounded, BoundedList,
                       JsonOutArgs, NmsArgs, OutputPath, ProgressArgs, SourceArgs, batch_profile, detection_report,
                       printable)
from .contract import EXPORT_OPSETS, INPUT_FORMATS, artifact_name
from .errors import EdetError, EdetRuntimeError

Handler = Callable[[argparse.Namespace], int]
# name -> (help, fn): `fn(parser)` declares the subcommand's options and returns its handler.
COMMANDS: Dict[str, Tuple[str, Callable[[argparse.ArgumentParser], Handler]]] = {}


def command(name: str, help: str) -> Callable:
    """Register `fn(parser) -> handler` as subcommand `name`."""
    def deco(fn):
        COMMANDS[name] = (help, fn)
        return fn
    return deco


@command("models", "list the supported EfficientDet variants")
def _models(p: argparse.ArgumentParser):
    p.add_argument("--json", action="store_true", help="print the table as a JSON list on stdout")

    def run(args) -> int:
        from .configs import VARIANTS
        if args.json:
            print(json.dumps([{"model": c.name, "image_size": c.image_size, "backbone": c.backbone,
                               "fpn_channels": c.fpn_channels, "fpn_repeats": c.fpn_repeats,
                               "head_repeats": c.head_repeats, "fusion": c.fusion, **c.published}
                              for c in VARIANTS.values()], indent=2))
            return 0
        print(f"{'model':5s} {'input':>6s} {'backbone':20s} {'W_bifpn':>7s} {'D_bifpn':>7s} {'D_head':>6s} "
              f"{'fusion':8s} {'params':>8s} {'FLOPs':>8s} {'COCO AP':>7s}")
        for cfg in VARIANTS.values():
            pub = cfg.published
            print(f"{cfg.name:5s} {cfg.image_size:6d} {cfg.backbone:20s} {cfg.fpn_channels:7d} {cfg.fpn_repeats:7d} "
                  f"{cfg.head_repeats:6d} {cfg.fusion:8s} {pub['params_m']:7.1f}M {pub['flops_b']:7.1f}B "
                  f"{pub['coco_ap']:7.1f}")
        return 0
    return run


@command("export", "export a variant to an ONNX detection graph (+ metadata JSON)")
def _export(p: argparse.ArgumentParser):
    p.add_argument("--model", default="d0", help="d0..d7, d7x (also efficientdet-d0, tf_efficientdet_d0)")
    p.add_argument("--weights", help="our checkpoint or an effdet .pth/.safetensors (default: random init)")
    p.add_argument("--num-classes", type=Bounded(int, 1, 100_000), help="default: from the weights' metadata, else 90 (COCO)")
    p.add_argument("--image-size", type=IMAGE_SIZE, help="input size (default: the variant's, or the weights')")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--batch", type=BATCH, default=1, help="fixed batch size")
    b.add_argument("--dynamic-batch", type=BATCH, metavar="MAX", help="dynamic batch dimension up to MAX")
    p.add_argument("--opset", type=Bounded(int, *EXPORT_OPSETS), default=17, help="ONNX opset")
    p.add_argument("--out", default="build/export", type=OutputPath(folder=True), help="output directory")
    nms, progress = NmsArgs(), ProgressArgs()
    nms.add_to(p)
    progress.add_to(p)

    def run(args) -> int:
        from .export import export_onnx
        from .trt.check import check_trt_compat
        res = export_onnx(args.model, args.out, weights=args.weights, num_classes=args.num_classes,
                          image_size=args.image_size, batch=args.batch, dynamic_batch=args.dynamic_batch,
                          opset=args.opset, nms=nms.build(args), pre_nms_top_k=args.pre_nms_top_k,
                          progress=progress.build(args))
        problems = check_trt_compat(res.onnx_path)
        print(f"wrote {res.onnx_path} and {res.metadata_path}")
        for f in problems:
            print(f"warning: TensorRT would reject: {f}", file=sys.stderr)
        return 0
    return run


@command("check", "check an ONNX graph for what TensorRT's parser would reject (no TensorRT needed); exit 0 clean, "
                  "1 problems or not an edet-deploy graph, 2 unusable input")
def _check(p: argparse.ArgumentParser):
    p.add_argument("onnx", help="ONNX graph")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the report")

    def run(args) -> int:
        from .precision.census import format_census
        from .trt.check import graph_report
        report = graph_report(args.onnx)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            for line in report["plugins"]:
                print(line)
            for f in report["problems"]:
                print(f["text"])
            if report["not_ours"]:
                print(f"not an edet-deploy detection graph: {report['not_ours']}")
            print(format_census(report["precision"]))
            print(report["tensorrt_line"])  # which TensorRT series (10.13, 11.x) would import the graph
            print(report["summary"])  # the last line (and the exit status) is what scripts read
        return 0 if report["ok"] else 1
    return run


@command("detect", "detect objects in images and print them (original pixel coordinates)")
def _detect(p: argparse.ArgumentParser):
    p.add_argument("images", nargs="+", help="JPEG/PNG/... files")
    source, json_out = SourceArgs(), JsonOutArgs()
    source.add_to(p)
    p.add_argument("--min-score", type=FRACTION, default=0.3, help="hide detections below this score")
    json_out.add_to(p)

    def drawn(draw: str, args: argparse.Namespace) -> list:
        """Each file --draw writes, for the parser's check against the inputs and --json."""
        from .visualize import draw_files
        return draw_files(draw, args.images)

    p.add_argument("--draw", type=OutputPath(folder_ok=True, writes=drawn),
                   help="draw the detections of the first image to this .png/.jpg file (or into an "
                        "existing directory, <image>_det.png for each image)")

    def run(args) -> int:
        from .cli_args import printable
        from .preprocess import decode_image
        from .visualize import draw_targets
        for path in args.images:  # fail early, before the model is built
            decode_image(path)
        targets = draw_targets(args.draw, args.images) if args.draw else []
        results = source.build(args, args.min_score).detect(args.images)
        if not json_out.to_stdout(args):
            for path, det in zip(args.images, results):
                print(f"{printable(path)}: {len(det)} detection(s)")
                for r in det.to_records():
                    x1, y1, x2, y2 = r["box"]
                    print(f"  {r['label']:>12s}  {r['score']:.3f}  [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}]")
        json_out.write(args, detection_report(args.images, results))
        if targets:
            from .visualize import draw_detections
            for img, det, dst in zip(args.images, results, targets):
                draw_detections(img, det, dst)
                print(f"drew {printable(dst)}", file=sys.stderr if json_out.to_stdout(args) else sys.stdout)
        return 0
    return run


@command("demo", "the main job on this machine: export, check, detect on CPU (OpenVINO, checked against ONNX "
                 "Runtime), serve with Triton")
def _demo(p: argparse.ArgumentParser):
    p.add_argument("--out", default="build/demo", type=OutputPath(folder=True),
                   help="where the graph, images and reports go")
    p.add_argument("--model", default="d0", help="variant to export and run (see `edet-deploy models`)")

    def run(args) -> int:
        from .demo import run_demo
        return run_demo(args.model, Path(args.out))
    return run


@command("make-shapes", "generate the shapes detection dataset (COCO format) used by the demo model")
def _make_shapes(p: argparse.ArgumentParser):
    p.add_argument("--out", default="build/shapes", type=OutputPath(folder=True),
                   help="dataset folder (built beside it, moved into place when complete)")
    split = Bounded(int, 0, 1_000_000, meanings={0: "no such split"})
    p.add_argument("--train", type=split, default=3000, help="training images")
    p.add_argument("--val", type=split, default=300, help="validation images")
    p.add_argument("--calib", type=split, default=500, help="calibration images")
    p.add_argument("--seed", type=SEED, default=0, help="the same seed gives the same images and boxes")
    p.add_argument("--force", action="store_true", help="write into an --out holding files make-shapes did not "
                                                         "generate (its instances_<split>.json and images/<split> "
                                                         "are replaced)")
    progress = ProgressArgs()
    progress.add_to(p)

    def run(args) -> int:
        from .data import generate_shapes
        out = generate_shapes(args.out, {"train": args.train, "val": args.val, "calib": args.calib}, args.seed,
                              progress=progress.build(args), force=args.force)
        print(f"wrote {out} (splits train/val/calib: {args.train}/{args.val}/{args.calib})")
        return 0
    return run


@command("train", "train or fine-tune a variant on a COCO-format dataset (focal + Huber loss)")
def _train(p: argparse.ArgumentParser):
    p.add_argument("--model", default="d0", help="variant to train (see `edet-deploy models`)")
    p.add_argument("--data", required=True, help="dataset dir with train and val splits (COCO format)")
    p.add_argument("--out", required=True, type=OutputPath(),
                   help="checkpoint path (.safetensors or .pth); the best epoch is kept")
    p.add_argument("--epochs", type=Bounded(int, 1, 100_000), default=10, help="passes over the train split")
    p.add_argument("--batch-size", type=BATCH, default=8, help="images per optimisation step")
    p.add_argument("--lr", type=Bounded(float, 0.0, 10.0, above=True), default=2e-3, help="peak learning rate")
    p.add_argument("--image-size", type=IMAGE_SIZE, default=256,
                   help="training/inference input size (multiple of 128)")
    p.add_argument("--weights", help="start from these weights (ours or effdet's)")
    p.add_argument("--max-minutes", type=Bounded(float, 0.0, 1e6, above=True),
                   help="stop before an epoch would end past this budget (default: no limit)")
    p.add_argument("--eval-images", type=COUNT,
                   help="evaluate on at most this many val images per epoch (default: all)")
    p.add_argument("--threads", type=THREADS, help="CPU threads (default: all cores)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of initialisation, shuffling and augmentation")
    progress = ProgressArgs()
    progress.add_to(p)

    def run(args) -> int:
        if Path(args.out).suffix.lower() in (".onnx", ".plan", ".engine", ".json"):  # before the epochs
            raise EdetError(f"--out {printable(args.out)} is named like a graph, an engine or metadata, not a "
                            f"checkpoint (name it {Path(args.out).with_suffix('.safetensors').name})")
        from .train import train
        res = train(args.model, args.data, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    image_size=args.image_size, weights=args.weights, seed=args.seed, threads=args.threads,
                    max_minutes=args.max_minutes, eval_images=args.eval_images, progress=progress.build(args))
        for row in res["history"]:
            print(row)
        print(f"best val mAP {res['best_val_mAP']:.4f}; wrote {res['checkpoint']}")
        return 0
    return run


@command("eval", "COCO mAP (pycocotools) of a graph or checkpoint on a COCO-format split; writes a JSON report")
def _eval(p: argparse.ArgumentParser):
    source = SourceArgs()
    source.add_to(p)
    p.add_argument("--data", required=True, help="dataset dir (instances_<split>.json + images)")
    p.add_argument("--split", default="val", help="the split scored: instances_<split>.json")
    p.add_argument("--max-images", type=COUNT, help="evaluate the first N images (default: all)")
    p.add_argument("--match-by-index", action="store_true",
                   help="pair the model's classes with the dataset's categories by position (sorted by id) "
                        "instead of by name")
    p.add_argument("--report", type=OutputPath(),
                   help="JSON report path (default: <data>/eval_<split>_<graph or model>_<backend>.json)")
    progress = ProgressArgs()
    progress.add_to(p)

    def run(args) -> int:
        from .data import CocoDataset
        from .eval import evaluate
        from .io import write_json
        dataset = CocoDataset(args.data, args.split)
        dataset.check_images(args.max_images)  # before the model is built (evaluate finds it done)
        report = evaluate(source.build(args), dataset, args.max_images, progress=progress.build(args),
                          match_by_index=args.match_by_index)
        report["source"] = source.describe(args)
        for k, v in report["stats"].items() if report["targets"] else ():  # none: evaluate's warning says so
            print(f"{k:6s} {v:.4f}")
        dst = args.report or str(Path(args.data) / f"eval_{args.split}_{source.slug(args)}_{source.backend(args)}.json")
        write_json(dst, report)
        print(f"wrote {dst}")
        return 0
    return run


@command("triton-repo", "generate a Triton model repository: preprocess -> engine -> postprocess ensemble")
def _triton_repo(p: argparse.ArgumentParser):
    p.add_argument("--model", help="default: the --onnx/--engine graph's (from its metadata JSON), else d0")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--onnx", help="ONNX graph for --target cpu (exported with --dynamic-batch >= --max-batch)")
    src.add_argument("--engine", help="TensorRT plan for --target gpu (metadata JSON beside it)")
    p.add_argument("--weights", help="with --target cpu and no --onnx: export these weights first")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "int8"],
                   help="default: the graph's (from its metadata JSON), which a stated one must match, except that "
                        "an FP32 graph on the OpenVINO CPU engine runs bf16 where this CPU has bf16 instructions "
                        "(AVX512_BF16 or AMX; --precision fp32 keeps f32); bf16: the FP32 graph run in bfloat16")
    p.add_argument("--target", default="cpu", choices=["cpu", "gpu"],
                   help="cpu: the graph in our CPU runner (Triton's Python backend); gpu: a TensorRT plan")
    p.add_argument("--engine-backend", choices=["openvino", "onnxruntime"],
                   help="--target cpu: the runner of the engine model (default: the CPU backend `detect` uses)")
    p.add_argument("--max-batch", type=BATCH, default=8, help="max_batch_size of every model in the ensemble")
    p.add_argument("--preprocess-instances", type=INSTANCES, default=2, help="preprocess model instances")
    p.add_argument("--engine-instances", type=INSTANCES, default=1, help="engine model instances")
    p.add_argument("--cuda-graphs", action="store_true", help="GPU target: capture CUDA graphs in the engine")
    p.add_argument("--no-copy", action="store_true", help="write configs and model.py shims only")
    p.add_argument("--tensorrt-version", help="GPU target: TensorRT of the Triton image that will serve the plan "
                   "(default: the installed one); a plan from another version is refused")
    p.add_argument("--input-format", default="encoded",
                   help="ensemble input(s), comma-separated: encoded (JPEG/PNG bytes -> <name>), decoded (uint8 "
                        "RGB decoded by the client -> <name>_decoded)")
    p.add_argument("--queue-delay-us", type=Bounded(int, 0, 10_000_000, meanings={0: "no window"}), help="engine dynamic-batching window in microseconds (default: "
                   "0 on --target cpu, whose engine is busy long enough for requests to batch; 2000 on gpu)")
    p.add_argument("--force", action="store_true", help="write into an --out holding models or files edet-deploy "
                                                         "did not generate")
    # No string default: argparse would check it as a place to write even for --resign, which writes elsewhere.
    p.add_argument("--out", type=OutputPath(folder=True), help="repository folder (default: model_repository)")
    p.add_argument("--resign", metavar="DIR", type=OutputPath(folder=True),
                   help="after an intended edit of DIR's files (a config, class names): "
                        "check DIR as `serve` does and write its checksum manifest anew (nothing is generated)")
    progress = ProgressArgs()
    progress.add_to(p)

    def run(args) -> int:
        if args.resign:  # only --force goes with it: anything else given would be ignored
            ignored = [a.option_strings[0] for a in p._actions
                       if a.option_strings and a.dest not in ("help", "resign", "force", "no_progress", "verbose",
                                                              "quiet", "log_file")
                       and getattr(args, a.dest, a.default) != a.default]
            if ignored:
                raise EdetError(f"--resign only checks and re-signs {printable(args.resign)}; it generates "
                                f"nothing, so {', '.join(ignored)} would be ignored: leave "
                                f"{'them' if len(ignored) > 1 else 'it'} out")
        if args.weights and (args.onnx or args.engine):
            raise EdetError(f"--weights are exported when there is no --onnx; {'--onnx' if args.onnx else '--engine'} "
                            f"brings its own (leave --weights out)")
        if args.target == "cpu":
            ignored = [f for f, v in (("--cuda-graphs", args.cuda_graphs or None),
                                      ("--tensorrt-version", args.tensorrt_version)) if v is not None]
            if ignored:
                raise EdetError(f"{' and '.join(ignored)} {'are' if len(ignored) > 1 else 'is'} for --target gpu "
                                f"(a TensorRT plan); the CPU target ignores {'them' if len(ignored) > 1 else 'it'}")
        if args.resign:
            from .triton.verify import resign_repository
            print(f"signed {args.resign}: {resign_repository(args.resign, force=args.force)}")
            return 0
        from .backends import cpu_engine_precision
        from .triton.repo import generate_repository_from_model
        repo = generate_repository_from_model(
            args.out or "model_repository", model=args.model, weights=args.weights, onnx=args.onnx,
            engine=args.engine, progress=progress.build(args),
            precision=args.precision or (cpu_engine_precision(args.engine_backend, args.onnx)
                                         if args.target == "cpu" else None),
            target=args.target, max_batch_size=args.max_batch,
            copy_artifact=not args.no_copy, preprocess_instances=args.preprocess_instances,
            engine_instances=args.engine_instances, cuda_graphs=args.cuda_graphs,
            engine_backend=args.engine_backend, force=args.force, tensorrt_version=args.tensorrt_version,
            input_formats=tuple(f.strip() for f in args.input_format.split(",") if f.strip()),
            **({} if args.queue_delay_us is None else {"queue_delay_us": args.queue_delay_us}))
        print(f"wrote Triton repository {repo} (configs validated)")
        return 0
    return run


@command("serve", "run the embedded Triton server (CPU) on a repository, supervised, until Ctrl-C / SIGTERM / SIGHUP")
def _serve(p: argparse.ArgumentParser):
    p.add_argument("--repo", default="model_repository", help="a repository written by `edet-deploy triton-repo`")
    p.add_argument("--http-port", type=PORT, default=8000, help="HTTP/REST port (KServe v2 protocol)")
    p.add_argument("--grpc-port", type=PORT, default=8001, help="gRPC port (KServe v2 protocol)")
    p.add_argument("--metrics-port", type=PORT, default=8002, help="Prometheus metrics port")
    p.add_argument("--address", default="127.0.0.1", help="bind address (0.0.0.0 exposes the server)")
    p.add_argument("--grace-period", type=Bounded(float, 0.0, 3600.0, meanings={0: "no drain"}), default=30.0,
                   help="on SIGTERM/SIGINT/SIGHUP: seconds in-flight requests may take to finish")
    p.add_argument("--open-api", action="append", default=[], metavar="GROUP",
                   help="leave a restricted Triton API group open to every client (shared-memory, model-config, "
                        "statistics, trace, logging, or all; default: only inference, health and metadata)")
    p.add_argument("--max-in-flight", type=Bounded(int, 0, 100000, meanings={0: "no bound"}), default=None,
                   help="inference requests in flight at once over HTTP and gRPC; one more gets 503 / UNAVAILABLE "
                        "at once (retryable) instead of waiting in Triton's queue; lower it for shorter waits under "
                        "overload (default: 256)")
    p.add_argument("--force", action="store_true", help="serve a repository holding models edet-deploy did not generate")

    def run(args) -> int:
        ports = {"--http-port": args.http_port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
        same = [flag for flag, port in ports.items() if list(ports.values()).count(port) > 1]
        if same:  # the second listener could not bind, after minutes of loading models
            raise EdetError(f"{' and '.join(same)} are {'all' if len(same) > 2 else 'both'} {ports[same[0]]}: "
                            f"give each listener its own port")
        _check_bind_address(args.address)
        from .triton.supervisor import serve
        return serve(args.repo, args.http_port, args.grpc_port, args.metrics_port, args.address, args.log_file,
                     args.grace_period, [g.strip() for v in args.open_api for g in v.split(",")], args.force,
                     max_in_flight=args.max_in_flight)
    return run


def _check_bind_address(address: str) -> None:
    """`serve --address`: a name or number this machine can listen on, refused in one line (exit 2) before any
    work; a typo once surfaced as the resolver's bare 'Name or service not known', exit 1."""
    import socket
    try:  # IPv4: the fronts and the port checks listen on IPv4 (an IPv6 address failed later, exit 1)
        _, _, _, _, sockaddr = socket.getaddrinfo(address, 0, family=socket.AF_INET, type=socket.SOCK_STREAM)[0]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(sockaddr)
    except (OSError, UnicodeError, ValueError) as e:
        raise EdetError(f"--address {address!r} is not an IPv4 address this machine can listen on "
                        f"({getattr(e, 'strerror', None) or e}; 0.0.0.0 listens on every interface)") from None


@command("client", "send images to a running Triton ensemble and print the detections")
def _client(p: argparse.ArgumentParser):
    p.add_argument("images", nargs="+", help="JPEG/PNG/... files to send")
    p.add_argument("--url", default="127.0.0.1:8000", help="host:port, or with an http://, https:// or grpc:// "
                                                            "prefix (Triton listens on 8000 for http, 8001 for grpc)")
    p.add_argument("--protocol", choices=["http", "grpc"], help="default: the --url prefix's, else http")
    p.add_argument("--model", default=artifact_name("d0"), help="ensemble name")
    p.add_argument("--input-format", default="encoded", choices=INPUT_FORMATS,
                   help="decoded: decode here and send uint8 RGB (to the --model's <name>_decoded ensemble)")
    p.add_argument("--min-score", type=FRACTION, default=0.3, help="hide detections below this score")
    json_out = JsonOutArgs()
    json_out.add_to(p)

    def run(args) -> int:
        from .io import existing_file
        from .triton.client import TritonDetectorClient
        for path in args.images:  # before the server is contacted
            existing_file(path, "image")
            if args.input_format == "decoded":  # decoded here: an image that does not decode is refused first
                from .preprocess import decode_image
                decode_image(path)
        client = TritonDetectorClient(args.url, args.model, args.protocol, input_format=args.input_format)
        results = []
        for path in args.images:
            det = client.detect([Path(path).read_bytes()], args.min_score)[0]
            results.append(det)
            if not json_out.to_stdout(args):
                print(f"{path}: {len(det)} detection(s)")
                for r in det.to_records():
                    print(f"  {r['label']:>12s}  {r['score']:.3f}  {r['box']}")
        client.close()
        json_out.write(args, detection_report(args.images, results))
        return 0
    return run


@command("convert", "make the FP16 twin of an exported FP32 graph (network in float16, decode in float32)")
def _convert(p: argparse.ArgumentParser):
    p.add_argument("onnx", help="FP32 graph from `edet-deploy export`")
    p.add_argument("--fp16", action="store_true", required=True, help="convert to FP16 (the only conversion)")
    p.add_argument("--data", help="images to find nodes that overflow FP16 (those stay FP32)")
    p.add_argument("--out", type=OutputPath(artifact=True), help="default: <name>.fp16.onnx beside the input")

    def run(args) -> int:
        from .precision.convert import to_fp16
        res = to_fp16(args.onnx, args.out, args.data)
        print(f"wrote {res.onnx_path} (kept in FP32: {len(res.metadata['fp16']['kept_fp32'])} nodes)")
        return 0
    return run


@command("calibrate", "INT8 calibration: explicit Q/DQ graph for TensorRT 11 (symmetric, per-channel weights)")
def _calibrate(p: argparse.ArgumentParser):
    p.add_argument("onnx", help="FP32 graph from `edet-deploy export`")
    p.add_argument("--data", required=True, help="COCO-format dataset (split calib, else train) or image folder")
    p.add_argument("--num-images", type=COUNT, default=500, help="calibration images")
    p.add_argument("--method", choices=["entropy", "percentile", "minmax"],
                   help="activation ranges: entropy = TensorRT's KL search over a 2048-bin |x| histogram; "
                        "percentile = 99.999th of |x|; minmax = max |x|. Default: the variant's, entropy for "
                        "D0-D7x, minmax for Lite (bounded ReLU6 activations; measured in docs/precision.md)")
    p.add_argument("--exclude", nargs="*", default=[], metavar="PATTERN",
                   help="node-name patterns kept in float (fnmatch or substring), e.g. '*/class_net/predict/*'")
    p.add_argument("--cache-dir", type=OutputPath(folder=True),
                   help="calibration-range cache (default: .calibration_cache beside the graph)")
    p.add_argument("--sensitivity", action="store_true",
                   help="first find the blocks that cost the most mAP in INT8 (needs a val split in --data) and "
                        "keep them in float")
    # No defaults here: a value given without --sensitivity would be ignored, so it is refused (run).
    p.add_argument("--eval-images", type=COUNT, help="--sensitivity: val images per trial (default: 100)")
    p.add_argument("--max-loss", type=FRACTION, help="--sensitivity: acceptable mAP loss vs FP32 (default: 0.005)")
    p.add_argument("--no-equalize", action="store_true",
                   help="skip equalizing the depthwise convs' channels before calibration (same FP32 function, "
                        "finer int8 steps where a few channels are much wider than the rest)")
    p.add_argument("--no-refine", action="store_true",
                   help="keep the calibrated thresholds as they are instead of tightening each by the error of "
                        "the layer it feeds (label-free, on 32 of the images; about 20 s for D0)")
    p.add_argument("--out", type=OutputPath(artifact=True), help="default: <name>.int8-<method>.onnx beside the input")
    progress = ProgressArgs()
    progress.add_to(p)

    def run(args) -> int:
        from .precision.int8 import Int8Options
        from .precision.sensitivity import Sensitivity, calibrate_int8
        unused = [f for f, v in (("--eval-images", args.eval_images), ("--max-loss", args.max_loss)) if v is not None]
        if unused and not args.sensitivity:
            raise EdetError(f"{' and '.join(unused)} only tune{'' if len(unused) > 1 else 's'} --sensitivity: add "
                            f"--sensitivity or leave {'them' if len(unused) > 1 else 'it'} out")
        if args.sensitivity:  # its trials score the val split: a --data without one is refused before any work
            from .data import CocoDataset
            CocoDataset(args.data, "val")
        options = Int8Options(num_images=args.num_images, method=args.method, exclude=tuple(args.exclude),
                              cache_dir=args.cache_dir, equalize=not args.no_equalize, refine=not args.no_refine)
        made = calibrate_int8(args.onnx, args.data, args.out, options,
                              Sensitivity(**{k: v for k, v in (("eval_images", args.eval_images),
                                                              ("max_loss", args.max_loss)) if v is not None})
                              if args.sensitivity else None,
                              progress.build(args))
        if made.sweep is not None:
            rep = made.sweep
            print(f"FP32 mAP {rep['fp32_mAP']:.4f}, INT8 all {rep['int8_all_mAP']:.4f}, keeping "
                  f"{rep['kept_in_float'] or 'nothing'} in float -> {rep['int8_with_exclusions_mAP']:.4f} "
                  f"({made.sweep_path})")
        res = made.graph
        info = res.metadata["int8"]
        print(f"wrote {res.onnx_path}: {info['quantized_convs']} convs INT8, {len(info['excluded_convs'])} FP16, "
              f"{info['qdq_nodes']} Q/DQ nodes, {'cached ranges' if info['cache_hit'] else 'calibrated'} "
              f"in {info['seconds']} s")
        eq = info.get("equalization")
        if eq:
            print(f"equalized before calibration: {eq['pairs']} depthwise -> pointwise pairs, {eq['inputs']} "
                  f"depthwise inputs (widest channel spread {eq.get('max_channel_spread_before')}x -> "
                  f"{eq.get('max_channel_spread_after')}x)")
        ref = info.get("refinement")
        if ref:
            print(f"thresholds refined on {ref['images']} images: {ref['tightened']} of {ref['tensors']} tightened "
                  f"(smallest factor {ref['min_factor']})")
        from .precision.census import format_census
        print(format_census(res.metadata["census"]))
        return 0
    return run


@command("build", "build a strongly typed TensorRT engine, 10.13 or 11.x (needs an NVIDIA GPU and TensorRT)")
def _build(p: argparse.ArgumentParser):
    p.add_argument("onnx", help="graph from export / convert / calibrate (its precision is the engine's)")
    p.add_argument("--out", required=True, type=OutputPath(artifact=True),
                   help="engine file (.plan); a JSON sidecar is written beside it")
    p.add_argument("--batch", type=batch_profile, default="1", help="optimization profile MIN:OPT:MAX (or N)")
    # An output too (rewritten after the build): checked as one, so it never replaces --out, the graph, a device.
    p.add_argument("--timing-cache", type=OutputPath(), help="timing cache file, read and updated")
    p.add_argument("--workspace", type=Bounded(float, 0.0, 1024.0, above=True), default=4.0, help="workspace limit in GB")
    p.add_argument("--trt-verbose", action="store_true", help="show TensorRT's info messages, not only warnings")
    p.add_argument("--no-tf32", action="store_true",
                   help="FP32 layers in full FP32 (TensorRT otherwise runs FP32 convolutions as TF32)")
    progress = ProgressArgs()
    progress.add_to(p)

    def run(args) -> int:
        from .trt.builder import build_engine
        sidecar = build_engine(args.onnx, args.out, args.batch, args.timing_cache, args.workspace,
                               verbose=args.trt_verbose, tf32=not args.no_tf32, progress=progress.build(args))
        print(f"wrote {args.out} ({sidecar['precision']}, TensorRT {sidecar['tensorrt']['version']}, "
              f"{sidecar['tensorrt']['gpu']}, {sidecar['tensorrt']['build_seconds']} s)")
        return 0
    return run


@command("bench", "latency/throughput sweep over variants, backends, precisions and batch sizes")
def _bench(p: argparse.ArgumentParser):
    p.add_argument("--models", default="d0", help="e.g. d0-d7,d7x")
    p.add_argument("--backends", default="torch,onnxruntime,openvino,tensorrt",
                   help="comma-separated; a row this machine cannot run is skipped with the reason")
    p.add_argument("--precisions", default="fp32,int8", help="fp32,bf16,fp16,int8 (bf16: OpenVINO on CPUs with bf16 "
                                                            "instructions)")
    p.add_argument("--batch", type=BoundedList(BATCH), default=[1], help="batch sizes, e.g. 1,8")
    p.add_argument("--warmup", type=Bounded(int, 0, 10_000_000, meanings={0: "no warm-up"}),
                   help="untimed runs before timing each combination (default: 3, 1 with --quick)")
    p.add_argument("--iters", type=COUNT, help="timed runs of each combination (default: 20, 5 with --quick)")
    p.add_argument("--seconds", type=Bounded(float, 0.0, 86_400.0, above=True),
                   help="time each combination for S seconds instead of --iters")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 warm-up, 5 iterations; an explicit --warmup / --iters / --seconds wins")
    p.add_argument("--threads", type=THREADS, help="CPU threads (default: all cores)")
    p.add_argument("--out", default="build/bench", type=OutputPath(folder=True),
                   help="folder for bench.json / .csv / .md and the plots")
    acc = p.add_argument_group("accuracy beside latency (Ultralytics' benchmark does the same)")
    acc.add_argument("--weights", help="trained weights for the one variant in --models (default: random init, "
                                       "which is enough for latency)")
    acc.add_argument("--data", help="COCO-format dataset: also measure each row's COCO mAP (pycocotools) with the "
                                    "runner that was timed; INT8 is then calibrated on its calib split (entropy)")
    # No defaults here: a value given without --data would be ignored, so it is refused (run).
    acc.add_argument("--split", help="the split --data is scored on (default: val)")
    acc.add_argument("--eval-images", type=COUNT, help="--data: score the first N images of the split (default: all)")
    acc.add_argument("--calib-images", type=COUNT, help="--data: INT8 calibration images (default: 100)")
    progress = ProgressArgs()
    progress.add_to(p)

    def run(args) -> int:
        from .bench import Accuracy, run_bench, sweep_options
        from .configs import parse_model_list
        # --quick changes defaults only: a value given on the command line wins, as --seconds wins over the default
        # --iters (both given: one would be ignored, so that is refused).
        warmup = args.warmup if args.warmup is not None else 1 if args.quick else 3
        iters = args.iters if args.iters is not None else 5 if args.quick else 20
        if args.seconds is not None and args.iters is not None:
            raise EdetError("--seconds times each combination instead of --iters: give one of them")
        unused = [f for f, v in (("--split", args.split), ("--eval-images", args.eval_images),
                                 ("--calib-images", args.calib_images)) if v is not None]
        if unused and not args.data:
            raise EdetError(f"{' and '.join(unused)} only appl{'y' if len(unused) > 1 else 'ies'} to the accuracy of "
                            f"--data: add --data or leave {'them' if len(unused) > 1 else 'it'} out")
        backends, precisions, batches = sweep_options(args.backends, args.precisions, args.batch)
        if args.weights is not None and Path(args.weights).is_file():
            # Unreadable weights were one skipped row per combination, exit 1, after the graphs were exported.
            from .model.weights import checkpoint_metadata
            checkpoint_metadata(args.weights)
        given = {k: v for k, v in (("split", args.split), ("calib_images", args.calib_images)) if v is not None}
        accuracy = None if not args.data else Accuracy(Path(args.data), eval_images=args.eval_images, **given)
        report = run_bench(parse_model_list(args.models), backends, precisions, batches, args.out, args.threads,
                           warmup, iters, args.seconds, progress.build(args), weights=args.weights,
                           accuracy=accuracy)
        ok = sum(r["status"] == "ok" for r in report["results"])
        if not ok:  # run_bench left the reports in --out as they were: the first reason goes on this line
            first = report["results"][0]
            raise EdetRuntimeError(f"nothing was measured: all {len(report['results'])} combination(s) skipped or "
                                   f"failed; first: {first['model']} {first['backend']} {first['precision']} "
                                   f"b{first['batch']}: {first['status']}: {first['reason']} (no report written "
                                   f"to {args.out})")
        print(f"{ok}/{len(report['results'])} combinations measured; wrote {args.out}/bench.{{json,csv,md}}, "
              f"latency.png, accuracy_vs_latency.png")
        return 0
    return run
