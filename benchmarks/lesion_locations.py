"""Lesion location classes (`core.locations`) against the DLMUSE parcellations of the IXI brains.

Small lesions are inserted at known places of each brain (`tests/_lesion_places`: periventricular, juxtacortical,
deep white matter and infratentorial, drawn from the DLMUSE labels, plus "lesions" inside the ventricles) and
classified from the T1 and the brain mask alone; the table gives, per place, how many were classified as
expected (recall), the confusion with the other classes, and the CSF contact. docs/lesion_locations.md holds
the figures.

Run: PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/lesion_locations.py [--brains 150] [--per-place 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from phanes_cli.core.locations import CSF_CONTACTS, LOCATION_CLASSES
from tests._lesion_places import IXI, PLACES, Placed, classify_brain, expected, ixi_ids


def table(placed: list[Placed]) -> str:
    """Markdown: per place, n, recall of the expected class, the classes given, and the CSF contact."""
    head = ["place", "n", "correct", *LOCATION_CLASSES, *(f"csf {c}" for c in CSF_CONTACTS), "median csf_fraction"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for place in PLACES:
        rows = [p for p in placed if p.place == place]
        if not rows:
            continue
        given, contact = Counter(p.location for p in rows), Counter(p.csf_contact for p in rows)
        correct = given[expected(place)] / len(rows)
        fractions = sorted(p.csf_fraction for p in rows)
        cells = [place, str(len(rows)), f"{correct:.1%}", *(str(given[c]) for c in LOCATION_CLASSES),
                 *(str(contact[c]) for c in CSF_CONTACTS), f"{fractions[len(fractions) // 2]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brains", type=int, default=150, help="how many IXI brains (sorted by id)")
    parser.add_argument("--per-place", type=int, default=4, help="lesions per place and brain")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not IXI.is_dir():
        raise SystemExit(f"{IXI} not found: this benchmark needs ../shared/data/ixi")
    start = time.perf_counter()
    placed: list[Placed] = []
    ids = ixi_ids()[: args.brains]
    for vid in ids:
        placed.extend(classify_brain(vid, args.per_place, args.seed))
    print(f"{len(ids)} IXI brains, {len(placed)} lesions of {2 * 3:.0f} mm diameter, seed {args.seed}, "
          f"{time.perf_counter() - start:.0f} s\n")
    print(table(placed))


if __name__ == "__main__":
    main()
