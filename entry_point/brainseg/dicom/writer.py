"""Encode a volume as a DICOM series: classic single-frame slices or one enhanced multi-frame object.

Used by the synthetic-data tool and by test fixtures. Geometry is written the way scanners write
it (ImagePositionPatient per slice along the normal of ImageOrientationPatient), so the reader's
sorting and checks see real-world structure.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

JPEG2000_MIN_SIZE = 32  # pixels: OpenJPEG encodes with 6 resolution levels
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"

TRANSFER_SYNTAXES = {
    "explicit-le": ExplicitVRLittleEndian,
    "implicit-le": ImplicitVRLittleEndian,
    "explicit-be": ExplicitVRBigEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
}


@dataclass
class SeriesSpec:
    """Geometry and identity of one series to write. Spacing is ``(dz, dy, dx)`` in mm."""

    spacing: tuple = (1.0, 1.0, 1.0)
    origin: tuple = (0.0, 0.0, 0.0)
    orientation: tuple = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    patient_id: str = "ANON"
    patient_name: str = "Anonymous"
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    series_description: str = "T1 post-contrast"
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    series_number: int = 1
    # How the series was acquired, written when given (what a scanner's export tells sequences apart by).
    series_time: str = ""
    study_date: str = "20260101"  # StudyDate and SeriesDate
    protocol_name: str = ""
    sequence_name: str = ""
    acquisition_type: str = ""  # MRAcquisitionType: 2D or 3D
    repetition_time: float = 0.0
    echo_time: float = 0.0
    inversion_time: float = 0.0
    contrast_agent: str = ""
    image_type: tuple = ()


def slice_positions(spec: SeriesSpec, depth: int) -> np.ndarray:
    """``(depth, 3)`` patient positions of each slice along the orientation's normal."""
    row = np.asarray(spec.orientation[:3], dtype=float)
    column = np.asarray(spec.orientation[3:], dtype=float)
    normal = np.cross(row, column)
    return np.asarray(spec.origin, dtype=float) + np.arange(depth)[:, None] * spec.spacing[0] * normal


def _base_dataset(volume: np.ndarray, spec: SeriesSpec, sop_class: str) -> Dataset:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = sop_class
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = sop_class
    dataset.Modality = "MR"
    dataset.PatientName = spec.patient_name
    dataset.PatientID = spec.patient_id
    dataset.PatientBirthDate = "19700101"
    dataset.PatientSex = "O"
    dataset.StudyDate, dataset.StudyTime, dataset.StudyID = spec.study_date, "120000", "1"
    dataset.SeriesDate = spec.study_date
    dataset.AccessionNumber = ""
    dataset.ReferringPhysicianName = ""
    dataset.Manufacturer = "brainseg synthetic"
    dataset.StudyInstanceUID = spec.study_uid
    dataset.SeriesInstanceUID = spec.series_uid
    dataset.FrameOfReferenceUID = spec.frame_of_reference_uid
    dataset.SeriesDescription = spec.series_description
    dataset.SeriesNumber = spec.series_number
    for keyword, value in (("SeriesTime", spec.series_time), ("ProtocolName", spec.protocol_name),
                           ("SequenceName", spec.sequence_name), ("MRAcquisitionType", spec.acquisition_type),
                           ("RepetitionTime", spec.repetition_time), ("EchoTime", spec.echo_time),
                           ("InversionTime", spec.inversion_time), ("ContrastBolusAgent", spec.contrast_agent),
                           ("ImageType", list(spec.image_type))):
        if value:
            setattr(dataset, keyword, value)
    dataset.Rows, dataset.Columns = int(volume.shape[1]), int(volume.shape[2])
    bits = volume.dtype.itemsize * 8
    dataset.BitsAllocated = bits
    dataset.BitsStored = bits
    dataset.HighBit = bits - 1
    dataset.PixelRepresentation = 1 if volume.dtype.kind == "i" else 0
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    return dataset


def _finish(dataset: Dataset, pixels: np.ndarray) -> Dataset:
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
    return dataset


