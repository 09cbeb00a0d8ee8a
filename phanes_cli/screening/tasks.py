"""The CPU stages of screening: decode + preprocess a volume, and restore + measure + write its results.

Both run as Ray tasks but are plain functions (no Ray import), so tests and the benchmark can call them
directly. They never raise for a bad volume: an error becomes a `Failure` in the returned record, and
the driver writes it to the failures table. Only a crash of the worker process itself reaches the driver
as an exception.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from phanes_cli.config import PreprocessConfig
from phanes_cli.core.bundle import load_bundle
from phanes_cli.core.calibration import Calibration
from phanes_cli.core.pipeline import ModelMaps, restore_maps
from phanes_cli.core.preprocess import SliceGeometry, prepare_volume
from phanes_cli.core.recipe import measure_volume
from phanes_cli.core.volume_io import Volume, save_like
from phanes_cli.errors import InputError
from phanes_cli.inputs.brain_masks import load_checked, looks_unstripped
from phanes_cli.inputs.manifest import ManifestRow
from phanes_cli.run_folder.commit import commit_volume, input_sha256, input_signature
from phanes_cli.run_folder.failures import Failure
from phanes_cli.run_folder.layout import OutputLayout
from phanes_cli.run_folder.schemas import manifest_columns
from phanes_cli.screening.bids_derivative import write_sidecar


def node_ip() -> str:
    """The address of the node this code runs on (Ray's view when inside Ray, else the host name)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return socket.gethostname()


def describe(exc: BaseException) -> tuple[str, str]:
    """(error type, one-line message) for a failure row; input errors give their reason only."""
    if isinstance(exc, InputError):
        return type(exc).__name__, exc.reason
    message = str(exc).strip().splitlines()
    return type(exc).__name__, (message[0] if message else repr(exc))[:2000]


@dataclass(frozen=True)
class ModelSlices:
    """What the inference actor needs: the volume's model-grid slices, as numpy for zero-copy transfer."""

    slices: np.ndarray  # (N, 1, S, S) float32 in [0, 1]
    brain: np.ndarray  # (N, 1, S, S) float32 in {0, 1}


@dataclass(frozen=True)
class VolumeContext:
    """What the write stage needs to go back to the input's space; stays in the object store meanwhile."""

    volume: Volume
    brain: np.ndarray  # (X, Y, Z) bool on the RAS+ grid
    geometry: SliceGeometry
    scale: float
    brain_source: str  # file, model or threshold (inputs.brain_masks.brain_mask_for)
    qc_flags: tuple[str, ...] = ()  # quality.check_volume warnings (fatal flags fail the volume instead)


@dataclass(frozen=True)
class DecodeResult:
    """The small record the driver reads after decoding; the big parts travel as separate objects."""

    failure: Failure | None
    seconds: float
    node: str
    n_slices: int = 0
    qc_flags: tuple[str, ...] = ()
    brain_mask_s: float = 0.0  # the part of `seconds` spent on the brain mask (file, model or threshold)
    input_sha256: str | None = None  # of the input file as read


def backend_speed(bundle_path: str, backend: str, threads: int, lpips_weights: str | None) -> tuple[float, bool]:
    """(slices/s, timed just now) of `backend` at `threads` threads on this node (`runtimes.select.cpu_speed`): the
    plan's measurement, run as a Ray task so that the driver never loads a network."""
    from phanes_cli.runtimes.select import cpu_speed

    said: list[str] = []
    speed = cpu_speed(backend, load_bundle(bundle_path), threads, lpips_weights, said.append)
    return speed, bool(said)


def decode_volume(row: ManifestRow, cfg: PreprocessConfig, max_voxels: int, skull_strip: str
                  ) -> tuple[DecodeResult, ModelSlices | None, VolumeContext | None]:
    """Read, validate and preprocess one volume: (record, model slices, context for the write stage)."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        checked = load_checked(row.image, row.brain_mask, max_voxels, skull_strip, timings=timings)
        prepared = prepare_volume(checked.volume.data, checked.brain, cfg, checked.volume.zooms)
        digest = input_sha256(row.image)
    except InputError as exc:
        kind, message = describe(exc)
        if exc.path != str(row.image):
            message = f"{exc.path}: {message}"
        failure = Failure("decode", kind, message, retry_on_resume=exc.retryable)
        return DecodeResult(failure, time.perf_counter() - start, node_ip()), None, None
    except Exception as exc:  # any other error (memory, a library bug) fails this volume only
        kind, message = describe(exc)
        return DecodeResult(Failure("decode", kind, message), time.perf_counter() - start, node_ip()), None, None
    slices = ModelSlices(prepared.slices.numpy(), prepared.brain.numpy())
    context = VolumeContext(volume=checked.volume, brain=checked.brain, geometry=prepared.geometry,
                            scale=prepared.scale, brain_source=checked.source, qc_flags=checked.qc_flags)
    decoded = DecodeResult(None, time.perf_counter() - start, node_ip(), prepared.geometry.n_slices, checked.qc_flags,
                           timings["brain_mask_s"], digest)
    return decoded, slices, context


@dataclass(frozen=True)
class InferenceResult:
    """The actor's small record; the maps travel as a separate object."""

    failure: Failure | None
    seconds: float
    node: str
    pid: int
    backend: str = ""  # what the actor actually ran (`--backend auto` resolves per actor)


@dataclass(frozen=True)
class WriteJob:
    """Everything the write stage needs besides the two big objects."""

    row: ManifestRow
    out: Path
    outputs: frozenset[str]
    calibration: Calibration
    backend: str
    bundle_hash: str
    bundle_key: str = ""  # `Bundle.content_key`, recorded in the done marker for resume


@dataclass(frozen=True)
class WriteResult:
    """What the driver learns about a finished volume (small; no arrays)."""

    failure: Failure | None
    stages_s: float  # time inside decode, inference and write, the commit included (the row's runtime_s is not)
    node: str
    lesion_count: int = 0
    lesion_burden_ml: float = 0.0
    qc_flags: tuple[str, ...] = ()  # the decode stage's quality warnings, for the driver's log


def write_volume(job: WriteJob, decoded: DecodeResult, inferred: InferenceResult, context: VolumeContext | None,
                 maps: ModelMaps | None) -> WriteResult:
    """Restore, measure and commit one volume: maps (atomic), lesion rows, volume row, done marker.

    The driver submits this right behind the decode and inference calls it depends on, so a volume goes
    through all three stages without waiting on the driver; a failure of an earlier stage is passed on.
    """
    torch.set_num_threads(1)
    start = time.perf_counter()
    earlier = decoded.failure or inferred.failure
    if earlier is not None or context is None or maps is None:
        failure = earlier or Failure("write", "RuntimeError", "the earlier stages returned no data")
        return WriteResult(failure, decoded.seconds + inferred.seconds, node_ip(), qc_flags=decoded.qc_flags)
    return commit_outputs(job, decoded, inferred, context, maps, start)


def write_bids_files(job: WriteJob, layout: OutputLayout, context: VolumeContext) -> None:
    """`--layout bids`: the sidecar of every map, the brain mask's (`desc-brain_mask`) included."""
    vid, volume = job.row.id, context.volume
    given = [job.row.brain_mask] if context.brain_source == "file" and job.row.brain_mask is not None else []
    write_sidecar(layout, vid, "brain_mask", [job.row.image, *given], job.bundle_hash, job.calibration,
                  BrainMaskSource=context.brain_source)
    for kind in sorted(job.outputs):
        derived = ("anomaly",) if kind == "lesion_mask" and "anomaly" in job.outputs else ()
        fields = {"SkullStripped": not looks_unstripped(volume, context.brain)} if kind == "pseudohealthy" else {}
        write_sidecar(layout, vid, kind, [job.row.image], job.bundle_hash, job.calibration, derived, **fields)


def commit_outputs(job: WriteJob, decoded: DecodeResult, inferred: InferenceResult, context: VolumeContext,
                   maps: ModelMaps, start: float) -> WriteResult:
    """The write stage proper: restore the maps, measure, save and commit (`write_volume`)."""
    layout = OutputLayout(job.out)
    vid, volume = job.row.id, context.volume
    earlier_s = decoded.seconds + inferred.seconds
    try:
        native = restore_maps(maps, context.geometry, context.brain, context.scale, volume.data)
        measures = measure_volume(vid, volume, context.brain, native.anomaly, job.calibration, context.qc_flags)
        arrays = {"anomaly": (native.anomaly, np.float32),
                  "lesion_mask": (measures.lesion_mask.astype(np.uint8), np.uint8),
                  "pseudohealthy": (native.pseudo_healthy, np.float32)}
        for kind in sorted(job.outputs):
            array, dtype = arrays[kind]
            if array is None:
                raise RuntimeError(f"output {kind!r} was requested but the inference stage did not return it")
            save_like(array, volume, layout.map_path(vid, kind), dtype)
        brain_path = save_like(context.brain.astype(np.uint8), volume, layout.map_path(vid, "brain_mask"), np.uint8)
        if layout.bids:
            write_bids_files(job, layout, context)
        write_s = time.perf_counter() - start
        row = {
            **manifest_columns(job.row.extra), "id": vid, "input_path": str(job.row.image),
            "input_sha256": decoded.input_sha256, "status": "ok",
            "brain_mask_source": context.brain_source, "brain_mask_path": layout.relative(brain_path),
            **measures.row,
            "slices_processed": decoded.n_slices, "slices_inpainted": maps.slices_inpainted,
            "backend": inferred.backend or job.backend, "bundle_hash": job.bundle_hash,
            "runtime_s": earlier_s + write_s,
            "decode_s": decoded.seconds, "brain_mask_s": decoded.brain_mask_s, "inference_s": inferred.seconds,
            "write_s": write_s,
            "decode_node": decoded.node, "inference_node": inferred.node, "write_node": node_ip(),
        }
        marker = {"id": vid, "input_path": str(job.row.image), "input_signature": list(input_signature(job.row.image)),
                  "bundle_hash": job.bundle_hash, "bundle_key": job.bundle_key,
                  "min_lesion_ml": job.calibration.min_lesion_ml,
                  "outputs": sorted(job.outputs),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        commit_volume(layout, vid, row, measures.lesions, marker)
    except Exception as exc:  # a disk or memory error fails this volume only
        kind, message = describe(exc)
        return WriteResult(Failure("write", kind, message), earlier_s + time.perf_counter() - start, node_ip(),
                           qc_flags=decoded.qc_flags)
    return WriteResult(None, earlier_s + time.perf_counter() - start, node_ip(), measures.row["lesion_count"],
                       measures.row["lesion_burden_ml"], context.qc_flags)
