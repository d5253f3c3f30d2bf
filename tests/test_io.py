import os
import stat

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
