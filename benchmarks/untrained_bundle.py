"""An untrained bundle of a config, for speed benchmarks only (`phanes bench` needs no trained weights).

Usage: python benchmarks/untrained_bundle.py configs/paper.yaml OUT_DIR
The weights are the networks' initialisation (seeded), so the timings are those of the real architecture;
the maps mean nothing. Never screen with such a bundle.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from phanes_cli.config import load_config
from phanes_cli.core.bundle import save_bundle
from phanes_cli.runtimes.pytorch import PhanesNetworks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_config(args.config)
    networks = PhanesNetworks(config)
    digest = save_bundle(args.out, config, networks.ra, networks.generator, extra={"untrained": True})
    print(f"untrained {config.name} bundle: {args.out} ({digest[:12]})")


if __name__ == "__main__":
    main()
