"""NIfTI volumes in and out.

Volumes are validated on load and brought to the canonical RAS+ voxel order, where every later step
works; outputs are mapped back through the inverse re-orientation and written with the input's own
header, so shape, affine, qform/sform (and codes), zooms and voxel order are exactly the input's.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener
from nibabel.orientations import inv_ornt_aff, io_orientation, ornt_transform

from phanes_cli.errors import InputAccessError, InputError
from phanes_cli.infra.atomic import atomic_path

DEFAULT_MAX_VOXELS = 512**3
NIFTI_SUFFIXES = (".nii", ".nii.gz")
_RAS = np.array([[0, 1], [1, 1], [2, 1]])


def is_nifti_path(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


@dataclass(frozen=True)
class Volume:
    """A validated 3D volume in canonical RAS+ voxel order, remembering how to go back to the file's."""

    path: Path
    data: np.ndarray  # (X, Y, Z) float32, RAS+ voxel order
    affine: np.ndarray  # (4, 4) voxel -> world mm for `data`
    zooms: tuple[float, float, float]  # voxel size (mm) along the RAS+ axes
    native_shape: tuple[int, int, int]
    header: nib.Nifti1Header  # the input's header: outputs reuse it (qform/sform, codes, zooms)
    native_affine: np.ndarray
    to_native_ornt: np.ndarray  # re-orientation RAS+ -> file voxel order

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.zooms)) / 1000.0

    def to_native(self, array: np.ndarray) -> np.ndarray:
        """Map an array on this volume's RAS+ grid back to the file's voxel order."""
        if array.shape[:3] != self.data.shape:
            raise ValueError(f"array shape {array.shape} does not match volume grid {self.data.shape}")
        return np.ascontiguousarray(nib.apply_orientation(array, self.to_native_ornt))

    def from_native(self, array: np.ndarray) -> np.ndarray:
        """Map an array in the file's voxel order onto this volume's RAS+ grid."""
        ornt = ornt_transform(io_orientation(self.native_affine), _RAS)
        return np.ascontiguousarray(nib.apply_orientation(array, ornt))


def _access_error(path: Path, exc: PermissionError) -> InputAccessError:
    return InputAccessError(path, f"permission denied ({exc.strerror}); fix the file's permissions and run again")


def _open(path: Path) -> nib.Nifti1Image:
    """Open the header; a permission problem is an InputAccessError (retryable), anything else an InputError."""
    try:
        return _open_header(path)
    except PermissionError as exc:
        raise _access_error(path, exc) from exc


