"""DICOM series written from NIfTI volumes with pydicom (shared test helper): one classic MR Image Storage file per
slice, int16 with a rescale slope, geometry from the NIfTI affine (RAS) turned into DICOM's patient LPS.

Slice k of the volume is stored as data[:, :, k].T: DICOM rows run along the NIfTI j axis and columns along i,
so ImageOrientationPatient holds the i and j directions and ImagePositionPatient the centre of voxel (0, 0, k).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import MRImageStorage, generate_uid

LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class SeriesTags:
    """What a series says about itself (the sidecar fields dcm2niix writes from them)."""

    description: str = "t1_mprage_sag"
    number: int = 2
    acquisition_type: str = "3D"
    echo_time_ms: float = 2.98
    repetition_time_ms: float = 2300.0
    inversion_time_ms: float | None = 900.0
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND")
    sequence_name: str = "*tfl3d1_16ns"
    extra: dict[str, str] = field(default_factory=dict)


def write_series(image: nib.Nifti1Image, folder: Path, tags: SeriesTags, patient: str = "P001",
                 study_uid: str | None = None) -> float:
    """Write `image` as one series of DICOM files into `folder`; returns the rescale slope (stored int16 x slope
    = the voxel value, so the round trip is exact to half a slope)."""
    data = np.asarray(image.dataobj, dtype=np.float64)
    if data.min() < 0:
        raise ValueError("this writer stores non-negative volumes (intercept 0)")
    slope = float(data.max()) / 32000.0 or 1.0
    stored = np.round(data / slope).astype(np.int16)
    axes = LPS @ image.affine[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    orientation = np.concatenate([axes[:, 0] / spacing[0], axes[:, 1] / spacing[1]])
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = generate_uid(), study_uid or generate_uid()
    for k in range(data.shape[2]):
        position = LPS @ (image.affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
        ds = _slice_dataset(tags, patient, series_uid, study_uid, k)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # between rows (j), between columns (i)
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", "0"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(folder / f"IM{tags.number:03d}_{k + 1:04d}.dcm", enforce_file_format=True)
    return float(f"{slope:.10g}")


def _slice_dataset(tags: SeriesTags, patient: str, series_uid: str, study_uid: str, k: int) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"  # explicit VR little endian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "MR", "SIEMENS", "Prisma_fit"
    ds.MagneticFieldStrength = "3"
    ds.PatientName, ds.PatientID = "Test^Subject", patient
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid])
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20240315"
    ds.StudyTime = ds.SeriesTime = "101500"
    ds.AcquisitionTime = "102000"
    ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = tags.number, k + 1, 1
    ds.SeriesDescription = ds.ProtocolName = tags.description
    ds.ImageType = list(tags.image_type)
    ds.MRAcquisitionType = tags.acquisition_type
    ds.ScanningSequence, ds.SequenceVariant, ds.SequenceName = "GR\\IR", "SK\\SP\\MP", tags.sequence_name
    ds.EchoTime, ds.RepetitionTime = f"{tags.echo_time_ms:g}", f"{tags.repetition_time_ms:g}"
    if tags.inversion_time_ms is not None:
        ds.InversionTime = f"{tags.inversion_time_ms:g}"
    ds.FlipAngle = "9"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    for key, value in tags.extra.items():
        setattr(ds, key, value)
    return ds
