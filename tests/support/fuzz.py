"""Seeded fuzzing of DICOM headers, shared by the tests and the reliability benchmark.

Real headers of every layout the project reads (carrying patient identifiers) get 1 to 4 random
bytes replaced, anywhere up to the first pixel bytes. Each mutated object must come out of the
indexer parsed, excluded with a reason, or skipped as a non-image; a parsed native object must
locate the same stored pixel values pydicom decodes; no reason may quote a header value.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom

from brainseg.data.index import parse_object
from brainseg.dicom import parse_header, writer
from brainseg.dicom.pixels import native_dtype, stored_values
from brainseg.io import s3
from infra.data.phantom import make_phantom

PHI = {"PatientName": "Doe^Jane", "PatientID": "MRN12345", "AccessionNumber": "ACC998877",
       "PatientBirthDate": "19700101", "InstitutionName": "St Elsewhere"}
PHI_TOKENS = ("Doe", "Jane", "MRN12345", "ACC998877", "19700101", "Elsewhere")
VOLUME = (np.arange(4 * 16 * 16).reshape(4, 16, 16) % 900).astype(np.int16) - 100
CASE_SYNTAXES = ("explicit-le", "implicit-le", "explicit-be", "rle")


def identified_spec(**changes) -> writer.SeriesSpec:
    return writer.SeriesSpec(patient_id=PHI["PatientID"], patient_name=PHI["PatientName"], **changes)


def identified_slice(**changes):
    """A slice dataset carrying every identifier of :data:`PHI`, with ``changes`` applied."""
    dataset = writer.slice_datasets(VOLUME, identified_spec())[1]
    for keyword, value in {**PHI, **changes}.items():
        setattr(dataset, keyword, value)
    return dataset


def bases() -> dict[str, bytes]:
    """Real objects of each layout this project reads."""
    objects = {f"slice {syntax}": writer.encode(identified_slice(), syntax)
               for syntax in ("explicit-le", "implicit-le", "explicit-be", "rle", "jpegls")}
    objects["enhanced explicit-le"] = writer.encode(writer.multiframe_dataset(VOLUME, identified_spec()), "explicit-le")
    objects["enhanced rle"] = writer.encode(writer.multiframe_dataset(VOLUME, identified_spec()), "rle")
    return objects


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """1 to 4 random bytes of the header (up to the pixel data's first bytes) replaced."""
    header_end = parse_header(data, len(data)).pixel_offset + 16
    mutated = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        mutated[int(rng.integers(0, min(header_end, len(data))))] = int(rng.integers(0, 256))
    return bytes(mutated)


def stored_values_agree(data: bytes, header) -> bool | None:
    """Whether our pixel location, and the BitsStored we read, give pydicom's stored values (None:
    pydicom cannot decode it)."""
    try:
        reference = pydicom.dcmread(io.BytesIO(data)).pixel_array
    except Exception:  # a mutated file pydicom itself cannot decode: nothing to compare with
        return None
    count = header.rows * header.columns * header.frames
    ours = stored_values(np.frombuffer(data, native_dtype(header), count, header.pixel_offset), header)
    return reference.size == count and np.array_equal(ours.ravel(), reference.ravel().astype(ours.dtype))


def fuzz_headers(count: int, seed: int = 0) -> dict:
    """Parse ``count`` mutated headers; outcome counts and every mistake (a crash caught by the
    indexer's last line of defence, a reason quoting a header value, wrong pixel values)."""
    rng = np.random.default_rng(seed)
    layouts = list(bases().items())
    outcomes = {"parsed": 0, "excluded": 0, "skipped": 0, "values_checked": 0}
    mistakes = []
    for number in range(count):
        name, base = layouts[number % len(layouts)]
        data = mutate(base, rng)
        header, error, stray = parse_object(f"case/image/IM_{number}.dcm", len(data),
                                            lambda start, stop, data=data: data[start:stop])
        if error.startswith("unexpected") or any(token in error for token in PHI_TOKENS):
            mistakes.append(f"{name} #{number}: {error}")
        if header is None:
            outcomes["skipped" if stray else "excluded"] += 1
            continue
        outcomes["parsed"] += 1
        if not header.encapsulated:
            agree = stored_values_agree(data, header)
            outcomes["values_checked"] += agree is not None
            if agree is False:
                mistakes.append(f"{name} #{number}: pixel values differ from pydicom's")
    return {"tried": count, **outcomes, "mistakes": mistakes}


def write_fuzzed_cases(root: str, cases: int, seed: int = 0) -> None:
    """``cases`` small cases under ``root`` (``s3://…``), one mutated image slice in each."""
    rng = np.random.default_rng(seed)
    volume = make_phantom((4, 16, 16), np.random.default_rng(1))
    for number in range(cases):
        syntax = CASE_SYNTAXES[number % len(CASE_SYNTAXES)]
        spec = identified_spec(spacing=(2.0, 1.0, 1.0))
        objects = [writer.encode(dataset, syntax) for dataset in writer.slice_datasets(volume.image, spec)]
        victim = int(rng.integers(len(objects)))
        objects[victim] = mutate(objects[victim], rng)
        masks = [writer.encode(dataset, syntax) for dataset in writer.slice_datasets(volume.mask, spec)]
        for folder, series in (("image", objects), ("mask", masks)):
            for index, data in enumerate(series):
                s3.put_bytes(f"{root.rstrip('/')}/case_{number:04d}/{folder}/IM_{index:04d}.dcm", data)


MASK_KINDS = ("rtstruct", "seg")
STRUCTURE_SET_ROIS = "Edema=2,Enhancing=4"


def _ring(centre: np.ndarray, radius: float, row: np.ndarray, column: np.ndarray, points: int = 16) -> list[float]:
    angles = np.linspace(0.0, 2 * np.pi, points, endpoint=False)
    ring = centre + radius * (np.cos(angles)[:, None] * row + np.sin(angles)[:, None] * column)
    return [round(float(value), 3) for value in ring.ravel()]


def structure_set(slices: list) -> bytes:
    """An RT Structure Set written by hand on ``slices`` (pydicom datasets of one series): two ROIs of
    closed rings on the middle planes, every reference in place, the patient's identifiers of
    :data:`PHI` and an ROI name holding them too (no library: the benchmark needs none)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    first = slices[0]
    row, column = np.asarray(first.ImageOrientationPatient[:3], float), np.asarray(first.ImageOrientationPatient[3:], float)
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID, dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPClassUID, dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.Modality = "RTSTRUCT"
    for keyword, value in PHI.items():
        setattr(dataset, keyword, value)
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = first.StudyInstanceUID, generate_uid()
    dataset.StructureSetLabel = "tumour"
    images = Sequence([Dataset() for _ in slices])
    for item, image in zip(images, slices):
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = image.SOPClassUID, image.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID, series.ContourImageSequence = first.SeriesInstanceUID, images
    study = Dataset()
    study.ReferencedSOPClassUID, study.ReferencedSOPInstanceUID = "1.2.840.10008.3.1.2.3.1", first.StudyInstanceUID
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID, frame.RTReferencedStudySequence = first.FrameOfReferenceUID, Sequence([study])
    dataset.ReferencedFrameOfReferenceSequence = Sequence([frame])
    dataset.StructureSetROISequence, dataset.ROIContourSequence = Sequence(), Sequence()
    spacing = [float(v) for v in first.PixelSpacing]
    for number, (name, radius) in enumerate(((f"{PHI['PatientName']} Edema", 6.0), ("Enhancing", 3.0)), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, first.FrameOfReferenceUID
        dataset.StructureSetROISequence.append(roi)
        contours = Dataset()
        contours.ReferencedROINumber, contours.ContourSequence = number, Sequence()
        for image in slices[1:-1]:
            centre = np.asarray(image.ImagePositionPatient, float) + (image.Rows / 2) * spacing[0] * column \
                + (image.Columns / 2) * spacing[1] * row
            contour = Dataset()
            contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", 16
            contour.ContourData = _ring(centre, radius, row, column)
            reference = Dataset()
            reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = image.SOPClassUID, image.SOPInstanceUID
            contour.ContourImageSequence = Sequence([reference])
            contours.ContourSequence.append(contour)
        dataset.ROIContourSequence.append(contours)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def segmentation(slices: list, labels: np.ndarray) -> bytes:
    """A DICOM SEG (highdicom, binary, segments 1 and 2) of ``labels`` on ``slices``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=f"label {number}", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for number in (1, 2)]
    seg = hd.seg.Segmentation(
        source_images=slices, pixel_array=np.stack([labels == 1, labels == 2], axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=7, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="brainseg tests", manufacturer_model_name="fuzz", software_versions="1", device_serial_number="0")
    buffer = io.BytesIO()
    seg.save_as(buffer)
    return buffer.getvalue()


def mutate_anywhere(data: bytes, rng: np.random.Generator, end: int | None = None) -> bytes:
    """1 to 4 random bytes after the preamble (and before ``end``) replaced."""
    mutated = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        mutated[int(rng.integers(132, min(end or len(data), len(data))))] = int(rng.integers(0, 256))
    return bytes(mutated)


def write_fuzzed_masks(root: str, kind: str, cases: int, seed: int = 0) -> None:
    """``cases`` small cases under ``root`` whose mask is a mutated ``kind`` (``rtstruct``: anywhere in
    the object, which is all header; ``seg``: anywhere up to its first pixel bytes)."""
    rng = np.random.default_rng(seed)
    volume = make_phantom((6, 16, 16), np.random.default_rng(1))
    labels = np.zeros(volume.mask.shape, dtype=np.uint8)
    labels[1:5, 4:12, 4:12] = 1
    labels[2:4, 6:10, 6:10] = 2
    for number in range(cases):
        slices = writer.slice_datasets(volume.image, identified_spec(spacing=(2.0, 1.0, 1.0)))
        slices = [pydicom.dcmread(io.BytesIO(writer.encode(dataset))) for dataset in slices]
        if kind == "rtstruct":
            mask = mutate_anywhere(structure_set(slices), rng)
        else:
            base = segmentation(slices, labels)
            mask = mutate_anywhere(base, rng, parse_header(base, len(base)).pixel_offset + 16)
        prefix = f"{root.rstrip('/')}/case_{number:04d}"
        for index, dataset in enumerate(slices):
            s3.put_bytes(f"{prefix}/image/IM_{index:04d}.dcm", writer.encode(dataset))
        s3.put_bytes(f"{prefix}/mask/{kind}.dcm", mask)
