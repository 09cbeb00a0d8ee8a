"""Atomic writes: complete or absent, and files and folders get the user's umask, not mkstemp's 0600."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from phanes_cli.infra.atomic import atomic_path, stage_bytes, write_json

ROOT = Path(__file__).resolve().parents[1]

# Writes one file of every kind through phanes' writers, in a fresh interpreter that inherits the umask.
_WRITER = """
import sys
import numpy as np, pyarrow as pa
from pathlib import Path
from phanes_cli.infra.atomic import write_json, write_parquet, write_text
from phanes_cli.core.volume_io import save_nifti
out = Path(sys.argv[1])
write_json(out / "new" / "deeper" / "run.json", {"a": 1})
write_text(out / "log.txt", "x")
write_parquet(out / "table.parquet", pa.table({"a": [1, 2]}))
save_nifti(np.zeros((4, 4, 4), np.float32), np.eye(4), out / "map.nii.gz")
"""


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_and_folders_honour_the_umask(umask: int, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", _WRITER, str(tmp_path)], check=True, env=env, umask=umask, timeout=120)
    files = ["new/deeper/run.json", "log.txt", "table.parquet", "map.nii.gz"]
    for name in files:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    for name in ("new", "new/deeper"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o777 & ~umask, name
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(Path(f).name for f in files)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = write_json(tmp_path / "a.json", {"v": 1})
    with pytest.raises(RuntimeError, match="mid-write"), atomic_path(target) as tmp:  # noqa: PT012
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_staged_file_is_hidden_complete_and_left_for_the_caller_to_rename(tmp_path: Path) -> None:
    tmp = stage_bytes(tmp_path / "calibration.json", b"{}\n")
    assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-") and tmp.read_bytes() == b"{}\n"
    assert not (tmp_path / "calibration.json").exists()


@pytest.mark.parametrize("writer", ["atomic_path", "stage_bytes"])
def test_an_interrupt_while_the_temporary_is_being_created_leaves_nothing(
        writer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C landing between the temporary file's creation and its first use (CI caught `data synth` leaving a
    '.tmp-*' mask this way): the file is removed, the target untouched."""
    real_close = os.close

    def interrupted(fd: int) -> None:
        real_close(fd)
        raise KeyboardInterrupt  # the file exists now; the interrupt arrives before anything else runs

    def write(target: Path) -> None:
        if writer == "atomic_path":
            with atomic_path(target) as tmp:
                tmp.write_bytes(b"never")
        else:
            stage_bytes(target, b"never")

    target = tmp_path / "maps" / "s1_lesionmask.nii.gz"
    monkeypatch.setattr(os, "close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write(target)
    monkeypatch.undo()
    assert list(target.parent.iterdir()) == []
