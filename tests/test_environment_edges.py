"""A machine unlike the developer's: the cache folder (unset, empty, relative, a file, no home, a read-only home),
a clone or venv at a path with spaces and non-ASCII letters (Triton's Python-backend stubs take neither), two
servers starting at once on a fresh cache."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from edet_deploy import contract
from edet_deploy.errors import EdetRuntimeError
from edet_deploy.triton import server as triton_server
from edet_deploy.triton.server import SYS_PATH_ENV, TritonServer, find_triton, plain_path, server_env

ODD = "my projects/ünï cödé"  # a space and non-ASCII letters, as in a user's clone


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """tempfile's folder for this test alone (the cache's fallback lives there)."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


# --- the cache folder ---------------------------------------------------------------------------------------------

def test_empty_or_relative_cache_setting(monkeypatch, tmp_path):
    """An empty EDET_DEPLOY_CACHE is unset (it cached into the working folder); a relative one is made absolute
    (Triton's stubs run in '/', where it named another folder)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EDET_DEPLOY_CACHE", "")
    monkeypatch.chdir(tmp_path)
    assert contract.cache_dir() == tmp_path / "home" / ".cache" / "edet_deploy"
    monkeypatch.setenv("EDET_DEPLOY_CACHE", "rel/cache")
    assert contract.cache_dir() == tmp_path / "rel" / "cache" and (tmp_path / "rel" / "cache").is_dir()


@pytest.mark.parametrize("where, problem", [("a_file", "it is a file, not a folder"),
                                            ("a_file/sub", "cannot create it: Not a directory")])
def test_unusable_cache_setting_is_one_line_exit_1(monkeypatch, tmp_path, where, problem):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("EDET_DEPLOY_CACHE", str(tmp_path / where))
    with pytest.raises(EdetRuntimeError) as err:
        contract.cache_dir()
    message = str(err.value)
    assert err.value.exit_code == 1 and "\n" not in message
    assert message.startswith(f"EDET_DEPLOY_CACHE={tmp_path / where} ") and problem in message
    assert (tmp_path / "a_file").read_text() == "x"


def test_read_only_cache_setting_is_refused(monkeypatch, tmp_path):
    """A folder the user cannot write: mode 0555 for a user; for root, who writes there anyway, a read-only mount
    (a container's read-only volume)."""
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    root = os.geteuid() == 0
    if root:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True,
                              text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.strip()}")
    else:
        ro.chmod(0o555)
    try:
        monkeypatch.setenv("EDET_DEPLOY_CACHE", str(ro))
        with pytest.raises(EdetRuntimeError, match="it is not writable"):
            contract.cache_dir()
    finally:
        if root:
            subprocess.run(["umount", "-l", str(ro)], check=False)
        else:
            ro.chmod(0o755)


def test_cli_says_an_unusable_cache_in_one_line(tmp_path, monkeypatch, capsys, random_d0_256):
    """What the user sees from `detect` (its OpenVINO cache): one line, exit 1 (the environment, not the command
    line), no traceback; it was 'cannot access .../openvino: Not a directory', exit 2."""
    from PIL import Image

    from edet_deploy.cli import main

    (tmp_path / "a_file").write_text("x")
    Image.new("RGB", (64, 48)).save(tmp_path / "scene.png")
    monkeypatch.setenv("EDET_DEPLOY_CACHE", str(tmp_path / "a_file"))
    assert main(["detect", str(tmp_path / "scene.png"), "--onnx", str(random_d0_256), "--backend", "openvino",
                 "--f32"]) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "edet-deploy" in ln]
    assert len(lines) == 1 and "EDET_DEPLOY_CACHE=" in lines[0] and "it is a file" in lines[0], lines
    assert "internal error" not in lines[0]


