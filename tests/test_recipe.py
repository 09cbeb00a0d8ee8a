"""One recipe per volume (core.recipe): `phanes screen`'s write stage, `phanes_cli.predict` and `phanes stats`
give the same row, QC flags included, and the same lesions for the same real volume."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq

import phanes_cli
from phanes_cli.core.bundle import load_bundle
from phanes_cli.inputs.manifest import ManifestRow
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.run_folder.schemas import LESION_SCHEMA, VOLUME_SCHEMA, table_from_rows
from phanes_cli.screening.actors import InferenceActor
from phanes_cli.screening.restat import restat_volume
from phanes_cli.screening.tasks import WriteJob, decode_volume, write_volume
from tests.conftest import SHARED_DATA, needs_shared

BATCH = 4


def _thick_slices(folder: Path) -> Path:
    """A real adult brain (0.8 mm) keeping every fifth axial slice: 4 mm slices, so two QC warnings
    (voxel_too_large, voxel_anisotropic) that the volume is screened with, and a small volume to run."""
    source = nib.load(SHARED_DATA / "healthy-t1" / "niimath_adult_T1.nii.gz")
    affine = source.affine.copy()
    affine[:3, 2] *= 5
    path = folder / "adult_thick.nii.gz"
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj, dtype=np.float32)[:, :, ::5], affine), str(path))
    return path


def _cast(rows: list[dict], schema) -> list[dict]:  # type: ignore[no-untyped-def]
    """Rows as the run's tables store them (the same Arrow types for every caller)."""
    return table_from_rows(rows, schema).to_pylist()


@needs_shared()
def test_screen_predict_and_stats_give_the_same_row(tiny_bundle: Path, tmp_path: Path, one_thread: None) -> None:
    image = _thick_slices(tmp_path / "in")
    model = load_bundle(tiny_bundle)
    row = ManifestRow(id="image", image=image)
    decoded, slices, context = decode_volume(row, model.config.preprocess, 10**9, "never")
    assert decoded.failure is None
    inferred, maps = InferenceActor(str(tiny_bundle), model.hash, "torch", "cpu", 1, BATCH, True, None).infer(slices)
    job = WriteJob(row=row, out=tmp_path / "run", outputs=frozenset({"anomaly", "lesion_mask"}),
                   calibration=model.require_calibration(), backend="torch", bundle_hash=model.hash)
    assert write_volume(job, decoded, inferred, context, maps).failure is None
    run = OutputLayout(tmp_path / "run")
    screened = pq.read_table(run.part("volumes", "image")).to_pylist()[0]
    screened_lesions = pq.read_table(run.part("lesions", "image")).to_pylist()

    predicted = phanes_cli.predict(image, bundle=tiny_bundle, device="cpu", backend="torch", skull_strip="never",
                                   batch_size=BATCH)
    target = OutputLayout(tmp_path / "st")
    restated, restated_lesions = restat_volume(screened, run, model.require_calibration(), target)

    recipe_columns = set(predicted.statistics)
    assert {"qc_flags", "lesion_count", "lesion_burden_ml", "anomaly_threshold"} <= recipe_columns
    assert sorted(predicted.qc_flags) == ["voxel_anisotropic", "voxel_too_large"]
    assert screened["lesion_count"] > 0  # the tiny bundle flags something: a real comparison
    as_predicted = {k: v for k, v in _cast([predicted.statistics], VOLUME_SCHEMA)[0].items() if k in recipe_columns}
    for name, other in (("screen", screened), ("stats", _cast([restated], VOLUME_SCHEMA)[0])):
        assert {k: other[k] for k in recipe_columns} == as_predicted, name
    lesions = _cast(predicted.lesions, LESION_SCHEMA)
    assert screened_lesions == lesions and _cast(restated_lesions, LESION_SCHEMA) == lesions
    written = nib.load(tmp_path / "st" / "maps" / "image_lesionmask.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), np.asanyarray(predicted.lesion_mask.dataobj))