def slice_datasets(volume: np.ndarray, spec: SeriesSpec) -> list[Dataset]:
    """One classic MR Image Storage dataset per slice of a ``(D, H, W)`` integer volume."""
    positions = slice_positions(spec, volume.shape[0])
    datasets = []
    for index, plane in enumerate(volume):
        dataset = _base_dataset(volume, spec, MR_IMAGE_STORAGE)
        dataset.InstanceNumber = index + 1
        dataset.ImagePositionPatient = [float(v) for v in positions[index]]
        dataset.ImageOrientationPatient = [float(v) for v in spec.orientation]
        dataset.PixelSpacing = [float(spec.spacing[1]), float(spec.spacing[2])]
        dataset.SliceThickness = float(spec.spacing[0])
        dataset.SpacingBetweenSlices = float(spec.spacing[0])
        if spec.rescale_slope != 1.0 or spec.rescale_intercept != 0.0:
            dataset.RescaleSlope = spec.rescale_slope
            dataset.RescaleIntercept = spec.rescale_intercept
        datasets.append(_finish(dataset, plane))
    return datasets


def _item(**attributes) -> Dataset:
    item = Dataset()
    for name, value in attributes.items():
        setattr(item, name, value)
    return item


def multiframe_dataset(volume: np.ndarray, spec: SeriesSpec) -> Dataset:
    """One Enhanced MR Image Storage dataset holding every slice of a ``(D, H, W)`` volume."""
    dataset = _base_dataset(volume, spec, ENHANCED_MR_IMAGE_STORAGE)
    dataset.InstanceNumber = 1
    dataset.NumberOfFrames = int(volume.shape[0])
    shared = _item(
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=list(spec.orientation))]),
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=[float(spec.spacing[1]), float(spec.spacing[2])],
                                              SliceThickness=float(spec.spacing[0]),
                                              SpacingBetweenSlices=float(spec.spacing[0]))]),
        PixelValueTransformationSequence=Sequence([_item(RescaleSlope=spec.rescale_slope,
                                                         RescaleIntercept=spec.rescale_intercept,
                                                         RescaleType="US")]),
    )
    dataset.SharedFunctionalGroupsSequence = Sequence([shared])
    dataset.PerFrameFunctionalGroupsSequence = Sequence([
        _item(PlanePositionSequence=Sequence([_item(ImagePositionPatient=[float(v) for v in position])]))
        for position in slice_positions(spec, volume.shape[0])
    ])
    return _finish(dataset, volume)


def encode(dataset: Dataset, transfer_syntax: str = "explicit-le") -> bytes:
    """The bytes of a DICOM file (with preamble and file meta) in the named transfer syntax.

    Args:
        dataset: from :func:`slice_datasets` or :func:`multiframe_dataset` (Explicit VR Little Endian pixels).
        transfer_syntax: a key of :data:`TRANSFER_SYNTAXES`.
    """
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unknown transfer syntax {transfer_syntax!r}; expected one of "
                         f"{sorted(TRANSFER_SYNTAXES)}")
    uid = UID(TRANSFER_SYNTAXES[transfer_syntax])
    if uid == JPEG2000Lossless and min(dataset.Rows, dataset.Columns) < JPEG2000_MIN_SIZE:
        raise ValueError(f"JPEG 2000 needs images of at least {JPEG2000_MIN_SIZE}x{JPEG2000_MIN_SIZE} "
                         f"pixels (OpenJPEG's 6 resolution levels); got {dataset.Rows}x{dataset.Columns}")
    frames = int(dataset.get("NumberOfFrames", 1))
    dtype = np.dtype(("i" if dataset.PixelRepresentation else "u") + str(dataset.BitsAllocated // 8))
    shape = (frames, dataset.Rows, dataset.Columns) if frames > 1 else (dataset.Rows, dataset.Columns)
    pixels = np.frombuffer(dataset.PixelData, dtype=dtype.newbyteorder("<")).reshape(shape)
    if uid.is_compressed:
        dataset.compress(uid, pixels, generate_instance_uid=False)
    else:
        dataset.file_meta.TransferSyntaxUID = uid
        if uid == ExplicitVRBigEndian:
            dataset.PixelData = pixels.astype(dtype.newbyteorder(">")).tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
