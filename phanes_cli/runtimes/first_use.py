"""The shipped model's ONNX graphs, exported once into a user cache folder so `--backend auto` is fast at once.

The shipped bundle lives inside the installed package (often read-only), so its first use copies it into
`$PHANES_CACHE_DIR` (default `$XDG_CACHE_HOME/phanes`, else `~/.cache/phanes`) under models/<name>-<hash>/,
exports the graphs there (runtimes.export: parity-checked against torch, the INT8 and OpenVINO backends gated)
and seals that copy's index.
An exclusive file lock makes concurrent first runs (several jobs of one user) export it once; a copy whose
model files differ from the shipped ones by hash, whose exported files differ from what the export wrote, or an
unfinished one, is rebuilt (a file or link in its place is removed, never a link's target). What the export wrote
is recorded by this module alone, in the copy's `.phanes-export.json` (outside the index: re-sealing the index
after editing a graph does not make the edit pass), with the shipped bundle's content key. A cache that cannot be
written (read-only, a file where the folder belongs, a full disk) is reported in one line and the shipped
bundle runs with torch. The graphs themselves are hash-checked again when the backend loads them
(runtimes.artefacts).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from phanes_cli.core.bundle import ENGINES_DIR, INDEX_FILE, load_bundle
from phanes_cli.errors import BundleError
from phanes_cli.infra.atomic import write_json
from phanes_cli.infra.optional import available
from phanes_cli.runtimes import GATED_BACKENDS
from phanes_cli.runtimes.artefacts import BENCH_FILE, sha256_bytes

CACHE_ENV = "PHANES_CACHE_DIR"
RECORD = ".phanes-export.json"  # the export's own record in the copy: shipped content key, sha256 of each artefact


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "phanes"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _model_files(folder: Path) -> dict[str, str]:
    """The index entries of a bundle other than its exported artefacts: the model it holds."""
    files = json.loads((folder / INDEX_FILE).read_text())["files"]
    return {name: digest for name, digest in files.items() if not name.startswith(f"{ENGINES_DIR}/")}


def _usable(copy: Path, shipped_files: dict[str, str], shipped_key: str) -> bool:
    """A finished copy of the same model (same file hashes, verified on load) whose exported files are the ones
    its export recorded, byte for byte (`phanes bench`'s record aside, which only orders the backends)."""
    if not copy.is_dir() or copy.is_symlink() or not (copy / INDEX_FILE).is_file():
        return False
    try:
        load_bundle(copy)
        files = json.loads((copy / INDEX_FILE).read_text())["files"]
        record = json.loads((copy / RECORD).read_text())
        written: dict[str, str] = record["artefacts"]
        engines = {name: digest for name, digest in files.items()
                   if name.startswith(f"{ENGINES_DIR}/") and name != f"{ENGINES_DIR}/{BENCH_FILE}"}
        intact = engines == written and all(sha256_bytes((copy / name).read_bytes()) == digest
                                            for name, digest in written.items())
        same_model = (record["shipped"] == shipped_key
                      and {name: files.get(name) for name in shipped_files} == shipped_files)
    except (BundleError, OSError, ValueError, KeyError, AttributeError, TypeError):
        return False
    return same_model and intact and any(name.endswith(".onnx") for name in engines) and _gated(copy)


def _record(work: Path, shipped_key: str) -> None:
    """Record what the export just wrote into `work` (every file of its engines folder that the index covers) and
    whose model it is."""
    artefacts = {f"{ENGINES_DIR}/{p.name}": sha256_bytes(p.read_bytes())
                 for p in sorted((work / ENGINES_DIR).iterdir()) if p.is_file() and not p.name.startswith(".")}
    write_json(work / RECORD, {"shipped": shipped_key, "artefacts": artefacts})


def _gated(copy: Path) -> bool:
    """Exported by a phanes that knew every gated backend of this one: each has a verdict, or a reason under
    `not_gated` (a copy from before a backend existed is exported again, so the new backend is judged)."""
    provenance = copy / ENGINES_DIR / "provenance.json"
    try:
        record = json.loads(provenance.read_text()) if provenance.is_file() else None
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or not isinstance(record.get("gates"), dict):
        return False
    not_gated = record.get("not_gated")
    judged = {*record["gates"], *(not_gated if isinstance(not_gated, dict) else ())}
    return all(name in judged for name in GATED_BACKENDS)


def _remove(path: Path) -> None:
    """Remove whatever is at `path`: a folder with its contents, or a file or link (never a link's target)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def exported_copy(shipped: Path, report: Callable[[str], None] = print, lpips_weights: str | None = None) -> Path:
    """The cached, exported copy of the shipped bundle `shipped` (made now when missing); the bundle itself
    when the [onnx] extra is not installed or the cache cannot be written (torch then runs it)."""
    if not (available("onnx") and available("onnxruntime")):
        return shipped
    bundle = load_bundle(shipped)
    if any(name.endswith(".onnx") for name in json.loads((shipped / INDEX_FILE).read_text())["files"]):
        return shipped  # exported when the package was built
    copy = cache_root() / "models" / f"{shipped.name}-{bundle.hash[:16]}"
    try:
        return _export_once(shipped, bundle.content_key, copy, report, lpips_weights)
    except OSError as exc:
        reason = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        report(f"cannot write the model cache ({reason}); running the shipped model with torch. "
               f"Set {CACHE_ENV} to a writable folder for the faster ONNX Runtime")
        return shipped


def _export_once(shipped: Path, shipped_key: str, copy: Path, report: Callable[[str], None],
                 lpips_weights: str | None) -> Path:
    """Under the copy's lock: the usable copy, or a fresh export of the shipped model into it."""
    shipped_files = _model_files(shipped)
    with _locked(copy.with_name(copy.name + ".lock")):
        if _usable(copy, shipped_files, shipped_key):
            return copy
        from phanes_cli.runtimes.export import export_bundle  # onnx: the [onnx] extra, present here

        report(f"first use of the shipped model: exporting its ONNX graphs once into {copy}")
        work = copy.with_name(copy.name + ".partial")
        _remove(work)
        work.mkdir(parents=True)
        for name in shipped_files:
            shutil.copy2(shipped / name, work / name)
        shutil.copy2(shipped / INDEX_FILE, work / INDEX_FILE)
        export_bundle(work, "onnx", lpips_weights=lpips_weights)
        _record(work, shipped_key)
        _remove(copy)
        work.rename(copy)
    return copy