def test_unknown_home_falls_back_to_a_private_temporary_cache(monkeypatch, private_tmp, caplog):
    """A container's arbitrary uid: no HOME, no passwd entry (Path.home() raises). The cache only saves time: a
    private folder under the temporary one, said once, instead of an internal error."""
    monkeypatch.delenv("EDET_DEPLOY_CACHE", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    monkeypatch.setattr(contract, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="edet_deploy"):
        first, second = contract.cache_dir(), contract.cache_dir()
    assert first == second == private_tmp / f"edet_deploy-cache-{os.getuid()}"
    assert first.is_dir() and (first.stat().st_mode & 0o777) == 0o700
    said = [r.getMessage() for r in caplog.records if "caching in" in r.getMessage()]
    assert len(said) == 1 and "home folder is unknown" in said[0]


def test_unusable_home_cache_falls_back(monkeypatch, tmp_path, private_tmp):
    """A home where ~/.cache cannot be made (here: HOME is a file) falls back the same way."""
    (tmp_path / "home").write_text("not a folder")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EDET_DEPLOY_CACHE", raising=False)
    assert contract.cache_dir() == private_tmp / f"edet_deploy-cache-{os.getuid()}"


def test_fallback_refuses_a_planted_link(monkeypatch, tmp_path, private_tmp):
    """The temporary folder is shared: a link someone planted at the fallback's name is not followed."""
    (tmp_path / "home").write_text("not a folder")
    (tmp_path / "elsewhere").mkdir()
    (private_tmp / f"edet_deploy-cache-{os.getuid()}").symlink_to(tmp_path / "elsewhere")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EDET_DEPLOY_CACHE", raising=False)
    with pytest.raises(EdetRuntimeError, match="set EDET_DEPLOY_CACHE to a writable folder"):
        contract.cache_dir()


# --- Triton's backend folder, its environment and the plain paths its stubs need -----------------------------------

def test_plain_path():
    assert plain_path("/tmp/pytest-of-root/pytest-3/repo_0/efficientdet_d0.int8-minmax")
    for odd in (f"/tmp/{ODD}", "/tmp/a b", "/tmp/ünï", "/tmp/a:b", "/tmp/a$b", "/tmp/a'b", "/tmp/a;b", ""):
        assert not plain_path(odd), odd


def test_backend_folder_assembled_by_servers_starting_at_once(monkeypatch, tmp_path):
    """Two `serve`s starting on a fresh cache raced on the stub links (FileExistsError, an internal error)."""
    pytest.importorskip("pytriton")
    monkeypatch.delenv("EDET_TRITONSERVER", raising=False)
    for trial in range(5):
        monkeypatch.setenv("EDET_DEPLOY_CACHE", str(tmp_path / f"cache{trial}"))
        errors, found = [], []
        barrier = threading.Barrier(4)

        def assemble():
            barrier.wait()
            try:
                found.append(find_triton())
            except Exception as e:  # noqa: BLE001 - collected for the assertion
                errors.append(e)

        threads = [threading.Thread(target=assemble) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        python_dir = found[0].backends / "python"
        links = sorted(p.name for p in python_dir.iterdir())
        assert "triton_python_backend_stub" in links and not [n for n in links if n.startswith(".")]
        assert all((python_dir / n).resolve().exists() for n in links)


def test_stub_environment_caches_are_absolute(monkeypatch, tmp_path):
    """The stubs get the cache with a relative setting resolved (they run in '/'); their numba cache follows it
    where the install cannot be written (`contract.point_numba_cache`, run in the stub)."""
    pytest.importorskip("pytriton")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDET_DEPLOY_CACHE", "cache")
    monkeypatch.delenv("EDET_TRITONSERVER", raising=False)
    env = server_env(find_triton())
    assert env["EDET_DEPLOY_CACHE"] == str(tmp_path / "cache")


def _server_at_odd_paths(tmp_path, monkeypatch):
    """A TritonServer on a repository, a cache and a project root at paths with a space and non-ASCII letters
    (the repository is a stand-in: validation is not what this checks)."""
    pytest.importorskip("pytriton")
    monkeypatch.delenv("EDET_TRITONSERVER", raising=False)
    odd = tmp_path / ODD
    (odd / "repo").mkdir(parents=True)
    (odd / "root").symlink_to(Path(triton_server.__file__).resolve().parents[2], target_is_directory=True)
    monkeypatch.setenv("EDET_DEPLOY_CACHE", str(odd / "cache"))
    import edet_deploy.triton.verify as verify
    monkeypatch.setattr(verify, "validate_repository", lambda repo: None)
    monkeypatch.setattr(verify, "verify_served_repository", lambda repo, force=False: None)
    server = TritonServer(odd / "repo")
    server.env[SYS_PATH_ENV] = os.pathsep.join([str(odd / "root"), server.env[SYS_PATH_ENV]])
    return server, odd


def test_odd_paths_reach_triton_as_plain_links_and_go_at_stop(tmp_path, monkeypatch):
    """A clone in "my projects/ünï cödé/": Triton's stub command line split at the space ("what(): stol") and the
    stub's ASCII Python died on the non-ASCII sys.path (pybind11 cast_error). Triton and the stubs are given plain
    links instead; stop() removes them and puts the environment back."""
    server, odd = _server_at_odd_paths(tmp_path, monkeypatch)
    before = dict(server.env)
    try:
        server._link_unsafe_paths()
        cmd = server.cmd
        repo_arg = next(a for a in cmd if a.startswith("--model-repository="))
        seen = [Path(repo_arg.split("=", 1)[1]), server.triton_backends,
                *map(Path, server.env[SYS_PATH_ENV].split(os.pathsep)), Path(server.env["EDET_DEPLOY_CACHE"])]
        assert all(plain_path(p) for p in seen), seen
        assert Path(repo_arg.split("=", 1)[1]).resolve() == (odd / "repo").resolve()
        assert Path(server.env["EDET_DEPLOY_CACHE"]).resolve() == (odd / "cache").resolve()
        assert Path(server.env[SYS_PATH_ENV].split(os.pathsep)[0]).resolve() == (odd / "root").resolve()
        links = server.links
        assert links is not None and links.is_dir()
    finally:
        server.stop()
    assert not links.exists() and server.links is None
    assert server.env == before and f"--model-repository={(odd / 'repo').resolve()}" in server.cmd


def test_plain_paths_are_given_as_they_are(tmp_path, monkeypatch):
    """Nothing to link (the developer's machine): no link folder, the command line unchanged."""
    pytest.importorskip("pytriton")
    monkeypatch.delenv("EDET_TRITONSERVER", raising=False)
    monkeypatch.setenv("EDET_DEPLOY_CACHE", str(tmp_path / "cache"))
    import edet_deploy.triton.verify as verify
    monkeypatch.setattr(verify, "validate_repository", lambda repo: None)
    monkeypatch.setattr(verify, "verify_served_repository", lambda repo, force=False: None)
    (tmp_path / "repo").mkdir()
    server = TritonServer(tmp_path / "repo")
    server.env[SYS_PATH_ENV] = str(tmp_path)  # a plain project root, whatever this checkout's path
    before = dict(server.env)
    server._link_unsafe_paths()
    try:
        assert server.links is None and server.env == before
        assert f"--model-repository={(tmp_path / 'repo').resolve()}" in server.cmd
    finally:
        server.stop()


def test_no_plain_temporary_folder_is_one_line(tmp_path, monkeypatch):
    server, _ = _server_at_odd_paths(tmp_path, monkeypatch)
    monkeypatch.setattr(triton_server, "plain_path", lambda p: False)
    monkeypatch.setattr(triton_server, "check_port", lambda *a: None)
    with pytest.raises(EdetRuntimeError, match="no writable temporary folder without them"):
        server.start(timeout=1)
    assert server.proc is None and server.links is None


def test_start_failure_names_the_stub_crash_not_the_cuda_line(tmp_path):
    """On CPU every log has 'CudaDriverHelper has not been initialized.': the one-line reason was that, while the
    stubs had died ("terminate called ... what(): stol")."""
    log = tmp_path / "triton.log"
    log.write_text('E1206 16:19:50.286423 1 server.cc:241] "CudaDriverHelper has not been initialized."\n'
                   "I1206 16:19:50.287833 1 model_lifecycle.cc:472] \"loading: m:1\"\n"
                   "terminate called after throwing an instance of 'std::invalid_argument'\n  what():  stol\n")
    server = TritonServer.__new__(TritonServer)
    server.log_file = log
    tail = server._log_tail()
    assert "CudaDriverHelper" not in tail and "std::invalid_argument" in tail and "stol" in tail
    assert "\n" not in tail


@pytest.mark.server
def test_served_from_odd_paths(tmp_path, monkeypatch, random_d0_256):
    """The real thing: a repository, a cache and a project root at paths with a space and non-ASCII letters load
    in tritonserver (every stub, the OpenVINO engine's included), and nothing is left after stop()."""
    from edet_deploy.triton.repo import generate_repository
    from edet_deploy.triton.supervisor import free_port

    pytest.importorskip("pytriton")
    monkeypatch.delenv("EDET_TRITONSERVER", raising=False)
    odd = tmp_path / ODD
    odd.mkdir(parents=True)
    (odd / "root").symlink_to(Path(triton_server.__file__).resolve().parents[2], target_is_directory=True)
    monkeypatch.setenv("EDET_DEPLOY_CACHE", str(odd / "cache"))
    repo = generate_repository(odd / "repo", variant="d0", onnx=str(random_d0_256), max_batch_size=8)
    server = TritonServer(repo, free_port(), free_port(), free_port(), log_file=tmp_path / "triton.log")
    server.env[SYS_PATH_ENV] = os.pathsep.join([str(odd / "root"), server.env[SYS_PATH_ENV]])
    try:
        server.start(timeout=120)
        assert server.ready() and server.links is not None
        links = server.links
    finally:
        server.stop()
    assert not links.exists() and not server.shm_regions()
    assert server.proc.poll() is not None
    shutil.rmtree(odd, ignore_errors=True)


def test_numba_caches_into_ours_when_the_install_is_read_only(monkeypatch, tmp_path):
    """An install the user cannot write (system-wide) and no usable home left numba no place for the soft-NMS
    kernels ("cannot cache function"): its cache goes into ours then, and only then."""
    monkeypatch.setenv("EDET_DEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NUMBA_CACHE_DIR", "unset below")
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    contract.point_numba_cache()
    assert "NUMBA_CACHE_DIR" not in os.environ  # this checkout is writable: numba's own place
    package = str(Path(contract.__file__).parent)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == package else real_access(p, mode))
    contract.point_numba_cache()
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "cache" / "numba")
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/chosen")
    contract.point_numba_cache()
    assert os.environ["NUMBA_CACHE_DIR"] == "/chosen"  # the user's choice stays


