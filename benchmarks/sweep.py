"""The committed CPU sweep: D0-D7x, eager PyTorch and ONNX Runtime (FP32 and INT8-QDQ), batch 1.

    python benchmarks/sweep.py [--models d0-d7,d7x] [--seconds 20] [--out benchmarks/results/sweep]

A thin wrapper around `edet-deploy bench`, which it calls with these settings."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edet_deploy.cli import main  # noqa: E402

DEFAULTS = ["--models", "d0-d7,d7x", "--backends", "torch,onnxruntime,tensorrt", "--precisions", "fp32,int8",
            "--batch", "1", "--warmup", "1", "--seconds", "15", "--out", "benchmarks/results/sweep"]

if __name__ == "__main__":
    args = sys.argv[1:]
    merged = list(DEFAULTS)
    for i in range(0, len(args) - 1, 2):  # later --flag value pairs override the defaults
        if args[i] in merged:
            merged[merged.index(args[i]) + 1] = args[i + 1]
        else:
            merged += [args[i], args[i + 1]]
    sys.exit(main(["bench", *merged]))
