"""Argument groups shared by subcommands: each declares its flags once and builds the object they describe, so
handlers do not repeat flags or construction (the pattern of Polygraphy's tools). Imports neither commands nor
cli, which import this module."""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import tempfile
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

from .contract import MAX_THREADS
from .errors import EdetError

if TYPE_CHECKING:
    from .detector import Detector
    from .nms import NmsSettings


class OutputPath:
    """An argparse `type`: a path the command writes, checked when the command line is parsed, so a path that
    cannot be written is one line and exit 2 before the work (an epoch of training, a whole evaluation), naming
    the user's path: not empty; a file path that is not an existing folder (`folder_ok`: an existing folder is
    taken too), a `folder` path that is not an existing file; names of at most 255 bytes; and the nearest existing
    folder above it takes new files (probed with a nameless temporary file: permissions, read-only mounts, /proc).
    `artifact`: a graph or plan, whose metadata JSON goes beside it under its name with .json, so that name is
    refused for the artifact itself. `dash`: '-' (stdout) passes. `append`: a file opened for appending (a log):
    an existing file this process may write passes wherever it is (/dev/stderr, a log in a read-only folder).
    `writes`: the files a value stands for, given the whole command line (a folder that gets one file per
    input), for `output_clash` to check each of them; without it, the value is the one file written."""

    def __init__(self, *, folder: bool = False, folder_ok: bool = False, artifact: bool = False,
                 dash: bool = False, append: bool = False,
                 writes: Optional[Callable[[str, argparse.Namespace], Sequence[Path]]] = None):
        self.folder, self.folder_ok, self.artifact, self.dash, self.append = folder, folder_ok, artifact, dash, append
        self.writes = writes

    def files(self, value: str, args: argparse.Namespace) -> List[Path]:
        """The files the command writes for `value` (the option's parsed value)."""
        return list(self.writes(value, args)) if self.writes else [Path(value)]

    def __call__(self, text: str) -> str:
        try:
            return self._parse(text)
        except argparse.ArgumentTypeError as e:  # the user's path may hold a newline: the refusal stays one line
            raise argparse.ArgumentTypeError(one_line(str(e))) from None

    def _parse(self, text: str) -> str:
        if self.dash and text == "-":
            return text
        if not text.strip():
            raise argparse.ArgumentTypeError("an empty path")
        path = Path(text)
        if any(len(part.encode()) > 255 for part in path.parts):
            raise argparse.ArgumentTypeError(f"{text}: a name longer than 255 bytes")
        try:
            self._check(text, path)
        except (OSError, RuntimeError) as e:  # a path too long, a folder we may not look into, a symlink loop
            raise argparse.ArgumentTypeError(f"{text}: {getattr(e, 'strerror', None) or e}") from None
        return text

    def _check(self, text: str, path: Path) -> None:
        if path.is_symlink() and not path.exists():
            raise argparse.ArgumentTypeError(f"{text} is a symlink that leads nowhere (broken, or a loop)")
        if self.append and path.exists() and not path.is_dir() and os.access(path, os.W_OK):
            # Appended to, never replaced: a device or a named pipe is fine (a pipe waits for its reader, as in any
            # shell; probing for one would close the pipe on the reader it has).
            return
        # Outputs are written beside their path and renamed onto it: that would replace a device (/dev/null,
        # /dev/stdout, as root) or a named pipe with a plain file, the data never reaching the device or reader.
        hint = " (or - for standard output)" if self.dash else ""
        if not self.folder and path.exists() and not path.is_dir() and not path.is_file():
            raise argparse.ArgumentTypeError(f"{text} is a device, pipe or socket, not a file: give a file "
                                             f"path{hint}")
        if self.folder and path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
        if not self.folder and not self.folder_ok and path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a folder; give a file path")
        if self.artifact and path.suffix == ".json":
            raise argparse.ArgumentTypeError(f"{text}: that is the name of the metadata JSON written beside the "
                                             f"artifact; name it {path.with_suffix('.onnx').name} or .plan")
        folder = path if self.folder or path.is_dir() else path.parent
        existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
        if not existing.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: {existing} is not a folder")
        absolute = os.path.abspath(text)
        if not self.folder and absolute.startswith("/dev/") and not absolute.startswith("/dev/shm/"):
            # /dev/stdout, led to a plain file
            raise argparse.ArgumentTypeError(f"{text}: outputs are files, not entries of /dev: give a file "
                                             f"path{hint}")
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as e:
            raise argparse.ArgumentTypeError(f"{text}: cannot write in {existing}: {e.strerror}") from None


