"""`phanes screen`: statistics, commit/resume bookkeeping, and end-to-end runs on a real Ray cluster.

The Ray tests share the session's head node (`ray start` on a loopback address, conftest.ray_head);
they cover a mixed cohort (orientations + corrupt files) with its resume, and hostile names and quality.
Kills and signals are in test_screening_faults.py; helpers here are reused by it and by test_screening_cluster.py.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
import torch
from scipy import ndimage

from phanes_cli.config import AOTConfig, PhanesConfig, PreprocessConfig, RAConfig
from phanes_cli.core.bundle import load_bundle, save_bundle, write_calibration
from phanes_cli.core.calibration import Calibration
from phanes_cli.core.pipeline import run_slices
from phanes_cli.core.preprocess import prepare_volume
from phanes_cli.core.statistics import brain_statistics, volume_statistics
from phanes_cli.core.volume_io import load_volume
from phanes_cli.errors import BundleError
from phanes_cli.inputs.manifest import ManifestRow
from phanes_cli.models import AOTGenerator, SoftIntroVAE
from phanes_cli.run_folder.commit import commit_volume, is_done, previous_failure, read_marker, record_failure
from phanes_cli.run_folder.consolidate import consolidate
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.runtimes.measured import cache_file
from phanes_cli.runtimes.pytorch import TorchBackend, load_networks
from phanes_cli.screening.actors import InferenceActor
from phanes_cli.screening.engine import EXIT_OK, EXIT_SOME_FAILED, screen
from phanes_cli.screening.options import ScreenOptions
from phanes_cli.screening.plan import plan_volumes
from phanes_cli.screening.tasks import ModelSlices, WriteJob, decode_volume, write_volume
from tests._ray import HEAD_IP, RayCluster

TIMING_COLUMNS = ["runtime_s", "decode_s", "brain_mask_s", "inference_s", "write_s", "decode_node", "inference_node",
                  "write_node"]


def tiny_config() -> PhanesConfig:
    """Small untrained networks on 64 px slices: fast on 2 CPU cores, same code paths as a real model."""
    return PhanesConfig(name="tiny", ra=RAConfig(channels=(8, 8, 16, 16, 16), latent_dim=16),
                        aot=AOTConfig(base_channels=8, channels=16, blocks=1, rates=(1, 2), disc_channels=(8, 8, 8, 8)),
                        preprocess=PreprocessConfig(image_size=64, min_brain_fraction=0.2))


def head_volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A skull-stripped-looking head: a textured ellipsoid with one bright blob (the 'lesion')."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid**2).sum(0) < 0.8
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.5)
    data = (100 + 25 * texture / (np.abs(texture).max() + 1e-6)) * brain
    centre = rng.integers([s // 3 for s in shape], [2 * s // 3 for s in shape])
    blob = ((grid - (centre / (np.array(shape) - 1) * 2 - 1)[:, None, None, None]) ** 2).sum(0) < 0.03
    data[blob & brain] *= 2.0
    return data.astype(np.float32)


def make_bundle(folder: Path) -> Path:
    """An untrained tiny bundle whose thresholds mask ~10% of the brain and flag the top anomaly scores."""
    torch.manual_seed(0)
    cfg = tiny_config()
    save_bundle(folder, cfg, SoftIntroVAE(cfg.ra, cfg.preprocess.image_size), AOTGenerator(cfg.aot))
    backend = TorchBackend(load_networks(load_bundle(folder, require_calibration=False)), torch.device("cpu"))
    prepared = prepare_volume(head_volume((40, 48, 24), seed=99), None, cfg.preprocess, (1.0, 1.0, 1.0))
    first = run_slices(prepared.slices, prepared.brain, backend, cfg, float("inf"))
    mask_threshold = float(torch.quantile(first.stage1_map[prepared.brain > 0], 0.9))
    second = run_slices(prepared.slices, prepared.brain, backend, cfg, mask_threshold)
    scores = second.anomaly[second.anomaly > 0]
    write_calibration(folder, Calibration(mask_threshold, float(torch.quantile(scores, 0.8))))
    return folder


def affines() -> dict[str, np.ndarray]:
    """RAS, LPS, oblique, anisotropic and permuted-axes voxel-to-world matrices."""
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    lps = np.diag([-2.0, -2.0, 2.0, 1.0])
    angle = np.deg2rad(17)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    oblique = np.eye(4)
    oblique[:3, :3] = rot @ np.diag([2.0, 2.0, 2.0])
    aniso = np.diag([1.5, 2.0, 3.0, 1.0])
    permuted = np.zeros((4, 4))
    permuted[0, 2], permuted[1, 0], permuted[2, 1], permuted[3, 3] = -2.0, 2.0, 2.0, 1.0  # file axes: A, S, L
    out = {"ras": ras, "lps": lps, "oblique": oblique, "aniso": aniso, "permuted": permuted}
    for affine in out.values():
        affine[:3, 3] = [-40.0, -48.0, -20.0]
    return out


def write_head(path: Path, affine: np.ndarray, seed: int, qform_code: int = 1, sform_code: int = 1) -> Path:
    """A head whose data is laid out in the file's own voxel order (so every orientation looks alike in RAS)."""
    ras_shape = (40, 48, 24)
    data = head_volume(ras_shape, seed)
    ornt = nib.orientations.io_orientation(affine)
    native = nib.apply_orientation(data, nib.orientations.ornt_transform(np.array([[0, 1], [1, 1], [2, 1]]), ornt))
    img = nib.Nifti1Image(np.ascontiguousarray(native), affine)
    img.set_qform(affine, code=qform_code)
    img.set_sform(affine, code=sform_code)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def series(folder: Path, n: int) -> list[Path]:
    return [write_head(folder / f"s{i:02d}.nii.gz", affines()["ras"], seed=i) for i in range(n)]


