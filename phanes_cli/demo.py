"""`make demo`: the whole product on the embedded data, as a user would run it.

Builds a small cohort from real brains (nilearn's MNI152 and the six T1s shipped with phanes) and individual
label maps (healthy subjects with realistic variation, split by source brain: two validation and two test
brains; lesion subjects with real stroke shapes and exact ground truth), trains the demo-size model,
calibrates it (tuned on validation lesions within a healthy false-positive budget), screens the test subjects,
scores them against the ground truth, renders the HTML report, and says where everything went.
Each step is the real `phanes` command, printed before it runs.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from rich.markup import escape
from rich.table import Table

from phanes_cli.infra.consoles import table_console
from phanes_cli.inputs.manifest import read_manifest

console = table_console()  # tables stay whole when the demo is logged to a file
REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> None:
    console.rule(f"[bold]phanes {args[0]}{' ' + args[1] if args[0] == 'data' else ''}")
    console.print(f"$ phanes {shlex.join(args)}", style="cyan", markup=False)
    start = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", "phanes_cli.cli", *args])
    if code != 0:
        console.print(f"[bold red]step failed with exit status {code}[/]; earlier outputs are kept")
        raise SystemExit(code)
    console.print(f"[dim]done in {time.perf_counter() - start:.0f} s[/]")


def _lesion_list(manifest: Path, out: Path) -> Path:
    """A CSV of the test-split lesion subjects: the cohort the demo screens."""
    rows = [r for r in read_manifest(manifest) if r.split == "test"]
    lines = ["id,image,brain_mask"] + [f"{r.id},{r.image},{r.brain_mask or ''}" for r in rows]
    out.write_text("\n".join(lines) + "\n")
    return out


def _burden_table(screen_dir: Path) -> Table:
    volumes = pq.read_table(screen_dir / "volumes.parquet").to_pylist()
    table = Table(title="Lesion burden per volume (phanes screen)")
    table.add_column("id", no_wrap=True)
    for col in ("brain mL", "lesion burden mL", "lesions", "largest mL", "max score", "status"):
        table.add_column(col, justify="right")
    for row in volumes:
        cells = [_fmt(row.get(key), digits) for key, digits in (
            ("brain_volume_ml", 0), ("lesion_burden_ml", 2), ("lesion_count", 0), ("largest_lesion_ml", 2),
            ("max_anomaly", 3))]
        table.add_row(escape(str(row["id"])), *cells, str(row["status"]))
    return table


def _fmt(value: float | int | None, digits: int) -> str:
    """A table cell; a failed volume's metrics are null and show as a dash."""
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--healthy", type=int, default=10)
    parser.add_argument("--lesions", type=int, default=4)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    args = parser.parse_args()
    out = args.out.absolute()
    cohort, bundle, screened, evaluation = out / "cohort", out / "bundle", out / "screen", out / "evaluation"
    start = time.perf_counter()
    _run(["data", "synth", "--out", str(cohort), "--healthy", str(args.healthy), "--lesions", str(args.lesions),
          "--seed", "0"])
    manifest = cohort / "manifest.parquet"
    resume = ["--resume"] if (bundle / "checkpoints").exists() else []
    _run(["train", "--config", str(args.config), "--data", str(manifest), "--out", str(bundle), *resume])
    lesion_list = _lesion_list(manifest, out / "lesion_subjects.csv")
    _run(["screen", str(lesion_list), "--bundle", str(bundle), "--out", str(screened), "--pseudo-healthy"])
    _run(["evaluate", "--bundle", str(bundle), "--data", str(manifest), "--out", str(evaluation), "--split", "test"])
    report = screened / "report.html"
    _run(["report", str(screened), "--out", str(report), "--top", "4"])
    console.rule("[bold green]demo finished")
    console.print(_burden_table(screened))
    console.print(f"Finished in {(time.perf_counter() - start) / 60:.1f} min. What it produced:")
    for label, path in (
        ("synthetic cohort (NIfTI + manifest.parquet)", cohort),
        ("trained, calibrated model bundle", bundle),
        ("per-volume anomaly maps, lesion masks, pseudo-healthy images", screened),
        ("lesion-burden tables: volumes.parquet, lesions.parquet, failures.parquet", screened),
        ("evaluation against ground truth: summary.json, per_volume.parquet", evaluation),
        ("cohort report (open in any browser; QC figures in report/figures/)", report),
    ):
        console.print(f"  • {label}: [bold]{escape(str(path))}[/]")


if __name__ == "__main__":
    main()