def test_openvino_that_cannot_start_is_one_line(monkeypatch):
    """OpenVINO looks the home folder up when imported: a container's arbitrary uid without HOME made detect an
    internal error ("Could not determine home directory")."""
    import builtins

    from edet_deploy.backends import openvino as openvino_backend

    real_import = builtins.__import__

    def no_home(name, *args, **kwargs):
        if name == "openvino":
            raise RuntimeError("Could not determine home directory.")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_home)
    with pytest.raises(EdetRuntimeError, match=r"^OpenVINO cannot start here: Could not determine home directory\. "
                                              r"\(set HOME to a folder\)$"):
        openvino_backend.import_openvino()
    with pytest.raises(EdetRuntimeError):
        openvino_backend.cpu_has_bf16()


def test_link_folder_of_a_killed_server_is_removed_by_the_next(tmp_path, monkeypatch):
    """A SIGKILLed serve leaves its link folder; the next server that needs one removes it (nobody holds its
    lock: that holds across containers sharing a /tmp, where pids do not), never a folder a live server holds
    nor what the links point to."""
    import fcntl
    import subprocess
    import sys

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    target = tmp_path / "target"
    target.mkdir()
    (target / "kept").write_text("x")
    live, live_lock = triton_server._link_folder()  # held by this process
    (live / "repository").symlink_to(target, target_is_directory=True)
    # A server killed with its folder in place: made in a child that exits holding the lock.
    made = subprocess.run([sys.executable, "-c", "import tempfile, sys; tempfile.tempdir = sys.argv[1]; "
                           "from edet_deploy.triton.server import _link_folder; print(_link_folder()[0])",
                           str(tmp_path)], capture_output=True, text=True, check=True).stdout.strip()
    stale = Path(made)
    (stale / "repository").symlink_to(target, target_is_directory=True)
    try:
        fresh, fresh_lock = triton_server._link_folder()
        os.close(fresh_lock)
        assert fresh.name.startswith(f"edet-triton-{os.getpid()}-") and fresh.parent == tmp_path
        assert not stale.exists() and live.exists() and (target / "kept").read_text() == "x"
    finally:
        os.close(live_lock)