def output_clash(args: argparse.Namespace, actions: Sequence[argparse.Action]) -> Optional[str]:
    """What would make an output of this command overwrite one of its inputs or another of its outputs, in one
    line (None: nothing): an output file (of an `OutputPath` option, each file a folder option writes included)
    that is an input file (any other option or argument naming an existing file), the metadata sidecar of an input
    graph or plan, or (an artifact output) whose sidecar is one; or two output files that are one."""
    from .metadata import CHECKSUM_KEYS, sidecar_path

    taken: Dict[Path, str] = {}
    outputs = []
    seen = set()
    for action in actions:
        if action.dest in seen:  # the global options are declared on the subcommand too, under the same dest
            continue
        seen.add(action.dest)
        value = getattr(args, action.dest, None)
        if isinstance(action.type, OutputPath):
            if isinstance(value, str) and value != "-":
                outputs.append((action, value))
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item and _is_file(item):
                taken[_real(item)] = f"the input {item}"
                if Path(item).suffix in CHECKSUM_KEYS:  # read beside the path as given, so both places count
                    for side in (sidecar_path(item), sidecar_path(_real(item))):
                        taken[_real(side)] = f"{item}'s metadata {sidecar_path(item).name}"
    written: Dict[Path, str] = {}  # each output file -> the option (and value) that writes it
    for action, value in outputs:
        flag = action.option_strings[0] if action.option_strings else action.dest
        for file in action.type.files(value, args):
            who = f"{flag} {value}" if file == Path(value) else f"{flag} {value} (its {file})"
            real = _real(file)
            clash = taken.get(real) or (taken.get(_real(sidecar_path(file))) if action.type.artifact else None)
            if clash:
                return one_line(f"{who} would overwrite {clash}; choose another path")
            if action.type.folder:  # a folder the command fills, not a file another output could replace
                continue
            if real in written:  # one output would replace the other: one of them lost without a word
                return one_line(f"{written[real]} and {who} would write the same file; give them different paths")
            written[real] = who
    return None


def one_line(message: str) -> str:
    """`message` on one line: control characters (a newline in a path or a number the user typed) and undecodable
    bytes escaped as Python's repr writes them, so a refusal never splits (and never fails to print)."""
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Cs") else c for c in message)


def _real(path: str | Path) -> Path:
    """Where `path` leads (symlinks followed; a loop or a missing part left as it is, never an error)."""
    return Path(os.path.realpath(path))


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a name too long for the filesystem: not an input file
        return False