def read_tables(out: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(out / f"{name}.parquet") for name in ("volumes", "lesions", "failures")}


def assert_same_results(a: Path, b: Path) -> None:
    """Two runs over one cohort: identical maps and identical rows (timings and nodes aside)."""
    ta, tb = read_tables(a), read_tables(b)
    pd.testing.assert_frame_equal(ta["volumes"].drop(columns=TIMING_COLUMNS),
                                  tb["volumes"].drop(columns=TIMING_COLUMNS))
    pd.testing.assert_frame_equal(ta["lesions"], tb["lesions"])
    maps_a = sorted(p.name for p in (a / "maps").iterdir())
    assert maps_a == sorted(p.name for p in (b / "maps").iterdir())
    for name in maps_a:
        ia, ib = nib.load(str(a / "maps" / name)), nib.load(str(b / "maps" / name))
        np.testing.assert_array_equal(np.asarray(ia.dataobj), np.asarray(ib.dataobj))


# ---------------------------------------------------------------- statistics and bookkeeping (no Ray)

def test_volume_statistics_match_hand_made_masks(tmp_path: Path) -> None:
    """Known components and volumes, on a permuted + flipped, anisotropic file grid."""
    affine = np.zeros((4, 4))
    affine[0, 1], affine[1, 2], affine[2, 0], affine[3, 3] = -1.5, 2.0, 3.0, 1.0  # file axes: S, L, A
    affine[:3, 3] = [10.0, -20.0, 5.0]
    shape = (12, 14, 10)  # file order
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), affine), str(path))
    volume = load_volume(path)
    native_lesion = np.zeros(shape, bool)
    native_lesion[2:5, 3:6, 1:4] = True  # 27 voxels
    native_lesion[8, 10, 7] = native_lesion[9, 11, 8] = True  # corner-touching: one lesion of 2 voxels
    native_lesion[10, 2, 2:6] = True  # 4 voxels in a row
    native_score = np.where(native_lesion, 0.5, 0.0).astype(np.float32)
    native_score[3, 4, 2] = 0.9
    brain = volume.from_native(np.ones(shape, bool))
    stats, rows = volume_statistics("v", volume, brain_statistics(volume, brain, volume.from_native(native_score)),
                                    volume.from_native(native_score), volume.from_native(native_lesion))
    voxel_ml = 1.5 * 2.0 * 3.0 / 1000.0
    assert stats["lesion_count"] == 3
    assert stats["lesion_burden_ml"] == pytest.approx(33 * voxel_ml)
    assert stats["largest_lesion_ml"] == pytest.approx(27 * voxel_ml)
    assert stats["brain_volume_ml"] == pytest.approx(np.prod(shape) * voxel_ml)
    assert stats["max_anomaly"] == pytest.approx(0.9)
    assert stats["mean_anomaly"] == pytest.approx(native_score.sum() / np.prod(shape))
    assert [r["voxel_count"] for r in rows] == [27, 4, 2]
    big = rows[0]
    assert big["bbox_min"] == [2, 3, 1]
    assert big["bbox_max"] == [4, 5, 3]
    assert big["centroid_voxel"] == pytest.approx([3.0, 4.0, 2.0])
    assert big["centroid_world_mm"] == pytest.approx((affine @ [3.0, 4.0, 2.0, 1.0])[:3].tolist())
    assert big["max_score"] == pytest.approx(0.9)
    assert big["mean_score"] == pytest.approx((26 * 0.5 + 0.9) / 27)
    assert big["axial_axis"] == 0  # file axis 0 runs along world z (S)
    assert (big["slice_min"], big["slice_max"]) == (2, 4)
    assert rows[1]["volume_ml"] == pytest.approx(4 * voxel_ml)
    assert (rows[1]["slice_min"], rows[1]["slice_max"]) == (10, 10)
    assert all(r["id"] == "v" for r in rows)
    assert [r["centroid_x_mm"] for r in rows] == [r["centroid_world_mm"][0] for r in rows]
    assert (stats["shape_x"], stats["shape_y"], stats["shape_z"]) == shape
    zooms = (stats["voxel_mm_x"], stats["voxel_mm_y"], stats["voxel_mm_z"])
    assert zooms == pytest.approx((3.0, 1.5, 2.0))  # file axes S, L, A
    assert stats["lesion_burden_fraction"] == pytest.approx(33 / np.prod(shape))
    sizes_ml = np.array([27, 4, 2]) * voxel_ml  # 0.243, 0.036, 0.018 mL
    assert stats["lesions_lt_0_1ml"] == int((sizes_ml < 0.1).sum()) == 2
    assert stats["lesions_0_1_to_1ml"] == 1 and stats["lesions_1_to_10ml"] == stats["lesions_ge_10ml"] == 0


