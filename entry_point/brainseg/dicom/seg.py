"""Writing predictions as DICOM Segmentation objects (highdicom) that reference their source series.

The source is given as each object's bytes up to its pixel data (headers are all a SEG needs), so
a prediction job fetches kilobytes per slice rather than the images again. The SEG carries the
source's patient and study, its frame of reference and a reference to every source instance;
each structure is one BINARY segment, its frames on the source's planes (empty frames left out).
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom

from brainseg.dicom.errors import HeaderError

CATEGORY = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure")
NEOPLASM = hd.sr.CodedConcept("108369006", "SCT", "Neoplasm")
PROPERTY_TYPES = {  # structure names with a more specific code than "Neoplasm"
    **dict.fromkeys(("ncr", "necrosis", "net", "ncr_net"), hd.sr.CodedConcept("6574001", "SCT", "Necrosis")),
    **dict.fromkeys(("ed", "edema", "oedema"), hd.sr.CodedConcept("79654002", "SCT", "Edema")),
}
ARTIFICIAL_INTELLIGENCE = hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence")
SERIES_NUMBER = 9001


@dataclass(frozen=True)
class Algorithm:
    """What made the segmentation, as the SEG records it."""

    name: str  # e.g. "brainseg unet"
    version: str  # the model's code version / run


def _silence_highdicom() -> None:
    """highdicom's log lines quote UIDs and its warnings quote patient names: neither reaches a log."""
    highdicom_logger = logging.getLogger("highdicom")
    highdicom_logger.setLevel(logging.ERROR)
    highdicom_logger.addHandler(logging.NullHandler())
    highdicom_logger.propagate = False


_silence_highdicom()


def _dataset(header: bytes, number: int) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(header), stop_before_pixels=True, force=True)
    except Exception as err:  # pydicom raises many types for damaged headers
        raise HeaderError(f"source object {number}: its header cannot be read again ({type(err).__name__})") from None


def _frame_order(planes: tuple, objects: int) -> tuple[list[int], list[int]]:
    """``(source objects in frame order, the volume's plane for each frame)``: one object per plane
    (classic single-frame slices), or one multi-frame object whose frames are the planes."""
    if objects == len(planes) and sorted(obj for obj, _ in planes) == list(range(objects)):
        return [obj for obj, _ in planes], list(range(len(planes)))
    if objects == 1:
        frame_plane = {frame: z for z, (_, frame) in enumerate(planes)}
        return [0], [frame_plane[frame] for frame in sorted(frame_plane)]
    raise HeaderError(f"a series of {objects} objects holding {len(planes)} planes in several multi-frame objects "
                      "cannot be referenced by one segmentation")


def encode_segmentation(headers: list[bytes], planes: tuple, masks: list[np.ndarray], names: list[str],
                        algorithm: Algorithm) -> bytes:
    """A DICOM SEG of ``masks`` (one ``(D, H, W)`` boolean volume per structure, named ``names``) on
    the source series whose objects' headers are ``headers`` and whose plane ``z`` is frame
    ``planes[z] = (object, frame)``.

    Raises:
        HeaderError: a source header cannot be read, the series cannot be referenced, or highdicom
            refuses it (its own message is not passed on: it may quote header values).
    """
    sources, frame_planes = _frame_order(planes, len(headers))
    datasets = [_dataset(headers[obj], obj) for obj in sources]
    stacked = np.stack(masks, axis=-1)[frame_planes].astype(bool)  # (frames, rows, columns, segments)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=CATEGORY,
            segmented_property_type=PROPERTY_TYPES.get(name.lower(), NEOPLASM),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=algorithm.name, version=algorithm.version,
                family=ARTIFICIAL_INTELLIGENCE))
        for number, name in enumerate(names, start=1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # they quote header values (a patient's name)
        try:
            segmentation = hd.seg.Segmentation(
                source_images=datasets, pixel_array=stacked, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=SERIES_NUMBER,
                sop_instance_uid=hd.UID(), instance_number=1, manufacturer="brainseg",
                manufacturer_model_name=algorithm.name, software_versions=algorithm.version,
                device_serial_number="none", series_description="brainseg tumour segmentation",
                omit_empty_frames=True)
        except (ValueError, TypeError, AttributeError, KeyError) as err:
            raise HeaderError(f"the source series cannot be referenced by a DICOM SEG: highdicom refused it "
                              f"({type(err).__name__}; an attribute a SEG copies or checks is missing or "
                              "inconsistent across the slices)") from None
        buffer = io.BytesIO()
        segmentation.save_as(buffer)
    return buffer.getvalue()