class Bounded:
    """An argparse `type`: a number in [lo, hi] (`lo` excluded when `above`), checked when the command line is
    parsed, so an out-of-range value is one line and exit 2 before any work starts. NaN, infinities and text
    that is not a number are refused too. `meanings` documents what special values do ({0: "no warm-up"});
    the help shows the range and the meanings."""

    def __init__(self, kind: type, lo: float, hi: float, *, above: bool = False,
                 meanings: Optional[Dict[float, str]] = None, float32: bool = False):
        self.kind, self.lo, self.hi, self.above = kind, lo, hi, above
        self.float32 = float32  # the value goes into a float32 graph: `above` must hold there too (1e-320 is 0)
        self.meanings = dict(meanings or {})
        self.__name__ = kind.__name__  # argparse names the type in its own messages

    def range_text(self) -> str:
        """'1..1024', '0..1', '>0, <=100'."""
        lo, hi = (str(self.lo), str(self.hi)) if self.kind is int else (f"{self.lo:g}", f"{self.hi:g}")
        return f">{lo}, <={hi}" if self.above else f"{lo}..{hi}"

    def describe(self) -> str:
        """'an integer in 1..1024' / 'a number in >0, <=100'."""
        return f"{'an integer' if self.kind is int else 'a number'} in {self.range_text()}"

    def help_suffix(self) -> str:
        """What the help appends to the option's text: the range, then each special value's meaning."""
        return "; ".join([self.range_text(), *(f"{value:g}: {meaning}" for value, meaning in self.meanings.items())])

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        if self.kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        if not (self.lo < value if self.above else self.lo <= value) or value > self.hi:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {one_line(text.strip())}")
        if self.float32 and self.above and struct.unpack("f", struct.pack("f", value))[0] <= self.lo:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {one_line(text.strip())}, which is "
                                             f"{self.lo:g} in the graph's float32")
        return value


class BoundedList:
    """An argparse `type`: comma-separated numbers, each checked by `item` (e.g. `--batch 1,8`)."""

    def __init__(self, item: Bounded):
        self.item = item
        self.__name__ = "list"

    def help_suffix(self) -> str:
        """What the help appends: the range of each item."""
        return f"each {self.item.range_text()}"

    def __call__(self, text: str) -> List:
        parts = [p.strip() for p in text.split(",")]
        if not all(parts):  # `1,,8` or `8,` is a typo, not 1,8
            raise argparse.ArgumentTypeError(f"expected comma-separated values, each {self.item.describe()}"
                                             f"{f', with none empty (in {text!r})' if any(parts) else ''}")
        try:
            return [self.item(p) for p in parts]
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e} (in {text!r})") from None


# The numeric option kinds the commands share. The upper bounds refuse typos (an extra digit) and values no
# run on one machine can use, long before the number reaches a library that overflows or allocates on it.
BATCH = Bounded(int, 1, 1024)
COUNT = Bounded(int, 1, 10_000_000)  # images, iterations, epochs
THREADS = Bounded(int, 1, MAX_THREADS)
PORT = Bounded(int, 1, 65535)
SEED = Bounded(int, 0, 2**32 - 1)  # what numpy and torch both take
FRACTION = Bounded(float, 0.0, 1.0)  # scores, IoU, mAP losses
IMAGE_SIZE = Bounded(int, 128, 4096)  # each variant adds its own rule (a multiple of its largest stride)
INSTANCES = Bounded(int, 1, 64)


def batch_profile(text: str) -> str:
    """An argparse `type` for `build --batch MIN:OPT:MAX` (or N): checked when parsed, kept as written."""
    from .trt.builder import parse_batch
    try:
        _, _, hi = parse_batch(text)
    except EdetError as e:
        raise argparse.ArgumentTypeError(one_line(str(e))) from None
    if hi > BATCH.hi:
        raise argparse.ArgumentTypeError(f"batch sizes go up to {BATCH.hi}, got {text!r}")
    return text


