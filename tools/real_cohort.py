"""Write the manifest of the real training population: IXI and ds002748 individuals, split by subject and site.

Splits are seeded permutations within each site, so the same data folder always gives the same manifest:
- IXI (one site, Hammersmith, 2 mm heads with brain masks): `--val-per-site` validation subjects, `--test-ixi`
  test subjects, the rest training;
- ds002748 (another site and preparation, 1 mm skull-stripped and cropped): `--val-per-site` validation subjects,
  `--test-ds` test subjects, the rest training;
- held-out sites (never in training or validation): the individual brains of `healthy-t1/` and `head-t1/`, each
  from its own site and preparation, all test.
Every row carries its site, preparation, age and sex (extra manifest columns) so results can be reported per site.

Usage:
    python tools/real_cohort.py ../shared/data --out runs/real/manifest.parquet
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from phanes_cli.inputs.manifest import ManifestRow, write_manifest

HELD_OUT = {  # file under the data folder -> (site, preparation)
    "healthy-t1/niimath_adult_T1.nii.gz": ("niimath", "skull-stripped 0.8 mm"),
    "healthy-t1/antspy_colin27_ch2_T1.nii.gz": ("colin27", "skull-stripped 1 mm, 27 scans averaged"),
    "healthy-t1/niivue_fs_norm_T1.nii.gz": ("freesurfer", "FreeSurfer norm.mgz, 1 mm"),
    "head-t1/niivue_otsu_head_T1.nii.gz": ("niivue-head", "head with skull, 1 mm"),
    "head-t1/studyforrest_T1w.nii.gz": ("studyforrest", "defaced head with skull, 0.7 mm"),
}


def _tsv(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as handle:
        return {r["participant_id"]: r for r in csv.DictReader(handle, delimiter="\t")}


def _splits(ids: list[str], n_val: int, n_test: int, seed: int) -> dict[str, str]:
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    return {s: "val" if k < n_val else "test" if k < n_val + n_test else "train" for k, s in enumerate(order)}


def _age(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "n/a") else None
    except ValueError:
        return None


def ixi_rows(root: Path, n_val: int, n_test: int, seed: int) -> list[ManifestRow]:
    meta = _tsv(root / "ixi" / "participants.tsv")
    ids = sorted(p.name.removesuffix("_T1.nii.gz") for p in (root / "ixi" / "T1").glob("*_T1.nii.gz"))
    split = _splits(ids, n_val, n_test, seed)
    return [ManifestRow(id=f"ixi-{s}", image=root / "ixi" / "T1" / f"{s}_T1.nii.gz",
                        brain_mask=root / "ixi" / "brain_mask" / f"{s}_brain.nii.gz", split=split[s], kind="healthy",
                        extra={"site": "IXI-HH", "preparation": "head 2 mm, brain mask supplied",
                               "age": _age(meta.get(s, {}).get("age")), "sex": meta.get(s, {}).get("sex")})
            for s in ids]


def ds002748_rows(root: Path, n_val: int, n_test: int, seed: int) -> list[ManifestRow]:
    meta = _tsv(root / "ds002748" / "participants.tsv")
    ids = sorted(p.name.removesuffix("_T1w.nii.gz") for p in (root / "ds002748").glob("sub-*_T1w.nii.gz"))
    split = _splits(ids, n_val, n_test, seed)
    return [ManifestRow(id=f"ds002748-{s}", image=root / "ds002748" / f"{s}_T1w.nii.gz", split=split[s],
                        kind="healthy",
                        extra={"site": "ds002748", "preparation": "skull-stripped, cropped, 1 mm",
                               "age": _age(meta.get(s, {}).get("age")), "sex": meta.get(s, {}).get("gender")})
            for s in ids]


def held_out_rows(root: Path) -> list[ManifestRow]:
    return [ManifestRow(id=f"heldout-{site}", image=root / name, split="test", kind="healthy",
                        extra={"site": site, "preparation": prep, "age": None, "sex": None})
            for name, (site, prep) in HELD_OUT.items() if (root / name).exists()]


def cohort_rows(root: Path, val_per_site: int = 6, test_ixi: int = 40, test_ds: int = 8,
                seed: int = 0) -> list[ManifestRow]:
    """Every row of the real-cohort manifest (absolute paths into `root`)."""
    root = root.resolve()
    return ixi_rows(root, val_per_site, test_ixi, seed) + ds002748_rows(root, val_per_site, test_ds, seed) \
        + held_out_rows(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the shared data folder (holds ixi/ and ds002748/)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--val-per-site", type=int, default=6)
    parser.add_argument("--test-ixi", type=int, default=40)
    parser.add_argument("--test-ds", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = cohort_rows(args.data, args.val_per_site, args.test_ixi, args.test_ds, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(rows, args.out)
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        counts[(str(r.extra["site"]), r.split)] = counts.get((str(r.extra["site"]), r.split), 0) + 1
    for (site, split), n in sorted(counts.items()):
        print(f"{site:14s} {split:5s} {n}")
    print(f"wrote {args.out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
