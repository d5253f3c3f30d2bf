"""Regression cases found by fuzzing the command line (edge values on every option of every subcommand): each is
one line on stderr and exit 2, before any work, with nothing written; none needs an exported graph."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edet_deploy.cli import main


def _scene(tmp_path: Path) -> None:
    """An image, a stand-in graph + sidecar (never read: every case is refused first) and a named pipe."""
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.onnx").write_bytes(b"graph bytes")
    (tmp_path / "g" / "m.json").write_text("{}")
    (tmp_path / "repo").mkdir()
    os.mkfifo(tmp_path / "pipe.json")


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else stat.S_IFMT(p.lstat().st_mode))
            for p in root.rglob("*")}


CASES = {
    # A newline the user typed (a number or a path) split the refusal over two or three lines.
    "number-with-newline": (["detect", "a.jpg", "--onnx", "g/m.onnx", "--threads", "-5\n"],
                            "argument --threads: must be an integer in 1..4096, got -5 (see"),
    "number-after-newline": (["detect", "a.jpg", "--onnx", "g/m.onnx", "--min-score", "\n2"],
                             "argument --min-score: must be a number in 0..1, got 2 (see"),
    "artifact-name-with-newline": (["convert", "g/m.onnx", "--fp16", "--out", "o\nut.json"],
                                   r"argument --out: o\nut.json: that is the name of the metadata JSON"),
    "unknown-argument-with-newline": (["--no-such\nflag"], r"unrecognized arguments: --no-such\nflag (see"),
    # Decoded by the client: an image that does not decode was sent for (connection refused, exit 1) first.
    "client-decoded-not-an-image": (["client", "g/m.json", "--input-format", "decoded", "--url", "127.0.0.1:1"],
                                    "g/m.json: not a decodable image"),
    "clash-with-newline": (["detect", "a.jpg", "--onnx", "g/m.onnx", "--json", "x\ny.json", "--draw", "x\ny.json"],
                           r"--json x\ny.json and --draw x\ny.json would write the same file"),
    # A sigma above 0 that float32 rounds to 0: exit 0, then a graph every runner refused ("sigma must be > 0").
    "export-sigma-zero-in-float32": (["export", "--sigma", "1e-320", "--out", "x"],
                                     "argument --sigma: must be a number in >0, <=100, got 1e-320, which is 0 in "
                                     "the graph's float32"),
    # Outputs are renamed into place: a named pipe or a device (as root: /dev/null itself) became a plain file.
    "json-into-a-pipe": (["detect", "a.jpg", "--onnx", "g/m.onnx", "--json", "pipe.json"],
                         "argument --json: pipe.json is a device, pipe or socket, not a file: give a file path "
                         "(or - for standard output)"),
    "report-onto-dev-null": (["eval", "--onnx", "g/m.onnx", "--data", "nowhere", "--report", "/dev/null"],
                             "argument --report: /dev/null is a device, pipe or socket, not a file"),
    "graph-onto-dev-null": (["convert", "g/m.onnx", "--fp16", "--out", "/dev/null"],
                            "argument --out: /dev/null is a device, pipe or socket"),
    "json-to-dev-stdout": (["detect", "a.jpg", "--onnx", "g/m.onnx", "--json", "/dev/stdout"],
                           "argument --json: /dev/stdout"),
    "new-file-under-dev": (["detect", "a.jpg", "--onnx", "g/m.onnx", "--json", "/dev/edet-fuzz.json"],
                           "outputs are files, not entries of /dev"),
    # --sensitivity scores the val split: a --data without one left an empty sensitivity/ beside the graph.
    "calibrate-sensitivity-without-val-split": (["calibrate", "g/m.onnx", "--data", "g", "--sensitivity"],
                                                "no annotations for split 'val' under g"),
    # A checkpoint written under any name: --out model.onnx replaced an exported graph (and model.json its
    # metadata) with training weights, exit 0.
    "train-out-onto-a-graph": (["train", "--data", "nowhere", "--out", "g/m.onnx"],
                               "--out g/m.onnx is named like a graph, an engine or metadata, not a checkpoint (name it "
                               "m.safetensors)"),
    "train-out-onto-a-sidecar": (["train", "--data", "nowhere", "--out", "g/m.json"],
                                 "is named like a graph, an engine or metadata, not a checkpoint"),
    # build rewrites its timing cache after the plan: it replaced the plan, or the graph, it was given.
    "build-timing-cache-is-the-plan": (["build", "g/m.onnx", "--out", "e.plan", "--timing-cache", "e.plan"],
                                       "--out e.plan and --timing-cache e.plan would write the same file"),
    "build-timing-cache-is-the-graph": (["build", "g/m.onnx", "--out", "e.plan", "--timing-cache", "g/m.onnx"],
                                        "--timing-cache g/m.onnx would overwrite the input g/m.onnx"),
    "build-timing-cache-is-a-device": (["build", "g/m.onnx", "--out", "e.plan", "--timing-cache", "/dev/null"],
                                       "argument --timing-cache: /dev/null is a device, pipe or socket"),
    # Weights bench cannot read were a skipped row per combination, exit 1, after the graphs were exported.
    "bench-unreadable-weights": (["bench", "--models", "d0", "--weights", "g/m.onnx", "--out", "b"],
                                 "cannot read weights g/m.onnx: not a .pth / .safetensors checkpoint we can load"),
    # Two listeners on one port: the second failed to bind only after the models had loaded.
    "serve-one-port-twice": (["serve", "--repo", "repo", "--http-port", "9000", "--grpc-port", "9000"],
                             "--http-port and --grpc-port are both 9000: give each listener its own port"),
    "serve-metrics-on-the-http-port": (["serve", "--repo", "repo", "--metrics-port", "8000"],
                                       "--http-port and --metrics-port are both 8000"),
    # A --address typo was exit 1 with the resolver's bare words, naming neither the option nor the value.
    "serve-address-not-an-address": (["serve", "--repo", "repo", "--address", "999.1.1.1"],
                                     "--address '999.1.1.1' is not an IPv4 address this machine can listen on"),
    "serve-empty-address": (["serve", "--repo", "repo", "--address", ""],
                            "--address '' is not an IPv4 address this machine can listen on"),
    # Options the command would have ignored, exit 0.
    "triton-repo-cuda-graphs-on-cpu": (["triton-repo", "--onnx", "g/m.onnx", "--out", "r", "--cuda-graphs"],
                                       "--cuda-graphs is for --target gpu (a TensorRT plan); the CPU target "
                                       "ignores it"),
    "triton-repo-tensorrt-version-on-cpu": (["triton-repo", "--onnx", "g/m.onnx", "--out", "r",
                                             "--tensorrt-version", "10.13"], "--tensorrt-version is for --target gpu"),
    "triton-repo-weights-beside-onnx": (["triton-repo", "--onnx", "g/m.onnx", "--weights", "a.jpg", "--out", "r"],
                                        "--onnx brings its own (leave --weights out)"),
    "triton-repo-resign-with-generation-options": (["triton-repo", "--resign", "repo", "--onnx", "g/m.onnx",
                                                    "--max-batch", "4"],
                                                   "--resign only checks and re-signs repo; it generates nothing, so "
                                                   "--onnx, --max-batch would be ignored: leave them out"),
    "calibrate-max-loss-without-sensitivity": (["calibrate", "g/m.onnx", "--data", "nowhere", "--max-loss", "0.1"],
                                               "--max-loss only tunes --sensitivity"),
    "calibrate-eval-images-without-sensitivity": (["calibrate", "g/m.onnx", "--data", "nowhere", "--eval-images",
                                                   "3", "--max-loss", "0.1"],
                                                  "--eval-images and --max-loss only tune --sensitivity"),
    "bench-iters-beside-seconds": (["bench", "--seconds", "1", "--iters", "3", "--out", "b"],
                                   "--seconds times each combination instead of --iters: give one of them"),
    "bench-split-without-data": (["bench", "--split", "train", "--out", "b"],
                                 "--split only applies to the accuracy of --data"),
    "bench-eval-and-calib-images-without-data": (["bench", "--eval-images", "3", "--calib-images", "3", "--out", "b"],
                                                 "--eval-images and --calib-images only apply to the accuracy of "
                                                 "--data"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fuzzed_refusals_are_one_line_before_any_work(tmp_path, capsys, monkeypatch, case):
    argv, match = CASES[case]
    monkeypatch.chdir(tmp_path)
    _scene(tmp_path)
    before = _snapshot(tmp_path)
    null_before = os.stat("/dev/null")
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert err[0].startswith(f"edet-deploy{'' if argv[0].startswith('-') else ' ' + argv[0]}: error: "), err
    assert "Traceback" not in captured.err and "internal error" not in captured.err
    assert _snapshot(tmp_path) == before  # nothing written, the pipe still a pipe
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == null_before.st_rdev


def test_logs_still_go_to_devices_and_read_pipes(tmp_path, capsys):
    """The log file is appended to, never replaced: /dev/null and a named pipe with a reader stay accepted."""
    assert main(["--log-file", "/dev/null", "models"]) == 0
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert main(["--log-file", str(pipe), "models"]) == 0
    finally:
        os.close(reader)
    capsys.readouterr()