def _open_header(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a folder, not a NIfTI file")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty")
    if not is_nifti_path(path):
        raise InputError(path, "not a NIfTI file (expected a .nii or .nii.gz name)")
    open(path, "rb").close()  # a PermissionError here, before nibabel rewords it as an unreadable image
    try:
        img = nib.load(str(path))
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise InputError(path, f"corrupt or truncated compressed file ({exc})") from exc
    except nib.filebasedimages.ImageFileError as exc:
        raise InputError(path, f"not a readable NIfTI image ({exc})") from exc
    except Exception as exc:  # nibabel raises many types for garbage headers
        raise InputError(path, f"cannot read NIfTI header ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    return img


def _checked_dtype(path: Path, img: nib.Nifti1Image) -> None:
    """One real intensity per voxel: RGB / vector (structured) and complex images are refused by name."""
    dtype = np.dtype(img.get_data_dtype())
    if dtype.fields is not None or dtype.kind == "V":
        raise InputError(path, f"RGB or vector-valued image (voxel type {dtype.descr}); "
                               "phanes needs one grayscale intensity per voxel")
    if dtype.kind == "c":
        raise InputError(path, f"complex-valued image ({dtype}); phanes needs real magnitude intensities")
    if dtype.kind not in "uif":
        raise InputError(path, f"voxel type {dtype} is not a numeric intensity")


MAX_VOXEL_MM = 50.0  # volumes, lesion burden and the brain-size checks are meaningless beyond this


def _raw_pixdim(path: Path, img: nib.Nifti1Image) -> np.ndarray:
    """pixdim as stored in the file: nibabel silently turns a 0 voxel size into 1 mm when it loads a header."""
    header_class = nib.Nifti2Header if isinstance(img, nib.Nifti2Image) else nib.Nifti1Header
    with ImageOpener(str(path)) as handle:
        raw = header_class.from_fileobj(handle, check=False)
    return np.asarray(raw["pixdim"][1:4], dtype=np.float64)


def _checked_geometry(path: Path, img: nib.Nifti1Image) -> np.ndarray:
    """The voxel -> world affine, refused when the voxel size is zero, unknown or the axes degenerate."""
    if int(img.header["sform_code"]) == 0:  # the affine is built from pixdim, which must be a real size
        pixdim = _raw_pixdim(path, img)
        bad = [f"{'xyz'[i]}={pixdim[i]:g}" for i in range(3) if not (np.isfinite(pixdim[i]) and pixdim[i] != 0)]
        if bad:
            raise InputError(path, f"voxel size is 0 or undefined ({', '.join(bad)} mm) "
                                   "and the file has no sform affine to give it")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InputError(path, "affine contains non-finite values")
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.any(sizes < 1e-6):
        axes = ", ".join("xyz"[i] for i in np.flatnonzero(sizes < 1e-6))
        raise InputError(path, f"affine gives a voxel size of 0 along axis {axes}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(path, "affine is singular (zero voxel size or degenerate axes)")
    if np.any(sizes > MAX_VOXEL_MM):
        shown = ", ".join(f"{'xyz'[i]}={sizes[i]:.3g}" for i in np.flatnonzero(sizes > MAX_VOXEL_MM))
        raise InputError(path, f"voxel size {shown} mm is above {MAX_VOXEL_MM:g} mm, larger than a third of a "
                               "brain: not an MRI voxel (check the header's spatial units and affine)")
    return affine


def _checked_shape(path: Path, img: nib.spatialimages.SpatialImage, max_voxels: int) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in img.shape)
    if any(s <= 0 for s in shape):
        raise InputError(path, f"image dimensions {shape} must all be positive "
                               "(the header declares a zero or negative size)")
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    elif len(shape) == 4:
        raise InputError(path, f"4D image with {shape[3]} volumes; phanes takes one 3D volume per file")
    if len(shape) < 3 or (len(shape) == 3 and min(shape) == 1 and sum(s > 1 for s in shape) < 3):
        raise InputError(path, f"image of shape {shape} is not 3D (a 2D slice cannot be screened)")
    if len(shape) > 4:
        raise InputError(path, f"image of shape {shape} has {len(shape)} dimensions (a vector or RGB image?); "
                               "expected one 3D volume")
    n = int(np.prod(shape))
    if n > max_voxels:
        raise InputError(path, f"image of shape {shape} has {n} voxels, above the limit of {max_voxels}")
    return shape  # type: ignore[return-value]


def load_volume(path: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Read, validate and canonicalise one 3D volume; every failure is an InputError naming the file."""
    path = Path(path)
    img = _open(path)
    shape = _checked_shape(path, img, max_voxels)
    _checked_dtype(path, img)
    affine = _checked_geometry(path, img)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except PermissionError as exc:
        raise _access_error(path, exc) from exc
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise InputError(path, f"voxel data is truncated or corrupt ({exc})") from exc
    if not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise InputError(path, f"{bad} voxels are NaN or infinite")
    file_ornt = io_orientation(affine)
    to_ras = ornt_transform(file_ornt, _RAS)
    ras = np.ascontiguousarray(nib.apply_orientation(data, to_ras))
    ras_affine = affine @ inv_ornt_aff(to_ras, shape)
    zooms = tuple(float(z) for z in np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0)))
    return Volume(
        path=path,
        data=ras,
        affine=ras_affine,
        zooms=zooms,  # type: ignore[arg-type]
        native_shape=shape,
        header=img.header.copy(),
        native_affine=affine,
        to_native_ornt=ornt_transform(_RAS, file_ornt),
    )


def load_mask(path: str | Path, like: Volume, max_voxels: int = DEFAULT_MAX_VOXELS) -> np.ndarray:
    """Read a mask that must share `like`'s grid; returns a bool array on `like`'s RAS+ grid."""
    mask = load_volume(path, max_voxels)
    if mask.native_shape != like.native_shape:
        raise InputError(
            path, f"mask shape {mask.native_shape} differs from image shape {like.native_shape} ({like.path.name})"
        )
    if not np.allclose(mask.native_affine, like.native_affine, atol=1e-3):
        raise InputError(path, f"mask affine differs from the affine of {like.path.name}")
    return mask.data > 0.5


def save_like(array: np.ndarray, like: Volume, path: str | Path, dtype: type = np.float32) -> Path:
    """Write `array` (on `like`'s RAS+ grid) in exactly the input's geometry and header, atomically."""
    img = image_like(array, like, dtype)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def image_like(array: np.ndarray, like: Volume, dtype: type = np.float32) -> nib.Nifti1Image:
    """`array` (on `like`'s RAS+ grid) as an in-memory image in exactly the input's geometry and header."""
    native: np.ndarray = like.to_native(np.asarray(array)).astype(dtype)
    header = like.header.copy()
    header.set_data_dtype(dtype)
    if len(header.get_data_shape()) == 4:
        header.set_data_shape(native.shape)
    img = nib.Nifti1Image(native, None, header=header)
    qform, qcode = like.header.get_qform(coded=True)
    sform, scode = like.header.get_sform(coded=True)
    img.set_qform(qform if qform is not None else like.native_affine, code=int(qcode))
    img.set_sform(sform if sform is not None else like.native_affine, code=int(scode))
    img.header.set_zooms(like.header.get_zooms()[:3])
    img.header["scl_slope"] = np.nan
    img.header["scl_inter"] = np.nan
    return img


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path, dtype: type = np.float32) -> Path:
    """Write a new image with the given affine (qform and sform both set, scanner code), atomically."""
    img = nib.Nifti1Image(np.asarray(array).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)
