"""End-to-end screening throughput: `phanes screen` of real volumes through the real Ray path, per CPU backend.

What a user feels: volumes per hour of the stream (`run.json` ray.stream_s: from the actors being ready to the
last volume written; actor start-up is reported apart) and seconds per volume in each stage, read from the
run's own volumes.parquet (`decode_s` less `brain_mask_s`, `brain_mask_s`, `inference_s`, `write_s`: stage
times of overlapping volumes, so they add up to more than stream time / volumes), plus the share of slices that
went through stage 2 (`slices_inpainted` / `slices_processed`; the others skip it). One screen per backend,
mask mode and plan, each with its own local Ray instance, all on the same volumes; one table at the end. Each
run's lesion masks (maps/<id>_lesionmask.nii.gz) are compared voxel by voxel with those of the first fp32 run
(torch, onnxruntime, openvino) of the same mask mode: agreement over every voxel of every volume, and Dice of
the pooled masks, so a cheaper backend's speed is shown next to what it changes in the output.
A second table says where the actors' time went, per slice: inside each network (stage 1, stage 2, LPIPS), the
rest of the actor's `infer` (pre/post-processing, copies) and the actors' idle time (waiting for decoded slices),
from the run record (`run.json` ray.actor_profiles), next to the same backend's in-process figures at the actors'
thread count (`runtimes.timing.measure`, what `phanes bench` and `--backend auto` measure, on slices of the shipped
brains) measured right after that run, so a gap between the bench and the stream shows which part it is in.

Inputs: folders, globs or a CSV/Parquet list, as `phanes screen` takes them (skull-stripped T1 volumes). The
first --volumes of them are used, the list repeated under new ids when shorter. Masks `supplied`: each
volume's listed brain mask, else one made once beforehand (phanes' own rule: threshold, or deepbet on heads)
and handed over as a file; `computed`: no mask given, the decode task makes it (its time is brain_mask_s).

Bundle: --bundle (default: the shipped model), never written to: a bundle without ONNX graphs is copied into
the work folder and exported there. --config instead builds an untrained bundle of that config (speed only:
its mask threshold is the healthy 99th percentile of m(x) on the shipped MNI152 slices, so its skip rate is not
a trained model's). Backends: every one in `phanes_cli.runtimes.BACKENDS` that can run on the CPU here.

Usage:
  python benchmarks/screen_throughput.py INPUTS... [--bundle B | --config configs/paper.yaml] [--volumes 12]
      [--masks supplied computed] [--backends torch onnxruntime] [--actors N ...] [--threads T ...]
      [--batch-size 32] [--node-ip 127.0.0.2] [--work DIR] [--json FILE]
docs/measurements.md (Screening throughput) names the volumes and the commands of the recorded figures.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from rich.console import Console
from rich.table import Table

from phanes_cli.core.bundle import Bundle, load_bundle, save_bundle
from phanes_cli.core.calibration import Calibration
from phanes_cli.core.volume_io import load_volume, save_like
from phanes_cli.inputs.brain_masks import brain_mask_for
from phanes_cli.inputs.discovery import resolve_inputs
from phanes_cli.inputs.manifest import ManifestRow
from phanes_cli.runtimes import BACKENDS
from phanes_cli.runtimes.parity import dice
from phanes_cli.screening.engine import screen
from phanes_cli.screening.options import ScreenOptions
from phanes_cli.screening.session import local_cpus

CPU = torch.device("cpu")
STAGES = ("decode", "brain mask", "inference", "write")
FP32_BACKENDS = ("torch", "onnxruntime", "openvino")  # the references of the mask comparison


def pick_volumes(inputs: list[str], n: int) -> list[ManifestRow]:
    """The first n input volumes, the list repeated under new ids (`<id>-r2`, ...) when it is shorter."""
    rows = resolve_inputs(inputs)
    picked = []
    for i, row in zip(range(n), itertools.cycle(rows)):
        repeat = i // len(rows)
        picked.append(row if repeat == 0 else ManifestRow(id=f"{row.id}-r{repeat + 1}", image=row.image,
                                                          brain_mask=row.brain_mask))
    return picked


def write_lists(rows: list[ManifestRow], work: Path) -> dict[str, Path]:
    """CSV volume lists: `supplied` (a brain mask per volume, made once here when the input has none) and
    `computed` (images only)."""
    made: dict[Path, Path] = {}
    (work / "masks").mkdir(parents=True, exist_ok=True)
    supplied, computed = [], []
    for row in rows:
        mask = row.brain_mask or made.get(row.image)
        if mask is None:
            mask = made[row.image] = work / "masks" / f"{len(made):04d}_brainmask.nii.gz"
            volume = load_volume(row.image)
            save_like(brain_mask_for(volume, None, "auto")[0].astype(np.uint8), volume, mask, np.uint8)
        supplied.append({"id": row.id, "image": str(row.image), "brain_mask": str(mask)})
        computed.append({"id": row.id, "image": str(row.image)})
    lists = {"supplied": work / "supplied.csv", "computed": work / "computed.csv"}
    for name, table in (("supplied", supplied), ("computed", computed)):
        with open(lists[name], "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    return lists


def untrained_bundle(config: Path, folder: Path) -> Path:
    """A seeded untrained bundle of `config`, calibrated for speed runs only (module docstring)."""
    from phanes_cli.config import load_config
    from phanes_cli.core.percentiles import stage1_percentile
    from phanes_cli.runtimes.pytorch import PhanesNetworks, TorchBackend
    from phanes_cli.runtimes.samples import brain_slices

    torch.manual_seed(0)
    cfg = load_config(config)
    nets = PhanesNetworks(cfg)
    x, brain = brain_slices(cfg.preprocess, 32)
    level = stage1_percentile(TorchBackend(nets, CPU), x, brain, cfg.mask)
    save_bundle(folder, cfg, nets.ra, nets.generator, Calibration(mask_threshold=level, anomaly_threshold=level),
                extra={"untrained": True})
    return folder


def with_onnx(bundle: Path, work: Path, untrained: bool) -> Path:
    """`bundle`, or an exported copy of it in `work` when it has no ONNX graphs (the original is never written).

    An untrained bundle gates the OpenVINO backends only: its INT8 verdict would judge random weights, at a
    paper-size bundle's cost of many minutes (its OpenVINO verdicts judge them too: speed only)."""
    from phanes_cli.runtimes.select import unusable_reason

    if unusable_reason("onnxruntime", load_bundle(bundle), CPU) is None:
        return bundle
    from phanes_cli.runtimes.export import export_bundle

    copy = Path(shutil.copytree(bundle, work / "bundle-exported", dirs_exist_ok=True))
    try:
        export_bundle(copy, gated=["openvino", "openvino-bf16"] if untrained else None)
    except Exception as exc:  # the [onnx] extra missing, say: torch still runs
        print(f"ONNX export failed ({exc}); ONNX Runtime is left out")
        return bundle
    return copy


