"""Input discovery (folders, globs, CSV/Parquet lists, ids) and manifest preparation with validation."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from phanes_cli.errors import InputError
from phanes_cli.inputs.discovery import looks_like_mask, prepare_manifest, resolve_inputs
from phanes_cli.inputs.manifest import read_manifest


def _nifti(
    path: Path, shape: tuple[int, ...] = (8, 9, 7), value: float = 1.0, affine: np.ndarray | None = None
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.full(shape, value, dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def test_mask_name_rule() -> None:
    for name in ("s1_brain.nii.gz", "s1_brain_mask.nii.gz", "s1_brainmask.nii", "T1_lesion.nii.gz",
                 "tumor_seg_model.nii.gz", "sub-1_dseg.nii.gz", "x-labels.nii"):
        assert looks_like_mask(name), name
    for name in ("T1.nii.gz", "sub-1_T1w.nii.gz", "brainstorm.nii", "segment1.nii.gz", "labelled_T1.nii"):
        assert not looks_like_mask(name), name


def test_folder_scan_skips_masks_hidden_and_other_files(tmp_path: Path) -> None:
    _nifti(tmp_path / "a" / "s1.nii.gz")
    _nifti(tmp_path / "a" / "s1_brain_mask.nii.gz")
    _nifti(tmp_path / "a" / "s1_lesion.nii.gz")
    _nifti(tmp_path / "b" / "deep" / "s2.nii")
    _nifti(tmp_path / "b" / ".hidden.nii.gz")
    (tmp_path / "b" / "notes.txt").write_text("x")
    rows = resolve_inputs([str(tmp_path)])
    assert [r.id for r in rows] == ["s1", "s2"]
    assert rows[0].image == (tmp_path / "a" / "s1.nii.gz").absolute()


def test_colliding_names_get_folder_prefix_deterministically(tmp_path: Path) -> None:
    for case in ("case2", "case1"):
        _nifti(tmp_path / case / "T1.nii.gz")
    _nifti(tmp_path / "x" / "a b.nii")
    _nifti(tmp_path / "x" / "a b.nii.gz")
    first = resolve_inputs([str(tmp_path)])
    again = resolve_inputs([str(tmp_path)])
    assert [r.id for r in first] == [r.id for r in again]
    by_path = {r.image.relative_to(tmp_path.absolute()).as_posix(): r.id for r in first}
    assert by_path["case1/T1.nii.gz"] == "case1_T1"
    assert by_path["case2/T1.nii.gz"] == "case2_T1"
    # same folder: numbered, no prefix
    assert sorted([by_path["x/a b.nii"], by_path["x/a b.nii.gz"]]) == ["a_b", "a_b-2"]
    assert len({r.id for r in first}) == len(first)


def test_globs_dedupe_and_errors(tmp_path: Path) -> None:
    _nifti(tmp_path / "s1.nii.gz")
    _nifti(tmp_path / "s2.nii.gz")
    _nifti(tmp_path / "s2_brain.nii.gz")
    rows = resolve_inputs([str(tmp_path / "s*.nii.gz"), str(tmp_path)])
    assert [r.id for r in rows] == ["s1", "s2"]
    masks = resolve_inputs([str(tmp_path / "*_brain.nii.gz")])
    assert [r.id for r in masks] == ["s2_brain"]
    with pytest.raises(InputError, match="matches no NIfTI"):
        resolve_inputs([str(tmp_path / "nothing*.nii.gz")])
    with pytest.raises(InputError, match="not found"):
        resolve_inputs([str(tmp_path / "missing")])
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="not a NIfTI image, a folder"):
        resolve_inputs([str(tmp_path / "readme.txt")])


def test_csv_and_parquet_lists(tmp_path: Path) -> None:
    _nifti(tmp_path / "img" / "a.nii.gz")
    _nifti(tmp_path / "img" / "b.nii.gz")
    _nifti(tmp_path / "img" / "a_brain.nii.gz")
    listing = pd.DataFrame({"path": ["img/a.nii.gz", "img/b.nii.gz"], "subject_id": ["001", "002"],
                            "brain_mask": ["img/a_brain.nii.gz", None], "site": ["x", "y"]})
    listing.to_csv(tmp_path / "list.csv", index=False)
    rows = resolve_inputs([str(tmp_path / "list.csv")])
    assert [r.id for r in rows] == ["001", "002"]  # kept as strings, leading zeros intact
    assert rows[0].brain_mask == (tmp_path / "img" / "a_brain.nii.gz").absolute()
    assert rows[1].brain_mask is None
    assert rows[0].extra == {"site": "x"}
    pd.DataFrame({"image": [str(tmp_path / "img" / "b.nii.gz")]}).to_parquet(tmp_path / "list.parquet")
    rows = resolve_inputs([str(tmp_path / "list.parquet")])
    assert [r.id for r in rows] == ["b"]
    pd.DataFrame({"file": ["img/a.nii.gz"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(InputError, match="path column"):
        resolve_inputs([str(tmp_path / "bad.csv")])
    duplicated = pd.DataFrame({"image": ["img/a.nii.gz", "img/b.nii.gz"], "id": ["s", "s"]})
    duplicated.to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(InputError, match="more than once"):
        resolve_inputs([str(tmp_path / "dup.csv")])
    pd.DataFrame({"image": ["img/a.nii.gz"], "id": ["../evil"]}).to_csv(tmp_path / "evil.csv", index=False)
    with pytest.raises(InputError, match="file name"):
        resolve_inputs([str(tmp_path / "evil.csv")])


def test_derived_ids_avoid_explicit_ones(tmp_path: Path) -> None:
    _nifti(tmp_path / "d" / "a.nii.gz")
    _nifti(tmp_path / "e" / "x.nii.gz")
    pd.DataFrame({"image": ["e/x.nii.gz"], "id": ["a"]}).to_csv(tmp_path / "l.csv", index=False)
    rows = resolve_inputs([str(tmp_path / "l.csv"), str(tmp_path / "d")])
    assert [r.id for r in rows] == ["a", "d_a"]


def test_prepare_manifest_rejects_each_bad_file_with_its_reason(tmp_path: Path) -> None:
    src = tmp_path / "src"
    good = _nifti(src / "good.nii.gz", value=2.0)
    _nifti(src / "flat.nii.gz", shape=(8, 9, 1))
    _nifti(src / "multi.nii.gz", shape=(8, 9, 7, 3))
    nan = np.ones((8, 9, 7), np.float32)
    nan[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(src / "nan.nii.gz"))
    (src / "text.nii.gz").write_text("not an image")
    noise = np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32)
    payload = gzip.compress(nib.Nifti1Image(noise, np.eye(4)).to_bytes())
    (src / "cut.nii.gz").write_bytes(payload[: len(payload) // 2])
    _nifti(src / "wrongmask.nii.gz")
    _nifti(tmp_path / "masks" / "small_mask.nii.gz", shape=(4, 4, 4))
    pd.DataFrame({"image": ["src/good.nii.gz", "src/wrongmask.nii.gz"], "id": ["good", "wrongmask"],
                  "brain_mask": [None, "masks/small_mask.nii.gz"]}).to_csv(tmp_path / "masked.csv", index=False)

    manifest = tmp_path / "out" / "manifest.parquet"
    rows, rejected = prepare_manifest([str(tmp_path / "masked.csv"), str(src)], manifest)
    assert [r.id for r in rows] == ["good"]
    reasons = {Path(r.path).name: r.reason for r in rejected}
    expected = {"flat.nii.gz", "multi.nii.gz", "nan.nii.gz", "text.nii.gz", "cut.nii.gz", "small_mask.nii.gz"}
    assert set(reasons) == expected
    assert "not 3D" in reasons["flat.nii.gz"]
    assert "4D image with 3 volumes" in reasons["multi.nii.gz"]
    assert "NaN" in reasons["nan.nii.gz"]
    assert "gzip" in reasons["text.nii.gz"] or "not a readable" in reasons["text.nii.gz"]
    assert "truncated" in reasons["cut.nii.gz"] or "corrupt" in reasons["cut.nii.gz"]
    assert "mask shape" in reasons["small_mask.nii.gz"]
    assert {r.id for r in rejected} >= {"wrongmask", "flat"}
    back = read_manifest(manifest)
    assert [(r.id, r.image) for r in back] == [("good", good.absolute())]


def test_prepare_manifest_without_validation_keeps_everything(tmp_path: Path) -> None:
    _nifti(tmp_path / "a.nii.gz")
    (tmp_path / "b.nii.gz").write_text("garbage")
    rows, rejected = prepare_manifest([str(tmp_path)], tmp_path / "m.parquet", validate=False)
    assert [r.id for r in rows] == ["a", "b"] and rejected == []
