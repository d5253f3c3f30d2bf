"""Interruptions and races: Ctrl-C, SIGTERM, a second command writing the same output, an output folder removed
while a command writes it. Whatever happens, the output is absent, the previous one or a complete new one, no
temporary file or folder is left, and stderr is one line (130 for Ctrl-C, 128 + the signal for SIGTERM/SIGHUP).
The signal tests wait for a file to appear, never a fixed time, so they hold on a loaded machine."""
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edet_deploy import cli
from edet_deploy.errors import EdetRuntimeError
from edet_deploy.io import atomic_path, signals_deferred, staged_directory

ROOT = Path(__file__).resolve().parent.parent


def _make_shapes(out: Path, train: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edet_deploy", "make-shapes", "--out", str(out), "--train",
                             str(train), "--val", "0", "--calib", "0", *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the marker never appeared"
        time.sleep(0.02)


def _staged_images(where: Path) -> bool:
    """make-shapes has written an image into its staging folder (beside --out, or hidden inside it)."""
    return any(where.glob(".*.tmp/images/train/*.jpg")) or any(where.glob("*/.edet-staging.*/images/train/*.jpg"))


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("sig, code, line", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                             (signal.SIGHUP, 129, "terminated (SIGHUP)")])
def test_sigterm_unwinds_like_ctrl_c(tmp_path, sig, code, line):
    """SIGTERM's default action killed the command on the spot: exit -15, nothing said, the staging folder left
    beside --out (and inside it, over an earlier dataset, for every later run to carry)."""
    proc = _make_shapes(tmp_path / "s", 200_000)
    try:
        _wait_for(lambda: _staged_images(tmp_path), proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == code and err.strip() == line, (proc.returncode, err)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_sigterm_over_an_earlier_dataset_keeps_it_whole(tmp_path):
    out = tmp_path / "s"
    first = _make_shapes(out, 3, "--seed", "1")
    assert first.wait(120) == 0, first.communicate()
    first.communicate()
    before = _files(out)
    proc = _make_shapes(out, 200_000)
    try:
        _wait_for(lambda: _staged_images(tmp_path), proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == 143 and err.strip() == "terminated (SIGTERM)", err
    assert _files(out) == before and [p.name for p in tmp_path.iterdir()] == ["s"]
    assert not [p for p in out.iterdir() if p.name.startswith((".edet-staging", ".edet-replaced"))]  # nor inside


def test_two_make_shapes_into_one_new_folder(tmp_path):
    """Both finish with the complete dataset, or the later one refuses in one line (never a temporary name, never
    a mixed folder)."""
    out = tmp_path / "s"
    procs = [_make_shapes(out, 20) for _ in range(2)]
    results = [(p.wait(120), p.communicate()[1]) for p in procs]
    assert any(code == 0 for code, _ in results), results
    for code, err in results:
        if code:
            assert code == 1 and len(err.strip().splitlines()) == 1 and "appeared while" in err, err
            assert ".tmp" not in err
    assert sorted(_files(out)) == sorted([".edet-shapes.json", "instances_train.json",
                                          *(f"images/train/{i:06d}.jpg" for i in range(20))])
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_output_removed_while_staged_is_one_runtime_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(EdetRuntimeError, match="removed or replaced while"):
        with staged_directory(out) as stage:
            (stage / "a").mkdir()
            for p in sorted(out.rglob("*"), reverse=True):  # `rm -r out; mkdir out` by someone else
                p.rmdir() if p.is_dir() else p.unlink()
            (stage / "a" / "b.txt").write_text("new")  # the folder it lay in is gone
    assert list(out.iterdir()) == []


def test_output_made_by_another_command_meanwhile_is_left_alone(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(EdetRuntimeError, match="appeared while"):
        with staged_directory(out) as stage:
            (stage / "new.txt").write_text("new")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert _files(out) == {"theirs.txt": b"theirs"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_signals_deferred_holds_ctrl_c_until_the_block_ends(tmp_path):
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here: it only notes the signal
            reached.append(True)
    assert reached == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_ctrl_c_during_the_rename_lands_after_it(tmp_path, monkeypatch):
    """A Ctrl-C while atomic_path moves the file into place: the file is whole and in place, no temporary is
    left, and the interruption still reaches the caller."""
    target = tmp_path / "out.json"
    real_replace = os.replace

    def interrupted_replace(src, dst):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("complete")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"] and target.read_text() == "complete"


def test_signal_inside_a_native_callback_is_delivered_after_it(monkeypatch):
    """ONNX Runtime calls our soft-NMS op (onnxruntime_extensions) from C++: a KeyboardInterrupt raised there ended
    in std::terminate (SIGABRT, a core dump) instead of exit 130. The handler lets the callback finish and the
    signal comes again once Python of ours runs."""
    monkeypatch.setattr(cli, "_REDELIVER_S", 0.01)
    callback_ns = {"os": os, "signal": signal, "time": time}
    exec(compile("def callback():\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(0.05)\n    return 'done'\n",
                 "/site-packages/onnxruntime_extensions/_ocos.py", "exec"), callback_ns)
    replaced = cli._catch_stops()
    try:
        assert callback_ns["callback"]() == "done"  # no exception inside it
        with pytest.raises(KeyboardInterrupt):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        for sig, handler in replaced.items():
            signal.signal(sig, handler)
        for t in threading.enumerate():  # the re-delivery timer, if it is still about
            if isinstance(t, threading.Timer):
                t.cancel()


def test_interrupted_bench_leaves_no_earlier_plots_beside_its_tables(tmp_path, monkeypatch):
    """A sweep stopped after its first row: the tables hold that row and the plots of an earlier run are gone
    (they described other measurements)."""
    from edet_deploy import bench

    out = tmp_path / "b"
    out.mkdir()
    for name in ("bench.json", "bench.csv", "bench.md", *bench.PLOTS):
        (out / name).write_text(f"previous {name}")
    calls = []

    def fake_run(self, model, backend, precision, batch, max_batch):
        calls.append(batch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return bench.Result(model, backend, precision, batch, image_size=512, threads=1, model_p50_ms=1.0,
                            pipeline_p50_ms=2.0, throughput_img_s=3.0, iterations=3)

    monkeypatch.setattr(bench.Bench, "run", fake_run)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(["d0"], ["onnxruntime"], ["fp32"], [1, 2], out, warmup=0, iters=3, progress=False)
    assert not [p for p in bench.PLOTS if (out / p).exists()]
    assert '"batch": 1' in (out / "bench.json").read_text() and '"batch": 2' not in (out / "bench.json").read_text()
    assert "previous" not in (out / "bench.csv").read_text() + (out / "bench.md").read_text()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_triton_repo_signs_in_its_stage_keeps_earlier_models_signed_and_skips_another_commands_stage(
        tmp_path, random_d0_256, monkeypatch):
    """The manifest is written in the staging folder and moves in with the models (an interruption between the two
    left a repository `serve` refused: 'edet_manifest.sha256 is missing'); a model of the earlier repository that
    stays is signed with them; the staging folder of another triton-repo writing the same repository is neither
    a model nor something 'edet-deploy did not generate'."""
    import shutil

    from edet_deploy.triton import repo as repo_module
    from edet_deploy.triton import verify
    from edet_deploy.triton.repo import generate_repository

    out = tmp_path / "repo"
    generate_repository(out, variant="d0", onnx=str(random_d0_256))
    shutil.copytree(out / "efficientdet_d0_postprocess", out / "kept_postprocess")  # an earlier model that stays
    verify.write_manifest(out)
    signed_in = []
    real_write = verify.write_manifest
    monkeypatch.setattr(repo_module, "write_manifest",
                        lambda repo, kept_from=None: signed_in.append(Path(repo)) or real_write(repo, kept_from))
    generate_repository(out, variant="d0", onnx=str(random_d0_256))
    assert len(signed_in) == 1 and signed_in[0] != out and not signed_in[0].exists()  # the stage, moved away
    manifest = verify.read_manifest(out)
    assert "kept_postprocess/config.pbtxt" in manifest and "efficientdet_d0_engine/1/model.onnx" in manifest
    verify.verify_served_repository(out)
    (out / ".edet-staging.abc123.tmp" / "efficientdet_d0_engine").mkdir(parents=True)  # another command, now
    assert ".edet-staging.abc123.tmp" not in verify.model_dirs(out)
    assert not any(e.startswith(".edet") for e in verify.foreign_entries(out))


@pytest.mark.server
def test_ctrl_c_while_tritonserver_starts_leaves_no_process_or_region(tmp_path, random_d0_256):
    """`demo` and the benchmarks start tritonserver themselves: a Ctrl-C while its models load used to leave the
    stubs already started running under init, each holding a /dev/shm region."""
    pytest.importorskip("pytriton")
    from edet_deploy.triton.repo import generate_repository
    from edet_deploy.triton.supervisor import child_processes

    repo = generate_repository(tmp_path / "repo", variant="d0", onnx=str(random_d0_256))
    script = ("import sys; from edet_deploy.cli import _catch_stops; from edet_deploy.measure import free_port; "
              "from edet_deploy.triton.server import TritonServer; _catch_stops(); "
              f"TritonServer({str(repo)!r}, free_port(), free_port(), free_port()).start(timeout=300)")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    triton: list = []
    try:
        _wait_for(lambda: triton.extend(pid for pid, argv in child_processes(proc.pid)
                                        if argv[0].endswith(b"/tritonserver")) or triton, proc)
        _wait_for(lambda: child_processes(triton[0]), proc)  # a stub started: a model is loading
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) != 0
        deadline = time.monotonic() + 20  # a stub ends within its health poll once its server is gone
        while (_group(triton[0]) or _regions(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _group(triton[0]) == [] and _regions(proc.pid) == [], proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for pid in _group(triton[0]) if triton else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for region in _regions(proc.pid):
            region.unlink(missing_ok=True)
        proc.stderr.close()


def _group(pgid: int) -> list:
    """Live processes of process group `pgid` (zombies aside), from /proc."""
    from edet_deploy.triton.supervisor import _proc_state

    found = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pgid and _proc_state(pid) not in (None, "Z", "X"):
                found.append(pid)
    return found


def _regions(pid: int) -> list:
    from edet_deploy.triton.server import SHM_PREFIX

    return list(Path("/dev/shm").glob(f"{SHM_PREFIX}{pid}_*"))