def usable_backends(bundle: Bundle, asked: list[str] | None, console: Console) -> list[str]:
    """The CPU backends that can run `bundle` here (the reason printed for each one that cannot)."""
    from phanes_cli.runtimes.select import unusable_reason

    usable = []
    for name in asked or list(BACKENDS):
        reason = unusable_reason(name, bundle, CPU)
        if reason is None:
            usable.append(name)
        else:
            console.print(f"[dim]{name}: left out ({reason})[/]")
    return usable


def measure(volume_list: Path, bundle: Path, out: Path, backend: str, actors: int | None, threads: int | None,
            args: argparse.Namespace) -> dict[str, Any]:
    """One `phanes screen` run; its figures from its own run.json and volumes.parquet."""
    options = ScreenOptions(bundle=bundle, out=out, backend=backend, num_actors=actors, threads_per_actor=threads,
                            batch_size=args.batch_size, quiet=True, node_ip=args.node_ip)
    started = time.perf_counter()
    summary = screen([str(volume_list)], options)
    wall = time.perf_counter() - started
    ray_info = json.loads((out / "run.json").read_text())["ray"]
    ok = [r for r in pq.read_table(out / "volumes.parquet").to_pylist() if r["status"] == "ok"]

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in ok])) if ok else float("nan")

    stages = {"decode": mean("decode_s") - mean("brain_mask_s"), "brain mask": mean("brain_mask_s"),
              "inference": mean("inference_s"), "write": mean("write_s")}
    ran = {r["backend"] for r in ok}
    return {"ran": ",".join(sorted(ran)), "profile": actor_profile(ray_info.get("actor_profiles", [])),
            "backend": backend, "done": summary.done, "failed": summary.failed, "wall_s": wall,
            "stream_s": ray_info["stream_s"], "startup_s": ray_info["startup_s"],
            "volumes_per_hour": 3600 * summary.done / ray_info["stream_s"],
            "actors": ray_info["actors"], "threads": ray_info["threads_per_actor"],
            "cpus_per_actor": ray_info["cpus_per_actor"], "seconds_per_volume": stages,
            "slices_per_volume": mean("slices_processed"),
            "inpainted_fraction": mean("slices_inpainted") / max(1.0, mean("slices_processed"))}


