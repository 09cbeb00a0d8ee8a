"""Rebuild phanes_cli/data/stroke_lesion_shapes.npz from the SOOP stroke masks (BSD-2-Clause).

Usage: python tools/build_stroke_bank.py [MASK_FOLDER] (default: ../shared/data/stroke-lesion-masks)
"""

from __future__ import annotations

import sys
from pathlib import Path

from phanes_cli.synth.lesion_bank import PACKAGED_BANK, build_bank

if __name__ == "__main__":
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "stroke-lesion-masks"
    print(build_bank(Path(sys.argv[1]) if len(sys.argv) > 1 else default, PACKAGED_BANK))
