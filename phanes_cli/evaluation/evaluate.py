"""`phanes evaluate`: score methods against ground-truth lesion masks over a manifest split.

Every volume takes the pipeline's road (`infer_slices`, then `restore_maps`; methods.py picks each
method's map), so its maps land on the native RAS+ grid exactly as screening's do; they are scored there
against the native ground truth with the streaming `CohortMetrics`, so a cohort never has to fit in memory.

Choices, documented here because they change the figures:
- Evaluated region: brain voxels of the axial slices the pipeline processed (all slices with enough brain,
  or the single mid slice in the paper's `slice_mode: mid`). This is exactly what screening sees; lesion
  voxels on skipped slices are reported per volume as `lesion_ml_unevaluated`.
- Brain: the row's brain mask, else `inputs.brain_masks.brain_mask_for` under `skull_strip` (`load_with_brain`,
  as in screening).
- Healthy controls: rows of the split without a lesion mask and of kind `healthy` are all-negative volumes;
  every component a method predicts there is a false positive (`healthy_controls` per method in the
  summary: components and mL per healthy volume; one row per volume in healthy_controls.parquet). They
  are not mixed into the lesion metrics, which stay comparable with the paper's.
- Lesion-wise recall by lesion size (< 1, 1-10, > 10 mL) per method: `lesion_recall_by_size`.
- Per source brain: when the rows come from several sources (the manifest's `source` column), the summary's
  `by_source` holds the same figures for each source alone, from the same single pass (one test brain at a
  time: AUPRC pools only that brain's voxels).
- Other rows without a lesion mask are skipped with a warning (their ids are listed in the summary); the
  split must keep at least one labelled row. A mask on another grid is an InputError.
- Scores lie in [0, 1] in practice (products of [0, 1] factors; the LPIPS factor can exceed 1 by a hair),
  so histograms span [0, 1]; the share of voxels above is reported as `clipped_fraction`.
- Determinism: inference uses the posterior mean and no sampling, the synthetic protocol a seeded rng.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from rich.table import Table

from phanes_cli.config import PhanesConfig
from phanes_cli.core.backend import Backend
from phanes_cli.core.bundle import load_bundle
from phanes_cli.core.calibration import Calibration
from phanes_cli.core.pipeline import restore_maps, restore_score
from phanes_cli.core.preprocess import AXIAL_AXIS, prepare_volume, slices_of
from phanes_cli.core.volume_io import load_mask
from phanes_cli.errors import ConfigError, InputError
from phanes_cli.evaluation.controls import DetectionBreakdown
from phanes_cli.evaluation.methods import (
    UNCALIBRATED,
    predict,
    run_methods,
    scores_of,
    threshold,
)
from phanes_cli.evaluation.metrics import VOLUME_SCORES_SCHEMA, CohortMetrics
from phanes_cli.evaluation.options import EvaluateOptions
from phanes_cli.evaluation.synthetic import SyntheticResult, run_synthetic, synthetic_subjects
from phanes_cli.evaluation.tables import render_tables as _render_tables
from phanes_cli.infra.atomic import write_json, write_parquet
from phanes_cli.infra.progress import LoggedProgress
from phanes_cli.infra.versions import __version__
from phanes_cli.inputs.brain_masks import load_with_brain
from phanes_cli.inputs.manifest import ManifestRow, read_manifest, select
from phanes_cli.runtimes.pytorch import select_device
from phanes_cli.runtimes.select import choose_backend

BINS = 65536
MAX_SCORE = 1.0
SUMMARY_FILE = "summary.json"
PER_VOLUME_FILE = "per_volume.parquet"
SYNTHETIC_TABLE_FILE = "synthetic.parquet"
SYNTHETIC_SUMMARY_FILE = "synthetic.json"
CONTROLS_FILE = "healthy_controls.parquet"
HEALTHY = "healthy"

# Summary keys and per-volume columns that need a calibrated threshold: blank for uncalibrated methods.
_THRESHOLDED_SUMMARY = (
    "threshold", "dice", "dice_mean", "dice_std", "abs_volume_error_ml_mean", "abs_volume_error_ml_std",
    "abs_volume_error_ml_median",
    "lesions_found", "pred_components", "fp_components", "lesion_recall", "lesion_precision", "lesion_f1",
    "healthy_controls", "lesion_recall_by_size",
)
_THRESHOLDED_COLUMNS = (
    "dice", "lesions_found", "pred_components", "fp_components", "lesion_recall", "lesion_precision",
    "lesion_f1", "predicted_ml", "abs_volume_error_ml",
)
PER_VOLUME_SCHEMA = pa.schema([
    pa.field("method", pa.string()), *VOLUME_SCORES_SCHEMA,
    pa.field("slices_processed", pa.int64()), pa.field("lesion_ml_unevaluated", pa.float64()),
    pa.field("source", pa.string()),
])


@dataclass(frozen=True)
class EvaluationResult:
    """What `evaluate` wrote: the summary (as in summary.json), the per-volume table and Table 1 results."""

    summary: dict[str, Any]
    per_volume: pa.Table
    synthetic: SyntheticResult | None
    out: Path
    warnings: list[str] = field(default_factory=list)

    def tables(self) -> list[Table]:
        """Rich tables like the paper's: real lesions, then the synthetic protocol when it ran."""
        return render_tables(self)