PARTS = ("stage1", "stage2", "lpips", "pre/post")


def actor_profile(profiles: list[dict[str, Any]]) -> dict[str, float]:
    """Milliseconds per slice in each part, summed over the actors, and their idle seconds per volume."""
    keys = ("slices", "volumes", "infer_s", "idle_s", "stage1_s", "stage2_s", "lpips_s")
    total = {key: sum(p.get(key, 0.0) for p in profiles) for key in keys}  # network seconds: CPU actors only
    slices = max(1, total["slices"])
    networks = total["stage1_s"] + total["stage2_s"] + total["lpips_s"]
    return {**{part: 1000 * total[f"{part}_s"] / slices for part in PARTS[:3]},
            "pre/post": 1000 * (total["infer_s"] - networks) / slices, "total": 1000 * total["infer_s"] / slices,
            "idle_s_per_volume": total["idle_s"] / max(1, total["volumes"]),
            "threads": max((p["torch_threads"] for p in profiles), default=0)}


def bench_profile(bundle: Bundle, backend: str, threads: int) -> dict[str, float]:
    """The same parts, per slice, of `backend` in this process at `threads` threads (`timing.measure`)."""
    from phanes_cli.runtimes.parity import reference_mask_threshold
    from phanes_cli.runtimes.samples import GATE_BRAINS, shipped_brain_slices
    from phanes_cli.runtimes.select import build_backend
    from phanes_cli.runtimes.timing import measure as time_backends

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        x, brain = shipped_brain_slices(bundle.config.preprocess, GATE_BRAINS, 11)
        built = build_backend(backend, bundle, CPU)
        level = reference_mask_threshold(bundle, built, x[:8], brain[:8])
        r = time_backends({backend: built}, bundle, level, x, brain, 32, 2)[backend]
    finally:
        torch.set_num_threads(before)
    n = x.shape[0]
    return {"stage1": 1000 * r["stage1_s"] / n, "stage2": 1000 * r["stage2_s"] / n, "lpips": 1000 * r["lpips_s"] / n,
            "pre/post": 1000 * r["other_s"] / n, "total": 1000 * r["total_s"] / n, "threads": threads}


def profile_table(results: list[dict[str, Any]]) -> Table:
    table = Table(title="where the time goes, ms per slice: the actors in the stream vs the bench in one process")
    for column in ("backend", "masks", "where", "threads", *(f"{p}" for p in PARTS), "total", "idle s/vol"):
        table.add_column(column, justify="right")
    for r in results:
        for where, figures in (("actors", r["profile"]), ("bench", r.get("bench"))):
            if figures:
                idle = f"{figures['idle_s_per_volume']:.2f}" if "idle_s_per_volume" in figures else "-"
                table.add_row(r["backend"], r["masks"], where, str(figures["threads"]),
                              *(f"{figures[p]:.1f}" for p in PARTS), f"{figures['total']:.1f}", idle)
    return table


def lesion_masks(out: Path) -> dict[str, np.ndarray]:
    """Every volume's lesion mask of one run, by file name."""
    return {p.name: load_volume(p).data > 0 for p in sorted((out / "maps").glob("*_lesionmask.nii.gz"))}


def mask_agreement(out: Path, want: dict[str, np.ndarray]) -> dict[str, float]:
    """Voxel agreement and pooled Dice of a run's lesion masks against the reference run's, over shared volumes."""
    got = lesion_masks(out)
    same = [name for name in want if name in got]
    a = np.concatenate([got[n].ravel() for n in same]) if same else np.zeros(0, bool)
    b = np.concatenate([want[n].ravel() for n in same]) if same else np.zeros(0, bool)
    return {"agreement": float((a == b).mean()) if same else 1.0, "dice": dice(a, b),
            "reference_voxels": int(b.sum()), "volumes": len(same)}


