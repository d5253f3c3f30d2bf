"""Every user error of the CLI we know of: one line on stderr, exit code 2, no traceback. Real files: a real
exported graph, then broken, tampered, missing or unwritable copies of it."""
import json
import re
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from edet_deploy.cli import main
from edet_deploy.measure import free_port


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("errs")
    torch.manual_seed(0)
    assert main(["export", "--model", "d0", "--image-size", "256", "--dynamic-batch", "8", "--out", str(d / "g")]) == 0
    good = d / "g" / "efficientdet_d0.onnx"
    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(d / "a.jpg")
    (d / "notes.txt").write_text("not an image")
    (d / "garbage.onnx").write_bytes(np.random.default_rng(0).bytes(4096))

    def variant(name, edit_graph=None, edit_meta=None, raw_meta=None):
        dst = d / name / "efficientdet_d0.onnx"
        dst.parent.mkdir()
        shutil.copyfile(good, dst)
        shutil.copyfile(good.with_suffix(".json"), dst.with_suffix(".json"))
        if edit_graph:
            data = bytearray(dst.read_bytes())
            data[len(data) // 2] ^= 0xFF  # one flipped byte inside a weight
            dst.write_bytes(bytes(data))
        if edit_meta:
            meta = json.loads(dst.with_suffix(".json").read_text())
            edit_meta(meta)
            dst.with_suffix(".json").write_text(json.dumps(meta))
        if raw_meta is not None:
            dst.with_suffix(".json").write_text(raw_meta)
        return dst

    paths = {
        "good": good, "img": d / "a.jpg", "txt": d / "notes.txt", "garbage": d / "garbage.onnx",
        "tampered_graph": variant("tg", edit_graph=True),
        "swapped_labels": variant("sl", edit_meta=lambda m: m.update(class_names=[f"x{i}" for i in range(90)])),
        "bad_json": variant("bj", raw_meta="{not json"),
        "list_json": variant("lj", raw_meta="[1, 2]"),
        "size_edit": variant("se", edit_meta=lambda m: m.update(image_size=512)),
    }
    repo = d / "repo"
    assert main(["triton-repo", "--model", "d0", "--onnx", str(good), "--out", str(repo)]) == 0
    foreign = d / "foreign_repo"
    shutil.copytree(repo, foreign)
    (foreign / "intruder" / "1").mkdir(parents=True)
    (foreign / "intruder" / "config.pbtxt").write_text('name: "intruder"\nbackend: "python"\n')
    (foreign / "intruder" / "1" / "model.py").write_text("import os\n")
    tampered_repo = d / "tampered_repo"
    shutil.copytree(repo, tampered_repo)
    engine = tampered_repo / "efficientdet_d0_engine" / "1" / "model.onnx"
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    paths.update(d=d, repo=repo, foreign_repo=foreign, tampered_repo=tampered_repo)
    return paths


# (command line built from the fixture's paths, what the one line must say)
CASES = {
    "detect-missing-image": (["detect", "{d}/missing.jpg", "--onnx", "{good}"], "image not found"),
    "detect-text-as-image": (["detect", "{txt}", "--onnx", "{good}"], "not a decodable image"),
    "detect-missing-graph": (["detect", "{img}", "--onnx", "{d}/none.onnx"], "not found"),
    "detect-garbage-graph": (["detect", "{img}", "--onnx", "{garbage}"], "cannot read .* as an ONNX graph"),
    "detect-tampered-graph": (["detect", "{img}", "--onnx", "{tampered_graph}"], "does not match its metadata"),
    "detect-swapped-labels": (["detect", "{img}", "--onnx", "{swapped_labels}"], "disagrees .*class_names"),
    "detect-edited-size": (["detect", "{img}", "--onnx", "{size_edit}"], "disagrees .*image_size"),
    "detect-invalid-sidecar": (["detect", "{img}", "--onnx", "{bad_json}"], "invalid metadata JSON"),
    "detect-sidecar-not-object": (["detect", "{img}", "--onnx", "{list_json}"], "must be a JSON object"),
    "detect-unwritable-json": (["detect", "{img}", "--onnx", "{good}", "--json", "/dev/null/d.json"],
                               "/dev/null is not a folder"),
    "detect-unwritable-draw": (["detect", "{img}", "--onnx", "{good}", "--draw", "/dev/null/d.png"],
                               "/dev/null is not a folder"),
    "export-unwritable-out": (["export", "--model", "d0", "--image-size", "128", "--out", "/dev/null/x"],
                              "/dev/null is not a folder"),
    "check-garbage": (["check", "{garbage}"], "cannot read"),
    "check-missing": (["check", "{d}/none.onnx"], "not found"),
    "convert-garbage": (["convert", "{garbage}", "--fp16", "--out", "{d}/c.onnx"], "cannot read .* as an ONNX graph"),
    "convert-tampered": (["convert", "{tampered_graph}", "--fp16", "--out", "{d}/c2.onnx"], "does not match"),
    "triton-repo-garbage": (["triton-repo", "--onnx", "{garbage}", "--out", "{d}/r1"], "cannot read .* as an ONNX"),
    "triton-repo-tampered": (["triton-repo", "--onnx", "{tampered_graph}", "--out", "{d}/r2"], "does not match"),
    "triton-repo-max-batch-0": (["triton-repo", "--onnx", "{good}", "--max-batch", "0", "--out", "{d}/r3"],
                                "--max-batch: must be an integer in 1\\.\\.1024, got 0"),
    "triton-repo-max-batch-negative": (["triton-repo", "--onnx", "{good}", "--max-batch", "-3", "--out", "{d}/r4"],
                                       "--max-batch: must be an integer in 1\\.\\.1024, got -3"),
    "triton-repo-foreign-out": (["triton-repo", "--onnx", "{good}", "--out", "{foreign_repo}"],
                                "did not generate.*intruder"),
    "triton-repo-negative-queue-delay": (["triton-repo", "--onnx", "{good}", "--queue-delay-us", "-5", "--out",
                                         "{d}/r5"], "queue-delay-us: must be an integer in 0\\.\\.10000000, got -5"),
    "triton-repo-out-is-file": (["triton-repo", "--onnx", "{good}", "--out", "{img}"], "is a file"),
    "serve-missing-repo": (["serve", "--repo", "{d}/no_repo"], "no models"),
    "serve-foreign-model": (["serve", "--repo", "{foreign_repo}"], "did not generate.*intruder"),
    "serve-tampered-graph": (["serve", "--repo", "{tampered_repo}"], "does not match its metadata"),
    "serve-unknown-api-group": (["serve", "--repo", "{repo}", "--open-api", "everything"], "unknown API group"),
    "client-missing-image": (["client", "{d}/missing.jpg"], "image not found"),
    "client-unknown-scheme": (["client", "{img}", "--url", "ftp://127.0.0.1:{port}"], "unknown scheme ftp://"),
    "client-not-host-port": (["client", "{img}", "--url", "bad url::"], "not host:port"),
    "client-scheme-vs-protocol": (["client", "{img}", "--url", "grpc://127.0.0.1:{port}", "--protocol", "http"],
                                  "is grpc, but --protocol is http"),
    "eval-missing-data": (["eval", "--onnx", "{good}", "--data", "{d}/no_data"], "not found"),
}


def _assert_one_line_error(files, argv, pattern, code, capsys):
    values = {k: str(v) for k, v in files.items()}
    values["port"] = str(free_port())  # nothing listens there
    argv = [a.format(**values) for a in argv]
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if not ln.startswith(("INFO ", "WARNING ", "DEBUG "))]
    assert rc == code, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"edet-deploy {argv[0]}: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_is_one_line_exit_2(files, case, capsys):
    _assert_one_line_error(files, *CASES[case], 2, capsys)