def render_tables(result: EvaluationResult) -> list[Table]:
    """Rich tables of a result, one row per method (see report.py)."""
    return _render_tables(result.summary["methods"], result.summary["synthetic"], result.summary["settings"],
                          result.summary.get("by_source"))


def _json_safe(value: Any) -> Any:
    """NaN and inf become null: summary.json must be strict JSON for other tools."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.integer, np.floating)):
        return _json_safe(value.item())
    return value


def of_sources(rows: list[ManifestRow], sources: Sequence[str], manifest: Path) -> list[ManifestRow]:
    """The rows whose `source` is one of `sources` (all rows when none is given); a ConfigError names what exists."""
    if not sources:
        return rows
    known = sorted({str(r.extra["source"]) for r in rows if r.extra.get("source") is not None})
    missing = sorted(set(sources) - set(known))
    if missing:
        listing = ", ".join(known) or "none: the manifest has no source column"
        raise ConfigError(f"{manifest}: no rows of source(s) {', '.join(missing)}; sources: {listing}")
    return [r for r in rows if r.extra.get("source") in set(sources)]


def labelled_rows(rows: list[ManifestRow], split: str, manifest: Path) -> tuple[list[ManifestRow], list[str]]:
    """Rows of `split` with a lesion mask, and the ids skipped for lacking one; errors when none remain."""
    in_split = select(rows, split=split)
    if not in_split:
        present = sorted({r.split for r in rows})
        raise InputError(manifest, f"no rows in split {split!r} (splits present: {', '.join(present) or 'none'})")
    labelled = [r for r in in_split if r.lesion_mask is not None]
    skipped = [r.id for r in in_split if r.lesion_mask is None]
    if not labelled:
        listing = f"{', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}"
        raise InputError(manifest, f"no row of split {split!r} has a lesion_mask; real-lesion evaluation needs "
                                   f"ground truth (rows without one: {listing})")
    return labelled, skipped


@dataclass(frozen=True)
class VolumeEvaluation:
    """Native-grid score maps of every method for one volume, with what they are scored against."""

    scores: dict[str, np.ndarray]  # (X, Y, Z) float32 per method, zero outside the brain
    inpaint_masks: dict[str, np.ndarray]  # (X, Y, Z) bool per PHANES variant
    truth: np.ndarray  # (X, Y, Z) bool
    region: np.ndarray  # (X, Y, Z) bool: brain voxels of processed slices
    brain: np.ndarray  # (X, Y, Z) bool
    voxel_ml: float
    slices_processed: int


def evaluate_volume(
    row: ManifestRow,
    backend: Backend,
    cfg: PhanesConfig,
    calibration: Calibration,
    methods: Sequence[str],
    batch_size: int,
    skull_strip: str = "auto",
) -> VolumeEvaluation:
    """Load one labelled volume (or healthy control: all-negative truth), run every method on its slices and
    map the scores onto its native grid."""
    volume, brain, _ = load_with_brain(row.image, row.brain_mask, skull_strip=skull_strip, device=str(backend.device))
    if row.lesion_mask is None and row.kind != HEALTHY:
        raise InputError(row.image, f"row {row.id!r} has no lesion_mask")
    truth = np.zeros(brain.shape, dtype=bool) if row.lesion_mask is None else load_mask(row.lesion_mask, volume)
    prepared = prepare_volume(volume.data, brain, cfg.preprocess, volume.zooms)
    geometry = prepared.geometry
    truth_slices = (slices_of(truth, geometry, mode="bilinear") >= 0.5).float() if "phanes-gt" in methods else None
    try:
        maps = run_methods(prepared.slices, prepared.brain, truth_slices, backend, cfg, calibration, methods,
                           batch_size)
    except FloatingPointError as exc:
        raise FloatingPointError(f"{row.id}: {exc}") from exc
    main, gt = ((None if m is None else restore_maps(m, geometry, brain, prepared.scale, volume.data))
                for m in (maps.phanes, maps.phanes_gt))
    residual = None if maps.residual is None else restore_score(maps.residual, geometry, brain)
    inpaint = {m: v.inpaint_mask for m, v in (("phanes", main), ("phanes-gt", gt))
               if m in methods and v is not None and v.inpaint_mask is not None}
    processed = np.zeros(volume.data.shape[AXIAL_AXIS], dtype=bool)
    processed[geometry.covered] = True
    region = brain & processed[None, None, :]
    return VolumeEvaluation(scores=scores_of(methods, main, gt, residual), inpaint_masks=inpaint, truth=truth,
                            region=region, brain=brain, voxel_ml=volume.voxel_ml, slices_processed=geometry.n_slices)


def _blank(record: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: (None if k in keys else v) for k, v in record.items()}


class Scoreboard:
    """Every method's streaming metrics and detection breakdown over one group of volumes (all, or one source)."""

    def __init__(self, names: Sequence[str], calibration: Calibration) -> None:
        self.names = list(names)
        self.cohorts = {m: CohortMetrics(threshold=threshold(m, calibration), bins=BINS, max_score=MAX_SCORE)
                        for m in names}
        self.breakdown = DetectionBreakdown(self.names)
        self.extras: list[dict[str, Any]] = []

    def add_lesioned(self, row: ManifestRow, result: VolumeEvaluation, calibration: Calibration) -> None:
        for method in self.names:
            score = result.scores[method]
            prediction = predict(method, score, result.region, calibration, result.voxel_ml)
            self.cohorts[method].add_volume(row.id, score, prediction, result.truth, result.region, result.voxel_ml)
            if prediction is not None:
                self.breakdown.add_lesion_volume(method, prediction, result.truth, result.region, result.voxel_ml)
        outside = int(np.count_nonzero(result.truth & result.brain & ~result.region))
        source = row.extra.get("source")
        self.extras.append({"slices_processed": result.slices_processed,
                            "lesion_ml_unevaluated": outside * result.voxel_ml,
                            "source": None if source is None else str(source)})

    def add_control(self, row: ManifestRow, result: VolumeEvaluation, calibration: Calibration) -> None:
        for method in self.names:
            prediction = predict(method, result.scores[method], result.region, calibration, result.voxel_ml)
            if prediction is not None:
                self.breakdown.add_control(row.id, method, prediction, result.region, result.voxel_ml)

    def rows(self) -> list[dict[str, Any]]:
        """One per-volume record per method and lesioned volume (uncalibrated methods blank where thresholded)."""
        out = []
        for method in self.names:
            for record, extra in zip(self.cohorts[method].per_volume_table().to_pylist(), self.extras, strict=True):
                if method in UNCALIBRATED:
                    record = _blank(record, _THRESHOLDED_COLUMNS)
                out.append({"method": method, **record, **extra})
        return out

    def summaries(self) -> dict[str, dict[str, Any]]:
        out = {}
        for method in self.names:
            summary = {**self.cohorts[method].summary(), **self.breakdown.summary(method)}
            out[method] = _blank(summary, _THRESHOLDED_SUMMARY) if method in UNCALIBRATED else summary
        return out