def table_of(results: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in ("backend", "masks", "actors x threads", "volumes", "vol/h", "stream s", "startup s",
                   *(f"{s} s/vol" for s in STAGES), "slices/vol", "stage 2 on", "lesion masks vs"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(r["backend"], r["masks"], f"{r['actors']} x {r['threads']}",
                      f"{r['done']}/{r['done'] + r['failed']}",
                      f"{r['volumes_per_hour']:.0f}", f"{r['stream_s']:.1f}", f"{r['startup_s']:.1f}",
                      *(f"{r['seconds_per_volume'][s]:.2f}" for s in STAGES), f"{r['slices_per_volume']:.0f}",
                      f"{100 * r['inpainted_fraction']:.0f}%", _versus(r))
    return table


def _versus(result: dict[str, Any]) -> str:
    figures = result.get("masks_vs")
    if figures is None:
        return "reference" if result.get("mask_reference") else "-"
    return f"{figures['reference']}: {100 * figures['agreement']:.4f}%, Dice {figures['dice']:.4f}"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="folders, globs or a CSV/Parquet list of skull-stripped T1 volumes")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--bundle", type=Path, help="a calibrated bundle (default: the shipped model)")
    source.add_argument("--config", type=Path, help="an untrained bundle of this config instead (speed only)")
    parser.add_argument("--volumes", type=int, default=12)
    parser.add_argument("--masks", nargs="+", choices=("supplied", "computed"), default=["supplied", "computed"])
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: every backend usable on the CPU; `auto` screens with what it chooses")
    parser.add_argument("--actors", type=int, nargs="+", default=[None], help="default: the planned count")
    parser.add_argument("--threads", type=int, nargs="+", default=[None], help="threads per actor; default: planned")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--node-ip", default=None, help="address of the local Ray instances (default: Ray's choice)")
    parser.add_argument("--work", type=Path, default=None, help="work folder, kept (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args()


def run(args: argparse.Namespace, work: Path, console: Console) -> list[dict[str, Any]]:
    if args.config is not None:
        bundle = untrained_bundle(args.config, work / "bundle-untrained")
    else:
        from phanes_cli.core.shipped_models import default_bundle

        bundle = args.bundle or default_bundle()
    bundle = with_onnx(bundle, work, untrained=args.config is not None)
    backends = usable_backends(load_bundle(bundle), args.backends, console)
    lists = write_lists(pick_volumes(args.inputs, args.volumes), work)
    results: list[dict[str, Any]] = []
    references: dict[str, tuple[str, dict[str, np.ndarray]]] = {}  # mask mode -> first fp32 run's lesion masks
    for masks, backend, actors, threads in itertools.product(args.masks, backends, args.actors, args.threads):
        out = work / f"out-{masks}-{backend}-{actors or 'plan'}x{threads or 'plan'}"
        shutil.rmtree(out, ignore_errors=True)
        console.print(f"screening {args.volumes} volumes: {backend}, masks {masks}, actors {actors or 'planned'}, "
                      f"threads {threads or 'planned'}")
        result = {"masks": masks, **measure(lists[masks], bundle, out, backend, actors, threads, args)}
        if result["ran"] in BACKENDS:  # `auto` resolved to one backend: the bench of that one, at the actors' threads
            result["bench"] = bench_profile(load_bundle(bundle), result["ran"], result["profile"]["threads"])
        reference = references.get(masks)
        if reference is None and backend in FP32_BACKENDS:
            references[masks], result["mask_reference"] = (backend, lesion_masks(out)), True
        elif reference is not None:
            result["masks_vs"] = {"reference": reference[0], **mask_agreement(out, reference[1])}
        results.append(result)
    return results


def main() -> None:
    args = parse()
    console = Console(width=160)
    with tempfile.TemporaryDirectory(prefix="phanes-throughput-") as tmp:
        work = (args.work or Path(tmp)).resolve()  # the lists name files by absolute path
        work.mkdir(parents=True, exist_ok=True)
        results = run(args, work, console)
    title = f"phanes screen throughput: {local_cpus()} CPUs, batch {args.batch_size}, {args.volumes} volumes"
    console.print(table_of(results, title))
    console.print(profile_table(results))
    console.print("vol/h = volumes / stream s (actors ready -> last volume written); stage seconds are per volume "
                  "inside each stage (stages of different volumes overlap); 'stage 2 on' = slices with a non-empty "
                  "inpainting mask.")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
