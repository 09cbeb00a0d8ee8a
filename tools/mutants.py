"""Small mutation test: does the fast test suite notice when the lesion rule is broken?

    python tools/mutants.py [--root DIR] [--tests tests/test_lesion_rule.py ...]

Each mutant changes one line of the lesion rule in a copy of the source tree (flips a comparison, ignores the
minimum size or the brain); the given tests then run against the copy (`pytest -x`, one thread). A mutant is
killed when a test fails. Prints one line per mutant and exits 1 when any survives. `--legacy` uses the
mutants of the code before the redesign (pipeline.threshold_lesions / drop_small_lesions), to compare.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAST_TESTS = ("tests/test_lesion_rule.py", "tests/test_tune.py", "tests/test_calibrate.py", "tests/test_evaluate.py",
              "tests/test_controls.py")
# (file, original text, mutated text, what the mutant does)
MUTANTS = [
    ("phanes_cli/core/lesion_rule.py", "(score >= self.threshold)", "(score > self.threshold)",
     "threshold made strict"),
    ("phanes_cli/core/lesion_rule.py", "& (score > 0) &", "&", "s = 0 may count as lesion"),
    ("phanes_cli/core/lesion_rule.py", "& np.asarray(brain, dtype=bool)", "", "brain restriction dropped"),
    ("phanes_cli/core/lesion_rule.py", "if self.min_ml <= 0 or not mask.any():", "if True:", "minimum size ignored"),
    ("phanes_cli/core/lesion_rule.py", "np.asarray(sizes_ml) >= self.min_ml", "np.asarray(sizes_ml) > self.min_ml",
     "minimum size made strict"),
]
LEGACY_TESTS = ("tests/test_tune.py", "tests/test_calibrate.py", "tests/test_evaluate.py", "tests/test_controls.py")
LEGACY = [
    ("phanes_cli/pipeline.py", "(anomaly >= threshold)", "(anomaly > threshold)", "threshold made strict"),
    ("phanes_cli/pipeline.py", "(anomaly >= threshold) & (anomaly > 0) &", "(anomaly >= threshold) &",
     "s = 0 may count as lesion"),
    ("phanes_cli/pipeline.py", "& (anomaly > 0) & np.asarray(brain, dtype=bool)", "& (anomaly > 0)",
     "brain restriction dropped"),
    ("phanes_cli/pipeline.py", "if min_ml <= 0 or not mask.any():", "if True:", "minimum size ignored"),
    ("phanes_cli/pipeline.py", "keep = sizes * voxel_ml >= min_ml", "keep = sizes * voxel_ml > min_ml",
     "minimum size made strict"),
]


def run_mutant(root: Path, mutant: tuple[str, str, str, str], tests: list[str]) -> tuple[bool, float]:
    """(killed, seconds) of one mutant: a copy of the tree with the change, the tests run against it."""
    path, original, mutated, _ = mutant
    with tempfile.TemporaryDirectory(prefix="phanes-mutant-") as tmp:
        copy = Path(tmp) / "tree"
        shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".git", ".venv", "build", "demo-output", "runs",
                                                                  "__pycache__", "*.egg-info"))
        target = copy / path
        text = target.read_text()
        if text.count(original) != 1:
            raise SystemExit(f"{path}: the mutant's original text {original!r} is not there exactly once")
        target.write_text(text.replace(original, mutated))
        env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                cwd=copy, env=env, capture_output=True, text=True)
        return result.returncode != 0, time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--tests", nargs="*")
    parser.add_argument("--legacy", action="store_true", help="the pre-redesign mutants (run on an old checkout)")
    args = parser.parse_args()
    mutants = LEGACY if args.legacy else MUTANTS
    tests = args.tests or list(LEGACY_TESTS if args.legacy else FAST_TESTS)
    survived = 0
    for mutant in mutants:
        killed, seconds = run_mutant(args.root, mutant, tests)
        survived += not killed
        print(f"{'killed  ' if killed else 'SURVIVED'} {mutant[3]:<28} {mutant[0]} ({seconds:.0f} s)", flush=True)
    print(f"{len(mutants) - survived}/{len(mutants)} mutants killed by {' '.join(tests)}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