def _score_rows(labelled: list[ManifestRow], controls: list[ManifestRow], backend: Backend, cfg: PhanesConfig,
                calibration: Calibration, names: Sequence[str], batch_size: int, skull_strip: str,
                progress: bool) -> dict[str | None, Scoreboard]:
    """Every row through the pipeline once, scored into the board of all rows (key None) and of its source."""
    boards: dict[str | None, Scoreboard] = {None: Scoreboard(names, calibration)}
    with LoggedProgress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"evaluating {len(labelled) + len(controls)} volume(s)",
                            total=len(labelled) + len(controls))
        for rows, lesioned in ((labelled, True), (controls, False)):
            for row in rows:
                result = evaluate_volume(row, backend, cfg, calibration, names, batch_size, skull_strip)
                source = row.extra.get("source")
                groups = [None] if source is None else [None, str(source)]
                for key in groups:
                    board = boards.setdefault(key, Scoreboard(names, calibration))
                    (board.add_lesioned if lesioned else board.add_control)(row, result, calibration)
                bar.advance(task)
    return boards


def _rows_to_score(manifest: Path, split: str, sources: Sequence[str]
                   ) -> tuple[list[ManifestRow], list[ManifestRow], list[ManifestRow], list[str], list[str]]:
    """All rows of the chosen sources, the split's labelled rows and healthy controls, the ids skipped
    (neither), and the note that names them."""
    rows = of_sources(read_manifest(manifest), sources, manifest)
    labelled, skipped = labelled_rows(rows, split, manifest)
    controls = [r for r in select(rows, split=split) if r.lesion_mask is None and r.kind == HEALTHY]
    skipped = [i for i in skipped if i not in {r.id for r in controls}]
    notes = [f"{len(skipped)} row(s) of split {split!r} have no lesion_mask and were skipped: "
             f"{', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}"] if skipped else []
    return rows, labelled, controls, skipped, notes


