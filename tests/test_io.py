import os
import stat
from pathlib import Path

import pytest

from edet_deploy.io import atomic_path, write_json


def test_atomic_write_keeps_old_file_on_failure_and_normal_permissions(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    mode = stat.S_IMODE(os.stat(target).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text().strip() == '{\n  "a": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind


def test_devices_and_pipes_are_neither_replaced_nor_read(tmp_path):
    """A device or a named pipe given where a file goes: the library refuses it as the CLI does (a rename onto
    /dev/null replaced the device with a plain file, as root; reading /dev/zero never ends)."""
    from edet_deploy.errors import EdetError
    from edet_deploy.io import atomic_path, existing_file

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for special in (fifo, Path("/dev/null")):
        with pytest.raises(EdetError, match="is a device, pipe or socket, not a file"):
            with atomic_path(special) as tmp:
                tmp.write_text("x")
        with pytest.raises(EdetError, match="is a device, pipe or socket, not an ONNX graph file"):
            existing_file(special, "ONNX graph")
    assert fifo.is_fifo() and Path("/dev/null").is_char_device()
