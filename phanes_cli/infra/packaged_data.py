"""Data files shipped inside the package (phanes_cli/data), found by path and checked by sha256 before use.

The MNI152 2009a template (T1 at 1 and 2 mm, brain mask, grey and white matter maps) is the one nilearn
distributes, copied bit for bit by tools/build_shipped_weights.py (licence: data/NOTICE), so phanes needs
neither nilearn nor a download for it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from phanes_cli.errors import WeightsError

if TYPE_CHECKING:
    from nibabel.nifti1 import Nifti1Image

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
Mni152Part = Literal["t1_1mm", "t1_2mm", "brainmask_1mm", "gm_1mm", "wm_1mm"]
_MNI152: dict[str, str] = {
    "t1_1mm": "78af50d4c8392da2fb74d0565bba1c56fc3520989d7e49fd6887b7166e79834a",
    "t1_2mm": "c8847618dd0315e9dbbf4f1dc87eb7708b924e1de13bdee393a5490cc9a03703",
    "brainmask_1mm": "d72236bd7c5e73bf8c29867e8bac6da359059113737fe779711dceac8db4a091",
    "gm_1mm": "5bb7beb6daa438a242d92ec414892acf9ce535e19d84e34397168b16437448ab",
    "wm_1mm": "e42dfa9b3952926ac8cf75b859b545215eaa950aa9896f58743f23f9db8bd122",
}


def mni152_path(part: Mni152Part) -> Path:
    """The shipped MNI152 2009a file of `part`, verified by its sha256 (a damaged install is an error)."""
    path = DATA_DIR / "mni152" / f"mni152_2009a_{part}.nii.gz"
    if not path.is_file():
        raise WeightsError(f"{path}: shipped MNI152 template missing; reinstall phanes "
                           "(pip install --force-reinstall phanes)")
    if hashlib.sha256(path.read_bytes()).hexdigest() != _MNI152[part]:
        raise WeightsError(f"{path}: shipped MNI152 template changed (sha256 mismatch); reinstall phanes")
    return path


def mni152_image(part: Mni152Part) -> Nifti1Image:
    """The shipped MNI152 `part` as a nibabel image (float32 data, nilearn's affine)."""
    import nibabel as nib

    return cast("Nifti1Image", nib.load(mni152_path(part)))