def _clipping_notes(method_summaries: dict[str, dict[str, Any]]) -> list[str]:
    return [f"{method}: {summary['clipped_fraction']:.2e} of brain voxels scored above {MAX_SCORE} "
            "and were counted in the top histogram bin"
            for method, summary in method_summaries.items() if summary["clipped_fraction"] > 0]


def _write_results(out: Path, summary: dict[str, Any], per_volume: pa.Table, controls: pa.Table | None,
                   synthetic_result: SyntheticResult | None) -> None:
    """Every file of an evaluation under `out`; summary.json last."""
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(out / PER_VOLUME_FILE, per_volume)
    if controls is not None:
        write_parquet(out / CONTROLS_FILE, controls)
    if synthetic_result is not None:
        write_parquet(out / SYNTHETIC_TABLE_FILE, synthetic_result.per_slice)
        write_json(out / SYNTHETIC_SUMMARY_FILE, summary["synthetic"])
    write_json(out / SUMMARY_FILE, summary)


def evaluate(options: EvaluateOptions) -> EvaluationResult:
    """Score `options.methods` of a calibrated bundle on the labelled rows of a manifest split; write the results
    to `options.out`.

    Writes summary.json (settings + per-method summary + synthetic summary), per_volume.parquet (one row
    per method and volume), healthy_controls.parquet (false positives per method and healthy control, when
    the split has any) and, with `synthetic`, synthetic.parquet/synthetic.json (paper Table 1).
    `sources`: only the rows whose manifest `source` column (`phanes data synth`: the source brain) is one of
    these, e.g. one test brain at a time.
    """
    names = options.validate()
    bundle, manifest, out = Path(options.bundle), Path(options.manifest), Path(options.out)
    split, sources, batch_size, skull_strip = options.split, options.sources, options.batch_size, options.skull_strip
    loaded = load_bundle(bundle)
    calibration, cfg = loaded.require_calibration(), loaded.config
    rows, labelled, controls, skipped, notes = _rows_to_score(manifest, split, sources)
    backend = choose_backend(options.backend, loaded, select_device(options.device), options.lpips_weights)

    boards = _score_rows(labelled, controls, backend, cfg, calibration, names, batch_size, skull_strip,
                         options.progress)
    every = boards.pop(None)
    method_summaries = every.summaries()
    by_source = {source: board.summaries() for source, board in sorted(boards.items())} if len(boards) > 1 else {}
    notes += _clipping_notes(method_summaries)
    synthetic_result = None
    if options.synthetic:
        healthy, source = synthetic_subjects(rows, split)
        if healthy:
            synthetic_result = run_synthetic(healthy, source, backend, cfg, calibration, names,
                                             n_slices=options.synthetic_slices, seed=options.seed,
                                             batch_size=batch_size, bins=BINS, max_score=MAX_SCORE,
                                             skull_strip=skull_strip)
        else:
            notes.append(f"synthetic protocol skipped: no healthy rows in split {split!r} nor in 'val'")
    for note in notes:
        warnings.warn(note, stacklevel=2)

    settings = {
        "bundle": str(bundle), "bundle_hash": loaded.hash, "config": cfg.name, "manifest": str(manifest),
        "split": split, "sources": list(sources),
        "n_volumes": len(labelled), "healthy_controls": [r.id for r in controls],
        "skipped_without_lesion_mask": skipped, "methods": list(names),
        "calibration": calibration.to_dict(), "slice_mode": cfg.preprocess.slice_mode, "bins": BINS,
        "max_score": MAX_SCORE, "device": str(backend.device), "date": datetime.now(timezone.utc).isoformat(),
        "phanes_version": __version__,
    }
    summary = _json_safe({"settings": settings, "methods": method_summaries, "by_source": by_source,
                          "synthetic": None if synthetic_result is None else synthetic_result.summary})
    per_volume = pa.Table.from_pylist(every.rows(), schema=PER_VOLUME_SCHEMA)
    _write_results(out, summary, per_volume, every.breakdown.table() if controls else None, synthetic_result)
    return EvaluationResult(summary=summary, per_volume=per_volume, synthetic=synthetic_result, out=out, warnings=notes)

