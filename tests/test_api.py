"""The documented Python API: every exported name is the function the commands call, and importing the
package stays light (no torch, no Ray) so `phanes --help` starts fast."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import phanes_cli
from phanes_cli.calibrate.run import calibrate
from phanes_cli.core.bundle import load_bundle
from phanes_cli.inputs.brain_masks import brain_mask_for
from phanes_cli.screening.engine import screen
from phanes_cli.screening.options import ScreenOptions


def test_exports_are_the_library_functions() -> None:
    assert set(phanes_cli.__all__) == {"__version__", *phanes_cli._EXPORTS}
    typed = ast.parse(Path(phanes_cli.__file__).read_text())  # the names type checkers see: the TYPE_CHECKING imports
    block = next(n for n in typed.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    assert {a.asname or a.name for n in block.body if isinstance(n, ast.ImportFrom) for a in n.names} == \
        set(phanes_cli._EXPORTS)
    from phanes_cli import ScreenOptions as Options
    from phanes_cli import brain_mask_for as strip
    from phanes_cli import calibrate_bundle
    from phanes_cli import load_bundle as load
    from phanes_cli import screen as run

    assert (Options, strip, calibrate_bundle, load, run) == (ScreenOptions, brain_mask_for, calibrate, load_bundle,
                                                             screen)
    for name in phanes_cli.__all__:  # each resolves (an AttributeError or ImportError fails the test)
        getattr(phanes_cli, name)


def test_importing_the_package_loads_neither_torch_nor_ray() -> None:
    code = "import sys, phanes_cli; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