class NmsArgs:
    """The soft-NMS options of the exported graph; `build` gives the NmsSettings (None for `--nms none`)."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Declare the options, their defaults taken from NmsSettings so the two cannot drift."""
        from .nms import METHODS, NmsSettings
        from .nms.settings import DEFAULT_PRE_NMS_TOP_K, TRT_MAX_TOPK
        d = NmsSettings()
        g = parser.add_argument_group("soft-NMS (inside the graph)")
        g.add_argument("--nms", default=d.method, choices=[*METHODS, "none"],
                       help="suppression method; 'none' stops the graph at decoded candidates")
        g.add_argument("--sigma", type=Bounded(float, 0.0, 100.0, above=True, float32=True), default=d.sigma,
                       help="gaussian sigma (the paper's, not TF's doubled one)")
        g.add_argument("--iou-threshold", type=FRACTION, default=d.iou_threshold, help="IoU threshold of linear / hard")
        g.add_argument("--score-threshold", type=FRACTION, default=d.score_threshold,
                       help="detections whose score falls below this (after soft-NMS decay) are dropped")
        g.add_argument("--max-detections", type=Bounded(int, 1, TRT_MAX_TOPK), default=d.max_detections,
                       help="detections kept per image: the size K of every output")
        g.add_argument("--class-agnostic", action="store_true",
                       help="let boxes of different classes suppress each other")
        g.add_argument("--pre-nms-top-k", type=Bounded(int, 1, TRT_MAX_TOPK), default=DEFAULT_PRE_NMS_TOP_K,
                       help="candidates kept by TopK before NMS (TensorRT allows at most 3840)")

    def build(self, args: argparse.Namespace) -> Optional["NmsSettings"]:
        """The settings the options describe; None when the graph should stop before NMS."""
        from .nms import NmsSettings
        if args.nms == "none":
            return None
        return NmsSettings(args.nms, args.sigma, args.iou_threshold, args.score_threshold, args.max_detections,
                           args.class_agnostic)


class SourceArgs:
    """Where a detector comes from (`--onnx F | --engine P | --model d0 --weights W`) and what runs it
    (`--backend`); `build` gives the Detector."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Declare the source and runtime options."""
        from .backends import CPU_GRAPH_BACKENDS, DEFAULT_CPU_BACKEND
        parser.add_argument("--model", help="variant (with --weights or random init; default: d0)")
        parser.add_argument("--weights", help="checkpoint (ours or effdet's)")
        src = parser.add_mutually_exclusive_group()
        src.add_argument("--onnx", help="exported graph (its metadata JSON beside it)")
        src.add_argument("--engine", help="TensorRT plan from `edet-deploy build` (its JSON sidecar beside it); "
                                          "runs on the tensorrt backend (NVIDIA GPU + TensorRT 10.13 or 11.x)")
        parser.add_argument("--backend", choices=[*CPU_GRAPH_BACKENDS, "torch", "tensorrt"],
                            help=f"runtime (default: tensorrt with --engine, else {DEFAULT_CPU_BACKEND}); "
                                 f"onnxruntime / openvino export --model/--weights once into a cache when --onnx "
                                 f"is absent")
        parser.add_argument("--cuda-graph", action="store_true",
                            help="tensorrt: replay CUDA graphs (one per batch size)")
        parser.add_argument("--threads", type=THREADS, help="CPU threads (default: all cores)")
        precision = parser.add_mutually_exclusive_group()
        precision.add_argument("--bf16", action="store_true",
                               help="openvino: run the network in bfloat16 (CPUs with AVX512_BF16 or AMX; the "
                                    "default there). Faster, not bit-exact: accuracy in docs/cpu-backends.md")
        precision.add_argument("--f32", action="store_true",
                               help="openvino: run the network in float32, the parity reference (the default on "
                                    "CPUs without bf16 instructions)")

    @staticmethod
    def backend(args: argparse.Namespace) -> str:
        """The runtime in effect: --backend, else what the source implies."""
        from .backends import DEFAULT_CPU_BACKEND
        return args.backend or ("tensorrt" if args.engine else DEFAULT_CPU_BACKEND)

    @staticmethod
    def describe(args: argparse.Namespace) -> str:
        """One string naming the source, for reports."""
        return args.engine or args.onnx or f"{args.model or 'd0'}:{args.weights or 'random-init'}"

    @staticmethod
    def slug(args: argparse.Namespace) -> str:
        """The source as a file-name part: the graph's or engine's stem, else the variant and weights."""
        from pathlib import Path
        if args.engine or args.onnx:
            return Path(args.engine or args.onnx).stem
        return f"{args.model or 'd0'}_{Path(args.weights).stem if args.weights else 'random-init'}"

    def build(self, args: argparse.Namespace, min_score: float = 0.0) -> "Detector":
        """The Detector; a source and backend that do not go together is the user's error."""
        from .detector import Detector
        backend = self.backend(args)
        given = args.onnx and "--onnx" or args.engine and "--engine"
        ignored = [f for f, v in (("--model", args.model), ("--weights", args.weights)) if v is not None]
        if given and ignored:  # the graph or plan carries its variant and weights: a second source is a mistake
            raise EdetError(f"{' and '.join(ignored)} build a model from weights; {given} brings its own "
                            f"(leave {' and '.join(ignored)} out)")
        if args.cuda_graph and not args.engine:
            raise EdetError("--cuda-graph is for --engine (TensorRT); the CPU backends have no CUDA graphs")
        if args.bf16:
            from .backends import bf16_options
            bf16_options(backend, "--bf16")  # not ignored beside --engine
        if args.f32 and backend == "tensorrt":
            raise EdetError("--f32 is for the CPU backends (a TensorRT plan's precision is the graph's)")
        # None: the CPU's default (OpenVINO: bf16 where the CPU has it; the runner logs the choice and the CPU)
        bf16 = True if args.bf16 else False if args.f32 else None
        if args.engine:
            if backend != "tensorrt":
                raise EdetError("--engine runs on the tensorrt backend")
            return Detector.from_engine(args.engine, cuda_graph=args.cuda_graph, min_score=min_score)
        if backend == "tensorrt":
            raise EdetError("the tensorrt backend needs --engine (a plan from `edet-deploy build`)")
        if args.onnx:
            from .backends import CPU_GRAPH_BACKENDS
            if backend not in CPU_GRAPH_BACKENDS:
                raise EdetError(f"--onnx runs on the {' or '.join(CPU_GRAPH_BACKENDS)} backend")
            return Detector.from_onnx(args.onnx, backend=backend, threads=args.threads, min_score=min_score,
                                      bf16=bf16)
        return Detector.from_model(args.model or "d0", args.weights, backend=backend, threads=args.threads,
                                   min_score=min_score, bf16=bf16)


