"""Writing onto a full disk, on a real small filesystem (a tmpfs; mounting one needs root, else skipped): one line
naming the user's output, exit 1, and the output as it was, with no temporary file behind."""
import contextlib
import errno
import subprocess
from pathlib import Path

import pytest

from edet_deploy.cli import main


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    with _tmpfs(tmp_path / "disk", "256k") as disk:
        yield disk


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_naming(capsys, path: Path) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write {path}: No space left on device" in err, err
    return err


def test_make_shapes_on_a_full_disk(small_disk, capsys):
    out = small_disk / "shapes"
    assert main(["-q", "make-shapes", "--out", str(out), "--train", "40", "--val", "0", "--calib", "0",
                 "--no-progress"]) == 1
    _one_line_naming(capsys, out)
    assert list(small_disk.iterdir()) == []


def test_triton_repo_on_a_full_disk_leaves_the_earlier_repository(small_disk, random_d0_256, capsys):
    from edet_deploy.triton.repo import generate_repository
    from edet_deploy.triton.verify import model_problems

    out = small_disk / "repo"
    assert main(["-q", "triton-repo", "--onnx", str(random_d0_256), "--out", str(out)]) == 1
    _one_line_naming(capsys, out)
    assert list(small_disk.iterdir()) == []

    # An earlier repository (configs only: the graph does not fit) survives a regeneration that runs out of room.
    generate_repository(out, onnx=str(random_d0_256), copy_artifact=False)
    before = _files(out)
    assert main(["-q", "triton-repo", "--onnx", str(random_d0_256), "--out", str(out)]) == 1
    _one_line_naming(capsys, out)
    assert _files(out) == before and sorted(p.name for p in small_disk.iterdir()) == ["repo"]
    assert not [p for p in out.iterdir() if p.name.startswith(".edet-")]
    assert model_problems(out) == {}  # still signed and whole


def test_triton_repo_into_a_mount_point(tmp_path, random_d0_256, capsys):
    """A repository generated straight into a mounted volume (`-v host:/models`): the mount point cannot be
    renamed, so the finished models move into it one by one; a second generation replaces them."""
    from edet_deploy.triton.verify import model_problems

    with _tmpfs(tmp_path / "volume", "64m") as volume:
        for _ in range(2):
            assert main(["-q", "triton-repo", "--onnx", str(random_d0_256), "--out", str(volume)]) == 0, \
                capsys.readouterr().err
            assert model_problems(volume) == {}
            assert not [p for p in volume.iterdir() if p.name.startswith(".edet-")]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_on_a_full_disk(small_disk, suffix):
    import torch

    from edet_deploy.model import create_model, save_weights

    torch.manual_seed(0)
    path = small_disk / f"w{suffix}"
    with pytest.raises(OSError) as caught:
        save_weights(create_model("d0", num_classes=4), path)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert list(small_disk.iterdir()) == []
