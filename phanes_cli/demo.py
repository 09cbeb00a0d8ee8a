"""`make demo`: the whole product on the embedded data, as a user would run it.

Builds a small cohort from real brains (nilearn's MNI152 and the six T1s shipped with phanes) and individual
label maps (healthy subjects with realistic variation, split by source brain: two validation and two test
brains; lesion subjects with real stroke shapes and exact ground truth), trains the demo-size model,
calibrates it (tuned on validation lesions within a healthy false-positive budget), screens the test subjects,
scores them against the ground truth, renders the HTML report, and says where everything went. The same test
subjects are then screened and scored with the pretrained model shipped with phanes (what `phanes screen` uses
without --bundle), and the two models' figures are printed side by side: the small model shows the road to a
model of one's own, the shipped one what phanes can do. Each step is the real `phanes` command, printed
before it runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from rich.markup import escape
from rich.table import Table

from phanes_cli.core.shipped_models import shipped_bundles
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


def _burden_table(runs: dict[str, Path], truth: dict[str, float]) -> Table:
    """Per test volume: the true lesion volume and each model's lesion burden (`phanes screen`)."""
    table = Table(title="Lesion burden per volume (phanes screen) against the true lesion volume")
    table.add_column("id", no_wrap=True)
    table.add_column("true mL", justify="right")
    burden: dict[str, dict[str, Any]] = {}
    for name, screen_dir in runs.items():
        table.add_column(f"{name}: burden mL (lesions)", justify="right")
        burden[name] = {r["id"]: r for r in pq.read_table(screen_dir / "volumes.parquet").to_pylist()}
    for vid in sorted(set().union(*(b.keys() for b in burden.values()))):
        cells = [_fmt(truth.get(vid), 2)]
        for name in runs:
            row = burden[name].get(vid, {})
            cells.append(f"{_fmt(row.get('lesion_burden_ml'), 2)} ({_fmt(row.get('lesion_count'), 0)})")
        table.add_row(escape(vid), *cells)
    return table


def _scores_table(evaluations: dict[str, Path]) -> Table:
    """Each model's pooled figures on the test subjects (`phanes evaluate` summary.json)."""
    table = Table(title="Against the ground truth (phanes evaluate, test subjects, pooled)")
    table.add_column("model", no_wrap=True)
    for col in ("AUPRC %", "Dice %", "|burden error| mL (mean)", "healthy controls: false mL (median)"):
        table.add_column(col, justify="right")
    for name, folder in evaluations.items():
        m = json.loads((folder / "summary.json").read_text())["methods"]["phanes"]
        controls = m.get("healthy_controls") or {}
        table.add_row(escape(name), _fmt(100 * m["auprc"], 1), _fmt(100 * m["dice"], 1),
                      _fmt(m.get("abs_volume_error_ml_mean"), 1), _fmt(controls.get("fp_ml_median"), 1))
    return table


def _truth_ml(evaluation: Path) -> dict[str, float]:
    rows = pq.read_table(evaluation / "per_volume.parquet").to_pylist()
    return {r["id"]: r["true_ml"] for r in rows if r["method"] == "phanes"}


def _fmt(value: Any, digits: int) -> str:
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
    runs, evaluations = {"demo model (trained here)": screened}, {"demo model (trained here)": evaluation}
    if shipped_bundles():
        shipped_screen, shipped_eval = out / "screen-shipped", out / "evaluation-shipped"
        _run(["screen", str(lesion_list), "--out", str(shipped_screen)])
        _run(["evaluate", "--bundle", str(shipped_bundles()[0]), "--data", str(manifest), "--out", str(shipped_eval),
              "--split", "test", "--no-synthetic"])
        _run(["report", str(shipped_screen), "--out", str(shipped_screen / "report.html"), "--top", "4"])
        runs["shipped model"], evaluations["shipped model"] = shipped_screen, shipped_eval
    console.rule("[bold green]demo finished")
    console.print(_burden_table(runs, _truth_ml(evaluation)))
    console.print(_scores_table(evaluations))
    console.print(f"Finished in {(time.perf_counter() - start) / 60:.1f} min. What it produced:")
    for label, path in (
        ("synthetic cohort (NIfTI + manifest.parquet)", cohort),
        ("trained, calibrated model bundle", bundle),
        ("per-volume anomaly maps, lesion masks, pseudo-healthy images", screened),
        ("lesion-burden tables: volumes.parquet, lesions.parquet, failures.parquet", screened),
        ("evaluation against ground truth: summary.json, per_volume.parquet", evaluation),
        ("cohort report (open in any browser; QC figures in report/figures/)", report),
        *((("the same with the shipped model", out / "screen-shipped"),) if len(runs) > 1 else ()),
    ):
        console.print(f"  • {label}: [bold]{escape(str(path))}[/]")


if __name__ == "__main__":
    main()