class ProgressArgs:
    """`--no-progress`; bars go to stderr and only to a terminal, so piped and tested outputs stay clean."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Declare the option."""
        parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    @staticmethod
    def build(args: argparse.Namespace) -> bool:
        """Whether to show progress bars."""
        return not args.no_progress and sys.stderr.isatty()


class JsonOutArgs:
    """`--json PATH` for the commands that report detections: PATH gets the JSON, and `-` prints it on stdout
    instead of the report (as `check --json` and `models --json` do)."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Declare the option."""
        parser.add_argument("--json", metavar="PATH", type=OutputPath(dash=True),
                            help="write all detections as JSON to PATH; '-' prints only the JSON on stdout")

    @staticmethod
    def to_stdout(args: argparse.Namespace) -> bool:
        """True when the JSON replaces the human-readable report on stdout."""
        return args.json == "-"

    def write(self, args: argparse.Namespace, report: Any) -> None:
        """Emit `report` where --json points (nothing without --json)."""
        if not args.json:
            return
        if self.to_stdout(args):
            print(json.dumps(report, indent=2))
            return
        from .io import write_json
        write_json(args.json, report)
        print(f"wrote {printable(args.json)}")


def printable(name: str | os.PathLike) -> str:
    """A file name for a line of text output: as it is, or escaped as Python's repr does when it holds a control
    character (a newline would split the line in two) or an undecodable byte (a lone surrogate, which stdout
    cannot encode). JSON output escapes these by itself."""
    text = os.fspath(name)
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in text):
        return repr(text)
    return text


def detection_report(images, results) -> list:
    """The JSON of `detect` and `client`: one entry per image with its detections (box, score, class_id,
    label)."""
    return [{"image": str(path), "detections": det.to_records()} for path, det in zip(images, results)]
