"""The manifest: written relative to its folder, read back to absolute paths, validated."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from phanes_cli.errors import InputError
from phanes_cli.inputs.manifest import MANIFEST_COLUMNS, ManifestRow, read_manifest, select, write_manifest


def test_round_trip_resolves_relative_paths(tmp_path: Path) -> None:
    rows = [
        ManifestRow("a", tmp_path / "images" / "a.nii.gz", tmp_path / "masks" / "a_brain.nii.gz", None, "train",
                    "healthy", None, {"template": "mni"}),
        ManifestRow("b", Path("/elsewhere/b.nii.gz"), None, tmp_path / "labels" / "b.nii.gz", "test", "stroke", 12.5,
                    {"template": "x"}),
    ]
    path = write_manifest(rows, tmp_path / "manifest.parquet")
    table = pq.read_table(path)
    assert list(table.column_names[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert table.column("image").to_pylist() == ["images/a.nii.gz", "/elsewhere/b.nii.gz"]
    back = read_manifest(path)
    assert back[0].image == tmp_path / "images" / "a.nii.gz"
    assert back[1].lesion_ml == 12.5 and back[0].lesion_ml is None
    assert back[0].extra == {"template": "mni"}
    assert [r.id for r in select(back, split="test")] == ["b"]


def test_duplicate_ids_and_missing_columns_are_errors(tmp_path: Path) -> None:
    rows = [ManifestRow("a", tmp_path / "a.nii"), ManifestRow("a", tmp_path / "b.nii")]
    with pytest.raises(InputError, match="duplicate ids"):
        write_manifest(rows, tmp_path / "m.parquet")
    csv = tmp_path / "list.csv"
    csv.write_text("name,other\nx,y\n")
    with pytest.raises(InputError, match="lacks required column"):
        read_manifest(csv)
    with pytest.raises(InputError, match="manifest not found"):
        read_manifest(tmp_path / "none.parquet")


def test_csv_manifest_is_read(tmp_path: Path) -> None:
    csv = tmp_path / "list.csv"
    csv.write_text("id,image,split\ns1,img/s1.nii.gz,val\n")
    (row,) = read_manifest(csv)
    assert row.image == tmp_path / "img" / "s1.nii.gz" and row.split == "val" and row.kind == "unknown"


def test_csv_manifest_keeps_text_ids_and_treats_blank_cells_as_empty(tmp_path: Path) -> None:
    csv = tmp_path / "list.csv"
    csv.write_text("id,image,brain_mask,split,lesion_ml\n007,a.nii.gz,  ,train,\n010,/abs/b.nii.gz,m/b.nii.gz,,2.5\n")
    first, second = read_manifest(csv)
    assert [first.id, second.id] == ["007", "010"]  # not the integers 7 and 10
    assert first.brain_mask is None and first.lesion_ml is None and first.split == "train"
    assert second.image == Path("/abs/b.nii.gz") and second.brain_mask == tmp_path / "m" / "b.nii.gz"
    assert second.split == "test" and second.lesion_ml == 2.5


def test_unreadable_table_is_one_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "m.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot read the manifest"):
        read_manifest(broken)