# Failures the input did not cause: one line, exit code 1.
RUNTIME_CASES = {
    "client-http-no-server": (["client", "{img}", "--url", "127.0.0.1:{port}", "--protocol", "http"],
                              "cannot reach a Triton server"),
    "client-grpc-no-server": (["client", "{img}", "--url", "127.0.0.1:{port}", "--protocol", "grpc"],
                              "cannot reach a Triton server"),
    "client-http-prefix-no-server": (["client", "{img}", "--url", "http://127.0.0.1:{port}"],
                                     "cannot reach a Triton server at http://.* over http"),
    "client-grpc-prefix-no-server": (["client", "{img}", "--url", "grpc://127.0.0.1:{port}"],
                                     "cannot reach a Triton server at grpc://.* over grpc"),
}


@pytest.mark.parametrize("case", sorted(RUNTIME_CASES))
def test_runtime_error_is_one_line_exit_1(files, case, capsys):
    _assert_one_line_error(files, *RUNTIME_CASES[case], 1, capsys)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    """The installed command as a user runs it: a traceback or an exception in interpreter shutdown (the HTTP
    client's destructor) shows here, where main() in-process would hide it."""
    return subprocess.run([sys.executable, "-m", "edet_deploy", *argv], capture_output=True, text=True, timeout=300)


@pytest.fixture
def closing_server():
    """A port whose listener accepts each connection, reads the request and hangs up: a server that goes away
    mid-call."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


@pytest.mark.parametrize("url,code,pattern", [
    ("http://localhost:{port}", 1, "cannot reach a Triton server at http://localhost:.* over http"),
    ("grpc://127.0.0.1:{port}", 1, "cannot reach a Triton server"),
    ("127.0.0.1:{closing}", 1, "cannot reach a Triton server .*connection closed"),
    ("grpc://127.0.0.1:{closing}", 1, "cannot reach a Triton server"),
    ("http://bad url::", 2, "not host:port"),
    ("unix:///tmp/triton.sock", 2, "unknown scheme unix://"),
])
def test_client_command_without_a_server_is_one_line(files, closing_server, url, code, pattern):
    proc = _cli("client", str(files["img"]), "--url", url.format(port=free_port(), closing=closing_server))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(pattern, lines[0]), lines[0]
