"""The committed CPU sweep: D0-D7x, eager PyTorch, ONNX Runtime and OpenVINO (FP32 and INT8-QDQ), batch 1.

    python benchmarks/sweep.py [--models d0-d7,d7x] [--seconds 20] [--out benchmarks/results/sweep]
    python benchmarks/sweep.py --merge-from build/sweep_ov   # add the rows of a partial run (bench --out DIR)

A thin wrapper around `edet-deploy bench`, which it calls with these settings. A full sweep takes hours on 2
cores: `--merge-from DIR` puts the rows of a smaller `edet-deploy bench` run (say d0-d2, onnxruntime and
openvino) into the committed results, replacing rows of the same model/backend/precision/batch and keeping
the rest; the reports then say which rows came from which run."""
import json
import sys
from pathlib import Path

from edet_deploy.cli import main

DEFAULTS = ["--models", "d0-d7,d7x", "--backends", "torch,onnxruntime,openvino,tensorrt", "--precisions",
            "fp32,int8", "--batch", "1", "--warmup", "1", "--seconds", "15", "--out", "benchmarks/results/sweep"]


def merge(partial: Path, into: Path) -> None:
    from edet_deploy.reports import merge_reports, write_reports
    base = json.loads((into / "bench.json").read_text())
    new = json.loads((partial / "bench.json").read_text())
    report = merge_reports(base, new)
    write_reports(report, into)
    print(f"merged {len(new['results'])} rows of {partial} into {into} ({len(report['results'])} rows)")


if __name__ == "__main__":
    args = sys.argv[1:]
    if "-h" in args or "--help" in args:  # never start an hours-long sweep when asked for help
        print(__doc__)
        sys.exit(0)
    if len(args) % 2 and args[:1] != ["--merge-from"]:
        print(f"sweep.py: error: options come as --flag value pairs, got {' '.join(args)}", file=sys.stderr)
        sys.exit(2)
    if args[:1] == ["--merge-from"]:
        merge(Path(args[1]), Path(args[3]) if args[2:3] == ["--out"] else Path(DEFAULTS[-1]))
        sys.exit(0)
    merged = list(DEFAULTS)
    for i in range(0, len(args) - 1, 2):  # later --flag value pairs override the defaults
        if args[i] in merged:
            merged[merged.index(args[i]) + 1] = args[i + 1]
        else:
            merged += [args[i], args[i + 1]]
    sys.exit(main(["bench", *merged]))