def test_the_driver_and_the_cpu_stages_import_no_network_code() -> None:
    """The networks cost every process that imports them seconds; only the inference actors need them, not
    the driver or the Ray workers that decode and write. A fresh interpreter checks, then imports the
    backends to show the check can see them (lpips and torchvision are no run-time dependency at all now)."""
    code = ("import sys, phanes_cli.screening.engine, phanes_cli.screening.tasks\n"
            "names = ('lpips', 'torchvision', 'phanes_cli.models.lpips', 'phanes_cli.runtimes.pytorch')\n"
            "print(sorted(m for m in names if m in sys.modules))\n"
            "import phanes_cli.runtimes.select\n"
            "print(sorted(m for m in names if m in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert run.stdout.splitlines() == ["[]", "['phanes_cli.models.lpips', 'phanes_cli.runtimes.pytorch']"]


def test_commit_resume_and_consolidation_rules(tmp_path: Path) -> None:
    image = tmp_path / "a.nii.gz"
    image.write_bytes(b"x")
    layout = OutputLayout(tmp_path / "out")
    layout.ensure()
    outputs = ("anomaly", "lesion_mask")
    for kind in outputs:
        layout.map_path("a", kind).write_bytes(b"nifti")
    for path in layout.brain_mask_files("a"):  # every run writes the brain mask it used
        path.write_bytes(b"nifti")
    marker = {"id": "a", "input_path": str(image), "input_signature": [1, image.stat().st_mtime_ns],
              "bundle_hash": "h1", "bundle_key": "h1", "outputs": list(outputs)}
    commit_volume(layout, "a", {"id": "a", "input_path": str(image), "status": "ok", "lesion_count": 1},
                  [{"id": "a", "lesion_index": 1, "voxel_count": 3}], marker)
    assert is_done(layout, "a", image, "h1", outputs)
    assert not is_done(layout, "a", image, "h2", outputs)  # another bundle
    assert not is_done(layout, "a", image, "h1", (*outputs, "pseudohealthy"))  # a new output asked for
    layout.map_path("a", "lesion_mask").unlink()
    assert not is_done(layout, "a", image, "h1", outputs)  # a file went missing
    layout.map_path("a", "lesion_mask").write_bytes(b"nifti")
    image.write_bytes(b"changed!")
    assert not is_done(layout, "a", image, "h1", outputs)  # the input changed

    bad = tmp_path / "b.nii.gz"
    bad.write_bytes(b"junk")
    size, mtime = bad.stat().st_size, bad.stat().st_mtime_ns
    failure = {"id": "b", "path": str(bad), "stage": "decode", "error_type": "InputError", "message": "junk",
               "retry_on_resume": False, "input_size": size, "input_mtime_ns": mtime, "bundle_hash": "h1"}
    record_failure(layout, "b", failure)
    assert previous_failure(layout, "b", bad, "h1") is not None  # input error of an unchanged file stands
    assert previous_failure(layout, "b", bad, "h2") is None
    record_failure(layout, "b", {**failure, "retry_on_resume": True})
    assert previous_failure(layout, "b", bad, "h1") is None  # other errors are retried

    first = consolidate(layout)
    assert first == {"volumes": 2, "lesions": 1, "failures": 1, "done": 1, "damaged": 0}
    tables = read_tables(layout.root)
    assert tables["volumes"]["id"].tolist() == ["a", "b"]
    assert tables["volumes"]["status"].tolist() == ["ok", "failed"]
    assert tables["failures"]["id"].tolist() == ["b"]
    assert consolidate(layout) == first  # idempotent
    rows = [ManifestRow(id="a", image=image), ManifestRow(id="b", image=bad)]
    plan = plan_volumes(rows, layout, ScreenOptions(bundle=tmp_path, out=layout.root), "h1", "h1")
    # a's input changed; b's failure is retried
    assert ([r.id for r in plan.todo], plan.skipped, plan.standing) == (["a", "b"], 0, 0)
    record_failure(layout, "b", failure)
    plan = plan_volumes(rows, layout, ScreenOptions(bundle=tmp_path, out=layout.root), "h1", "h1")
    assert ([r.id for r in plan.todo], plan.skipped, plan.standing) == (["a"], 0, 1)  # b's input error stands
    plan = plan_volumes(rows, layout, ScreenOptions(bundle=tmp_path, out=layout.root, overwrite=True), "h1", "h1")
    assert [r.id for r in plan.todo] == ["a", "b"]
    assert not layout.done_marker("a").exists()
    assert not layout.map_path("a", "anomaly").exists()
    assert not layout.part("failures", "b").exists()
    assert not layout.part("volumes", "a").exists()


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Path:
    return tiny_bundle  # the session's (conftest): read only here


def test_actor_turns_non_finite_output_into_a_failure_record(bundle: Path) -> None:
    """The inference actor (used directly, no Ray) reports NaN maps as this volume's failure and keeps working."""
    bundle_obj = load_bundle(bundle)
    actor = InferenceActor(str(bundle), bundle_obj.hash, "torch", "cpu", 1, 4, True, None)
    prepared = prepare_volume(head_volume((40, 48, 24), seed=3), None, bundle_obj.config.preprocess, (1.0, 1.0, 1.0))
    slices = ModelSlices(prepared.slices.numpy(), prepared.brain.numpy())
    good, maps = actor.infer(slices)
    assert good.failure is None
    assert maps is not None
    assert maps.anomaly.shape == slices.slices.shape
    assert maps.x_ph.shape == slices.slices.shape
    weight = next(actor.backend.networks.generator.parameters())  # type: ignore[attr-defined]
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[(0,) * weight.dim()] = float("nan")  # a broken network: NaN output, not a NaN input
    bad, none = actor.infer(slices)
    assert none is None
    assert bad.failure is not None
    assert (bad.failure.stage, bad.failure.error_type) == ("inference", "FloatingPointError")
    assert "non-finite" in bad.failure.message
    # the slices stage 2 ran on, by index among the volume's processed slices
    assert re.search(rf"anomaly map \(slice\(s\) \d+(, \d+)*( \.\.\.)? of {slices.slices.shape[0]}\)$",
                     bad.failure.message)
    with torch.no_grad():
        weight.copy_(saved)
    again, maps_again = actor.infer(slices)  # the same actor carries on, with the same numbers
    assert again.failure is None
    assert np.array_equal(maps_again.anomaly, maps.anomaly)
    with pytest.raises(BundleError, match="changed since the run started"):
        InferenceActor(str(bundle), "0" * 64, "torch", "cpu", 1, 4, False, None)


def test_a_decode_failure_passes_through_the_chained_stages_unchanged(bundle: Path, tmp_path: Path) -> None:
    """The stages are chained without the driver: a volume that failed to decode reaches the write stage's
    record with its decode failure and flags, and nothing is written for it."""
    bundle_obj = load_bundle(bundle)
    (tmp_path / "in").mkdir()
    garbage = tmp_path / "in" / "g.nii.gz"
    garbage.write_bytes(b"not a NIfTI file")
    row = ManifestRow(id="g", image=garbage)
    decoded, slices, context = decode_volume(row, bundle_obj.config.preprocess, 10**8, "never")
    assert decoded.failure is not None and slices is None and context is None
    actor = InferenceActor(str(bundle), bundle_obj.hash, "torch", "cpu", 1, 4, False, None)
    inferred, maps = actor.infer(slices)
    assert inferred.failure is None and maps is None
    job = WriteJob(row=row, out=tmp_path / "out", outputs=frozenset({"lesion_mask"}),
                   calibration=bundle_obj.require_calibration(), backend="torch", bundle_hash=bundle_obj.hash)
    written = write_volume(job, decoded, inferred, context, maps)
    assert written.failure == decoded.failure
    assert not (tmp_path / "out").exists()


def test_write_stage_records_the_inpainted_slices_and_the_brain_mask_time(bundle: Path, tmp_path: Path) -> None:
    """The committed row carries the inference stage's count of inpainted slices and the decode stage's brain
    mask seconds."""
    bundle_obj = load_bundle(bundle)
    image = write_head(tmp_path / "in" / "v.nii.gz", affines()["ras"], seed=5)
    row = ManifestRow(id="v", image=image)
    decoded, slices, context = decode_volume(row, bundle_obj.config.preprocess, 10**8, "never")
    inferred, maps = InferenceActor(str(bundle), bundle_obj.hash, "torch", "cpu", 1, 4, False, None).infer(slices)
    assert maps is not None
    job = WriteJob(row=row, out=tmp_path / "out", outputs=frozenset({"lesion_mask"}),
                   calibration=bundle_obj.require_calibration(), backend="torch", bundle_hash=bundle_obj.hash)
    assert write_volume(job, decoded, inferred, context, maps).failure is None
    rows = pd.read_parquet(OutputLayout(tmp_path / "out").part("volumes", "v")).to_dict("records")
    assert [(r["slices_inpainted"], r["brain_mask_s"]) for r in rows] == [(maps.slices_inpainted,
                                                                            decoded.brain_mask_s)]
    assert 0 < maps.slices_inpainted <= decoded.n_slices and 0 < decoded.brain_mask_s < decoded.seconds


# ---------------------------------------------------------------- end to end on a Ray cluster


def _options(bundle: Path, out: Path, **kw: object) -> ScreenOptions:
    return ScreenOptions(bundle=bundle, out=out, node_ip=HEAD_IP, quiet=True, **kw)  # type: ignore[arg-type]


def test_mixed_cohort_geometry_tables_failures_and_resume(cluster: RayCluster, bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "cohort"
    codes = {"ras": (1, 1), "lps": (2, 0), "oblique": (0, 2), "aniso": (1, 4), "permuted": (1, 1)}
    good = {name: write_head(src / f"{name}.nii.gz", aff, seed=i, qform_code=codes[name][0], sform_code=codes[name][1])
            for i, (name, aff) in enumerate(affines().items())}
    (src / "text.nii.gz").write_text("this is not an image")
    noise = np.random.default_rng(1).normal(size=(30, 30, 30)).astype(np.float32)
    payload = gzip.compress(nib.Nifti1Image(noise, np.eye(4)).to_bytes())
    (src / "truncated.nii.gz").write_bytes(payload[: len(payload) // 2])
    nib.save(nib.Nifti1Image(np.ones((40, 48), np.float32), np.eye(4)), str(src / "flat.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20, 3), np.float32), np.eye(4)), str(src / "multi.nii.gz"))
    nan = head_volume((40, 48, 24), 5)
    nan[20, 20, 10] = np.nan
    nib.save(nib.Nifti1Image(nan, np.diag([2.0, 2.0, 2.0, 1.0])), str(src / "nan.nii.gz"))
    out, log = tmp_path / "out", tmp_path / "log.jsonl"
    outputs = frozenset({"anomaly", "lesion_mask", "pseudohealthy"})

    summary = screen([str(src)], _options(bundle, out, outputs=outputs, log_jsonl=log, batch_size=7, max_in_flight=3))

    assert (summary.total, summary.done, summary.failed, summary.skipped) == (10, 5, 5, 0)
    assert summary.exit_code == EXIT_SOME_FAILED != EXIT_OK
    tables = read_tables(out)
    failures = tables["failures"].set_index("id")
    assert sorted(failures.index) == ["flat", "multi", "nan", "text", "truncated"]
    assert set(failures["stage"]) == {"decode"}
    assert set(failures["error_type"]) == {"InputError"}
    assert "not 3D" in failures.loc["flat", "message"]
    assert "4D image with 3 volumes" in failures.loc["multi", "message"]
    assert "1 voxels are NaN" in failures.loc["nan", "message"]
    assert "gzip" in failures.loc["text", "message"] or "not a readable" in failures.loc["text", "message"]
    assert "truncated" in failures.loc["truncated", "message"] or "corrupt" in failures.loc["truncated", "message"]

    volumes = tables["volumes"].set_index("id")
    assert volumes.index.tolist() == sorted(volumes.index)  # deterministic order
    assert (volumes.loc[list(good), "status"] == "ok").all()
    assert (volumes.loc[list(failures.index), "status"] == "failed").all()
    threshold = load_bundle(bundle).calibration.anomaly_threshold  # type: ignore[union-attr]
    lesions = tables["lesions"]
    for name, path in good.items():
        source = nib.load(str(path))
        row = volumes.loc[name]
        assert list(row["shape"]) == list(source.shape)
        assert np.allclose(row["voxel_size_mm"], np.sqrt((source.affine[:3, :3] ** 2).sum(0)))
        for kind, dtype in (("anomaly", np.float32), ("lesionmask", np.uint8), ("pseudohealthy", np.float32)):
            result = nib.load(str(out / "maps" / f"{name}_{kind}.nii.gz"))
            assert result.shape == source.shape
            assert result.get_data_dtype() == dtype
            np.testing.assert_allclose(result.affine, source.affine, atol=1e-6)
            for getter in ("get_qform", "get_sform"):
                m_out, c_out = getattr(result.header, getter)(coded=True)
                m_in, c_in = getattr(source.header, getter)(coded=True)
                assert int(c_out) == int(c_in), (name, kind, getter)
                if m_in is not None:
                    np.testing.assert_allclose(m_out, m_in, atol=1e-6)
            assert result.header.get_zooms()[:3] == pytest.approx(source.header.get_zooms()[:3])
        anomaly = np.asarray(nib.load(str(out / "maps" / f"{name}_anomaly.nii.gz")).dataobj)
        mask = np.asarray(nib.load(str(out / "maps" / f"{name}_lesionmask.nii.gz")).dataobj).astype(bool)
        voxel_ml = abs(np.linalg.det(source.affine[:3, :3])) / 1000.0
        assert mask.any()
        assert not mask.all()
        assert (anomaly[mask] >= threshold).all()
        assert not (mask & (anomaly <= 0)).any()
        assert row["lesion_burden_ml"] == pytest.approx(mask.sum() * voxel_ml)
        n_components = ndimage.label(mask, structure=np.ones((3, 3, 3)))[1]
        assert row["lesion_count"] == n_components
        mine = lesions[lesions["id"] == name]
        assert len(mine) == n_components
        assert mine["voxel_count"].sum() == mask.sum()
        assert row["largest_lesion_ml"] == pytest.approx(mine["volume_ml"].max())
        assert row["max_anomaly"] == pytest.approx(float(anomaly.max()), rel=1e-5)
        for _, lesion in mine.iterrows():  # boxes are in the file's voxel order
            lo, hi = lesion["bbox_min"], lesion["bbox_max"]
            assert mask[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1].sum() >= lesion["voxel_count"]
        pseudo = np.asarray(nib.load(str(out / "maps" / f"{name}_pseudohealthy.nii.gz")).dataobj)
        original = np.asarray(source.dataobj)
        assert np.isclose(pseudo, original).mean() > 0.5
        assert not np.allclose(pseudo, original)
    # the permuted file's axial (S) axis is its axis 1
    assert set(lesions.loc[lesions["id"] == "permuted", "axial_axis"]) == {1}

    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["bundle"]["hash"] == load_bundle(bundle).hash
    assert manifest["counts"] == {"total": 10, "done": 5, "failed": 5, "skipped": 0}
    assert 1 <= manifest["ray"]["peak_in_flight"] <= 3  # bounded streaming: never more than max_in_flight volumes
    # the actors' threads follow torch's speeds measured here at 1 and 2 threads (the user cache's figures):
    # a two-thread actor when it screens more slices per second than one-thread actors on the same cores
    entries = json.loads(cache_file(load_bundle(bundle)).read_text())["entries"].values()
    speed = {e["threads"]: e["slices_per_s"]["torch"] for e in entries}
    cores = int(sum(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]))
    single = cores - max(1, cores // 4) if cores - max(1, cores // 4) >= 2 else cores
    paired = max(1, (cores - max(1, cores // 4)) // 2)
    two = cores >= 2 and paired * speed[2] > single * speed[1]
    assert (manifest["ray"]["actors"], manifest["ray"]["threads_per_actor"]) == ((paired, 2) if two else (single, 1))
    assert {"torch", "ray", "nibabel"} <= set(manifest["versions"])
    assert manifest["command"]
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert next(e["event"] for e in events) == "start"
    assert events[-1]["event"] == "end"
    assert sorted(e["id"] for e in events if e["event"] == "volume") == sorted([*good, *failures.index])
    stages = {e["id"]: e["stages_s"] for e in events if e["event"] == "volume" and e["status"] == "ok"}
    assert all(stages[name] >= volumes.loc[name, "runtime_s"] - 1e-3 for name in good)  # plus the commit
    ray_times = manifest["ray"]
    assert sum(stages.values()) - 1e-3 <= ray_times["stages_s"] <= 3 * ray_times["stream_s"]  # at most 3 at once
    assert len(pd.read_parquet(out / "parts" / "volumes")) == 5  # part files readable as a dataset mid-run
    assert pq.read_table(out / "lesions.parquet").schema.field("centroid_world_mm").type.value_type.bit_width == 64

    again = screen([str(src)], _options(bundle, out, outputs=outputs))  # resume: nothing left to do
    assert (again.done, again.failed, again.skipped) == (0, 5, 5)
    pd.testing.assert_frame_equal(read_tables(out)["volumes"].drop(columns=TIMING_COLUMNS),
                                  tables["volumes"].drop(columns=TIMING_COLUMNS))


def test_consolidation_orders_rows_by_id_whatever_the_commit_order(tmp_path: Path) -> None:
    """Parts committed out of order (as parallel writers do) give tables sorted by id, lesions in order."""
    layout = OutputLayout(tmp_path / "out")
    layout.ensure()
    order = [7, 2, 9, 0, 5, 3, 8, 1, 6, 4]
    for i in order:
        vid = f"v{i:02d}"
        if i == 6:
            record_failure(layout, vid, {"id": vid, "path": f"/in/{vid}", "stage": "write", "error_type": "OSError",
                                         "message": "disk full", "retry_on_resume": True, "bundle_hash": "h"})
            continue
        lesions = [{"id": vid, "lesion_index": k + 1, "voxel_count": 10 - k} for k in range(i % 3)]
        commit_volume(layout, vid, {"id": vid, "status": "ok", "lesion_count": len(lesions)}, lesions, {"id": vid})
    counts = consolidate(layout)
    tables = read_tables(layout.root)
    expected_lesions = [(f"v{i:02d}", k + 1) for i in range(10) if i != 6 for k in range(i % 3)]
    assert counts == {"volumes": 10, "lesions": len(expected_lesions), "failures": 1, "done": 9, "damaged": 0}
    assert tables["volumes"]["id"].tolist() == [f"v{i:02d}" for i in range(10)]
    assert tables["volumes"].set_index("id")["status"].to_dict() == {f"v{i:02d}": "failed" if i == 6 else "ok"
                                                                     for i in range(10)}
    assert list(zip(tables["lesions"]["id"], tables["lesions"]["lesion_index"], strict=True)) == expected_lesions
    assert tables["failures"]["message"].tolist() == ["disk full"]


def test_a_damaged_part_file_becomes_a_failure_row_and_keeps_the_others(tmp_path: Path) -> None:
    """A committed part overwritten with garbage after its atomic write (disk fault, another program): the
    tables keep every readable volume, and each damaged one becomes a failure row (never silently dropped)
    without its marker, so resume redoes it (issue 23)."""
    layout = OutputLayout(tmp_path / "out")
    layout.ensure()
    for i in range(6):
        vid = f"v{i}"
        commit_volume(layout, vid, {"id": vid, "status": "ok", "lesion_count": 1},
                      [{"id": vid, "lesion_index": 1, "voxel_count": 5}], {"id": vid})
    layout.part("volumes", "v1").write_bytes(b"garbage")
    layout.part("lesions", "v4").write_bytes(b"")
    counts = consolidate(layout)
    assert counts == {"volumes": 6, "lesions": 4, "failures": 2, "done": 4, "damaged": 2}
    tables = read_tables(layout.root)
    assert tables["volumes"]["id"].tolist() == [f"v{i}" for i in range(6)]
    assert tables["volumes"]["status"].tolist() == ["ok", "failed", "ok", "ok", "failed", "ok"]
    assert tables["lesions"]["id"].tolist() == ["v0", "v2", "v3", "v5"]
    assert tables["failures"]["error_type"].tolist() == ["DamagedOutput"] * 2
    for vid in ("v1", "v4"):
        assert read_marker(layout, vid) is None
        assert not layout.part("volumes", vid).exists() and not layout.part("lesions", vid).exists()
    assert consolidate(layout)["damaged"] == 0  # stable once recorded


def test_hostile_names_duplicates_quality_and_out_inside_the_inputs(cluster: RayCluster, bundle: Path,
                                                                    tmp_path: Path) -> None:
    """Issue 9 in one run: ids that look hidden, temporary or too long, one image under three ids, a volume
    that fails quality (all zero), one that is flagged (noise), and OUT inside the input folder; a rerun
    screens nothing again, deletes nothing, and does not take OUT's own maps for subjects."""
    src, hidden = tmp_path / "cohort", tmp_path / "hidden"
    heads = [write_head(src / f"h{i}.nii.gz", affines()["ras"], seed=i) for i in range(2)]
    nib.save(nib.Nifti1Image(np.zeros((40, 48, 24), np.float32), affines()["ras"]), str(src / "zero.nii.gz"))
    noise = np.random.default_rng(3).random((40, 48, 24)).astype(np.float32)
    nib.save(nib.Nifti1Image(noise, affines()["ras"]), str(src / "noise.nii.gz"))
    for i, name in enumerate((".x.nii.gz", ".tmp-x.nii.gz")):
        write_head(hidden / name, affines()["ras"], seed=10 + i)
    (tmp_path / "hidden.csv").write_text(f"image\n{hidden / '.x.nii.gz'}\n{hidden / '.tmp-x.nii.gz'}\n")
    long_ids = ["L" * 260, "M" * 300]
    (tmp_path / "long.csv").write_text("id,image\n" + "".join(f"{vid},{heads[0]}\n" for vid in long_ids))
    inputs = [str(src), str(tmp_path / "hidden.csv"), str(tmp_path / "long.csv")]
    out, log = src / "out", tmp_path / "log.jsonl"
    ids = sorted(["h0", "h1", "zero", "noise", ".x", ".tmp-x", *long_ids])

    summary = screen(inputs, _options(bundle, out, log_jsonl=log, max_in_flight=3))

    assert (summary.total, summary.done, summary.failed) == (8, 7, 1)
    tables = read_tables(out)
    volumes = tables["volumes"].set_index("id")
    assert sorted(volumes.index) == ids
    failure = tables["failures"].set_index("id").loc["zero"]
    assert (failure["error_type"], failure["message"]) == ("QualityError", "quality check all_zero: every voxel is 0")
    assert not failure["retry_on_resume"]
    ok = volumes[volumes["status"] == "ok"]
    for vid in ok.index:  # heads of ~140 mL are flagged, as the limit says; screened all the same
        assert "brain_volume_low" in list(ok.loc[vid, "qc_flags"])
        assert ok.loc[vid, "input_sha256"] == hashlib.sha256(Path(ok.loc[vid, "input_path"]).read_bytes()).hexdigest()
    assert "intensity_noise" in list(ok.loc["noise", "qc_flags"])
    warned = {e["id"] for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "warning"}
    assert warned == set(ok.index)
    per_id = ["input_path", "brain_mask_path"]  # each id has its own input entry and its own brain mask output
    first = ok.loc["h0"].drop(TIMING_COLUMNS)
    for vid in long_ids:  # the same image under three ids: three equal rows
        assert ok.loc[vid].drop([*TIMING_COLUMNS, *per_id]).equals(first.drop(per_id))
    assert len(tables["lesions"].loc[tables["lesions"]["id"] == long_ids[1]]) == (tables["lesions"]["id"] == "h0").sum()
    names = [p.name for p in out.rglob("*") if p.is_file()]
    assert all(len(n.encode()) <= 255 for n in names)
    assert not [n for n in names if n.startswith(".") and n != ".phanes-screen.lock"]
    maps = sorted(out.glob("maps/*.nii.gz"))

    again = screen(inputs, _options(bundle, out))

    assert (again.total, again.done, again.failed, again.skipped) == (8, 0, 1, 7)
    assert sorted(out.glob("maps/*.nii.gz")) == maps
    pd.testing.assert_frame_equal(read_tables(out)["volumes"].drop(columns=TIMING_COLUMNS),
                                  tables["volumes"].drop(columns=TIMING_COLUMNS))
