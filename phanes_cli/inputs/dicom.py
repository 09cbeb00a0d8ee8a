"""DICOM in: a folder of DICOM series becomes NIfTI volumes through dcm2niix, one per usable T1-weighted series.

Rules
- A folder argument holding no NIfTI image but DICOM files (``DICM`` at byte 128, any file name) is a DICOM
  folder. dcm2niix (the `dcm2niix` package's binary; its defaults file ignored, BIDS sidecars written with
  personal data stripped and dates kept) converts every series under it into a cache folder under the output
  (`phanes screen`: OUT/dicom/, `phanes data prepare`: dicom/ beside the manifest), never beside the user's
  data. The cache is reused while the DICOM files (names, sizes, times) and the converter are unchanged, so a
  resumed run screens the same files.
- Each converted volume is judged from its sidecar and header; the first reason that applies rejects it:
  not MR; a localizer (ImageType LOCALIZER, or a description naming a localizer, scout or survey); derived
  (ImageType DERIVED: a reformat or computed map); a 2D acquisition (MRAcquisitionType 2D); not one 3D
  volume of at least `MIN_SLICES` voxels along every axis; echo time above `MAX_T1_ECHO_S` (T2-like);
  inversion time above `MAX_T1_INVERSION_S` (fluid-suppressed); dcm2niix's own guess of the BIDS suffix
  (`BidsGuess`) naming another contrast; a series description naming another contrast (T2, FLAIR, PD,
  diffusion...) and no T1 word. A series that yields several usable volumes (echoes) gives the first.
- The ids are the converted file names (``<patient id>_<series number>_<description>``); the series
  metadata travel as manifest columns into every screening table: `scanner_manufacturer`,
  `scanner_model`, `field_strength_t`, `sequence_name`, `series_description`, `series_number`,
  `acquisition_date`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib

from phanes_cli.errors import InputError
from phanes_cli.infra.atomic import write_json

DICOM_MAGIC_OFFSET = 128
NAME_FORMAT = "%i_%s_%d"  # dcm2niix -f: patient id, series number, series description
MIN_SLICES = 32
MAX_T1_ECHO_S = 0.05
MAX_T1_INVERSION_S = 1.5
MARKER = "conversion.json"
CONVERT_TIMEOUT_S = 3600
_LOCALIZER = re.compile(r"(^|[^a-z])(localiser|localizer|loc|scout|survey|aahead_scout)([^a-z]|$)", re.I)
_OTHER = re.compile(r"(^|[^a-z0-9])(t2|t2w|t2star|flair|pd|pdw|dwi|dti|diff|swi|bold|asl|tof|stir|adc)([^a-z0-9]|$)",
                    re.I)
_T1 = re.compile(r"(^|[^a-z0-9])(t1|t1w|mprage|mp-rage|mp2rage|spgr|fspgr|bravo|tfe|tfl)", re.I)
METADATA = {  # manifest column -> sidecar key
    "scanner_manufacturer": "Manufacturer", "scanner_model": "ManufacturersModelName",
    "field_strength_t": "MagneticFieldStrength", "sequence_name": "SequenceName",
    "series_description": "SeriesDescription", "series_number": "SeriesNumber",
}


@dataclass(frozen=True)
class Series:
    """One converted volume: its NIfTI file, the metadata columns, and why it is not usable (None: usable)."""

    image: Path
    columns: dict[str, Any]
    rejection: str | None = None
    label: str = field(default="")  # "series 3 (t2_tse_tra)", for messages


def is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(DICOM_MAGIC_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _dicom_files(folder: Path, exclude: Path | None) -> list[Path]:
    """Every DICOM file under `folder` (hidden files and folders and `exclude` skipped), sorted."""
    skip = None if exclude is None else os.path.realpath(exclude)
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(Path(root) / d) != skip)
        found += [Path(root) / name for name in sorted(files) if not name.startswith(".")
                  and is_dicom_file(Path(root) / name)]
    return found


def holds_dicom(folder: Path, exclude: Path | None = None) -> bool:
    """True when a DICOM file lies under `folder` (stops at the first one)."""
    skip = None if exclude is None else os.path.realpath(exclude)
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and os.path.realpath(Path(root) / d) != skip]
        if any(not name.startswith(".") and is_dicom_file(Path(root) / name) for name in files):
            return True
    return False


def _converter() -> tuple[str, str]:
    """(path of the dcm2niix binary, its version line)."""
    import dcm2niix  # the PyPI package ships the binary

    binary = str(dcm2niix.bin)
    try:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    except OSError as exc:
        raise InputError(binary, f"the dcm2niix converter cannot run ({exc.strerror})") from None
    return binary, version.splitlines()[-1] if version else "unknown"


def _signature(files: list[Path], folder: Path, version: str) -> str:
    digest = hashlib.sha256(f"{version}\n{NAME_FORMAT}\n".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def convert_folder(folder: Path, cache: Path, exclude: Path | None = None) -> list[Series]:
    """Convert the DICOM series under `folder` into `cache` (reused when unchanged) and judge each volume."""
    files = _dicom_files(folder, exclude)
    if not files:
        raise InputError(folder, "holds no DICOM files (no 'DICM' marker at byte 128)")
    binary, version = _converter()
    signature = _signature(files, folder, version)
    real = os.path.realpath(folder)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(real).name)
    target = cache / f"{name}-{hashlib.sha256(real.encode()).hexdigest()[:8]}"  # one folder per DICOM folder
    try:
        reusable = json.loads((target / MARKER).read_text()).get("signature") == signature
    except (OSError, ValueError, AttributeError):
        reusable = False
    if not reusable:
        _convert(binary, folder, target, signature)
    return judge(sorted(target.glob("*.nii.gz")))


def _convert(binary: str, folder: Path, target: Path, signature: str) -> None:
    """dcm2niix into a fresh temporary folder beside `target`, the marker written last, then moved into place."""
    work = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # -g i: no user defaults file; -ba o: sidecars without personal data, dates kept; -d 9: the deepest search
    command = [binary, "-g", "i", "-b", "y", "-ba", "o", "-z", "y", "-d", "9", "-f", NAME_FORMAT, "-o", str(work),
               str(folder)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise InputError(folder, f"dcm2niix did not finish within {CONVERT_TIMEOUT_S} s") from None
    if not any(work.glob("*.nii.gz")):
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if "error" in ln.lower()]
        raise InputError(folder, f"dcm2niix converted no series (exit {done.returncode}"
                                 f"{': ' + lines[0][:200] if lines else ''})")
    write_json(work / MARKER, {"signature": signature, "converter": binary, "folder": str(folder)})
    shutil.rmtree(target, ignore_errors=True)
    work.rename(target)


def _sidecar(image: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(image.with_name(image.name.removesuffix(".nii.gz") + ".json").read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def columns_of(sidecar: dict[str, Any]) -> dict[str, Any]:
    """The metadata columns of one series (module rules); absent fields are None."""
    columns = {name: sidecar.get(key) for name, key in METADATA.items()}
    if columns["field_strength_t"] is not None:
        columns["field_strength_t"] = float(columns["field_strength_t"])
    stamp = sidecar.get("AcquisitionDateTime")
    columns["acquisition_date"] = str(stamp)[:10] if stamp else None
    return columns


def _words(sidecar: dict[str, Any]) -> str:
    return " ".join(str(sidecar.get(k) or "") for k in ("SeriesDescription", "ProtocolName")).replace("_", " ")


def rejection(sidecar: dict[str, Any], shape: tuple[int, ...]) -> str | None:
    """Why a converted volume is not a usable T1-weighted 3D image (module rules), or None when it is."""
    image_type = [str(t).upper() for t in sidecar.get("ImageType") or []]
    words = _words(sidecar)
    guess = sidecar.get("BidsGuess") or []
    suffix = str(guess[-1]).rsplit("_", 1)[-1] if guess else None
    echo, inversion = sidecar.get("EchoTime"), sidecar.get("InversionTime")
    spatial = (*shape[:3], *(1,) * (3 - len(shape[:3])))  # a single 2D slice reads as one voxel deep
    volumes = math.prod(shape[3:])
    checks = [
        (sidecar.get("Modality", "MR") != "MR", f"modality {sidecar.get('Modality')}, not MR"),
        ("LOCALIZER" in image_type or bool(_LOCALIZER.search(words)), "a localizer (scout), not a diagnostic volume"),
        ("DERIVED" in image_type, "a derived image (ImageType DERIVED: a reformat or computed map), not the acquired "
                                  "volume"),
        (sidecar.get("MRAcquisitionType") == "2D", "a 2D acquisition (MRAcquisitionType 2D); phanes screens 3D "
                                                   "T1-weighted volumes"),
        (volumes > 1, f"{volumes} volumes in one series (4D), not one 3D volume"),
        (min(spatial) < MIN_SLICES, f"only {min(spatial)} voxels along one axis (shape {spatial}); phanes needs a "
                                    f"3D volume of at least {MIN_SLICES}"),
        (isinstance(echo, (int, float)) and echo > MAX_T1_ECHO_S,
         f"echo time {1000 * float(echo or 0):g} ms: a T2-like contrast, not T1-weighted"),
        (isinstance(inversion, (int, float)) and inversion > MAX_T1_INVERSION_S,
         f"inversion time {float(inversion or 0):g} s: a fluid-suppressed (FLAIR-like) contrast, not T1-weighted"),
        (suffix is not None and suffix not in ("T1w", "UNIT1"), f"dcm2niix reads it as {suffix} (BidsGuess), "
                                                                 "not T1-weighted"),
        (bool(_OTHER.search(words)) and not _T1.search(words), f"its description {words.strip()!r} names another "
                                                                "contrast than T1"),
    ]
    return next((reason for failed, reason in checks if failed), None)


def judge(images: list[Path]) -> list[Series]:
    """Each converted volume with its columns and verdict; a series' usable volumes after the first are rejected."""
    judged, taken = [], set()
    for image in images:
        sidecar = _sidecar(image)
        try:
            shape = tuple(int(n) for n in nib.Nifti1Image.from_filename(str(image)).shape)
        except Exception as exc:  # a file dcm2niix left damaged: that series is rejected, not the folder
            shape, sidecar = (0, 0, 0), {**sidecar, "_error": str(exc)}
        series = sidecar.get("SeriesInstanceUID") or sidecar.get("SeriesNumber") or image.name
        reason = "dcm2niix wrote an unreadable file" if "_error" in sidecar else rejection(sidecar, shape)
        if reason is None and series in taken:
            reason = "another volume of the same series (an echo or part) is screened already"
        if reason is None:
            taken.add(series)
        label = f"series {sidecar.get('SeriesNumber', '?')} ({sidecar.get('SeriesDescription') or 'no description'})"
        judged.append(Series(image=image, columns=columns_of(sidecar), rejection=reason, label=label))
    return judged
