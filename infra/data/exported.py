"""A synthetic study as a hospital's PACS exports it: the studies layout.

Every series of the exam, named and numbered as a scanner names them, its objects named by UIDs or
numbers in a tree that says nothing about sequences:

- ``DICOM/PA<n>/ST0/SE<k>/IM<i>`` (a DICOMDIR-style export, even case numbers, a ``DICOMDIR`` stub
  beside it) or ``<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` (odd ones);
- a three-slice localiser, the training sequences (a post-contrast 3D T1 with its contrast agent,
  a T1, a T2, a FLAIR, each with its own TR/TE/TI and, with ``--grids own``, its own geometry),
  diffusion (trace) and its ADC map, a coronal MPR of the post-contrast T1 (DERIVED), and the
  labels as a label series drawn on the post-contrast T1's grid or (``label_as="seg"``) as a
  DICOM SEG on its slices, segments 1 necrotic core, 2 oedema, 3 enhancing tumour (BraTS labels
  1, 2 and 4: train with ``--labels ncr=1,ed=2,et=3``).

Series descriptions follow what scanners write (``AX T2 FLAIR``, ``ep2d_diff_b1000``); the truth
for scoring is the study's labels on the first sequence's grid, as in the folder layout.
"""

from __future__ import annotations

import io
from dataclasses import replace

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from brainseg.dicom import writer
from infra.data.grids import own_grids, plane_prefix

# name -> (description, protocol, TR, TE, TI, 2D/3D, contrast agent): the sequences' acquisition, as
# a 1.5 T/3 T brain tumour protocol writes it.
ACQUISITION = {
    "t1c": ("T1 MPRAGE +C", "t1_mprage_post", 2000.0, 2.9, 900.0, "3D", "GADOBUTROL"),
    "t1": ("T1 SE", "t1_se", 550.0, 10.0, 0.0, "2D", ""),
    "t2": ("T2 TSE", "t2_tse", 4500.0, 95.0, 0.0, "2D", ""),
    "flair": ("T2 FLAIR", "t2_tirm_flair", 9000.0, 85.0, 2500.0, "2D", ""),
}
# The exam's order: localiser first, pre-contrast sequences, diffusion, the post-contrast T1 last.
SERIES_ORDER = ("localiser", "t1", "t2", "flair", "dwi", "adc", "t1c", "mpr", "labels")


SEG_SEGMENTS = (("necrotic core", 1), ("oedema", 2), ("enhancing tumour", 4))  # segment n: (name, BraTS label)


def _seg(sources: list, labels: np.ndarray, series_uid: str, sop_uid: str) -> bytes:
    """The BraTS ``labels`` as a DICOM SEG (highdicom, binary) on the series ``sources`` (its slices in order)."""
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=name, segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for number, (name, _) in enumerate(SEG_SEGMENTS, start=1)]
    planes = np.stack([labels == value for _, value in SEG_SEGMENTS], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=planes, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=series_uid, series_number=len(SERIES_ORDER),
        sop_instance_uid=sop_uid, instance_number=1, manufacturer="brainseg-synth", manufacturer_model_name="phantom",
        software_versions="1", device_serial_number="0", series_description="tumour segmentation")
    buffer = io.BytesIO()
    seg.save_as(buffer)
    return buffer.getvalue()


def _extra_volume(source: np.ndarray, slices: int, scale: float = 1.0) -> np.ndarray:
    """A few slices taken from a volume (what the extra series hold: their content is never read)."""
    picks = np.linspace(0, source.shape[0] - 1, slices).round().astype(int)
    return np.clip(source[picks].astype(np.float32) * scale, 0, 65535).astype(np.uint16)


def encode_exported(index: int, images: dict, labels: np.ndarray, spacing: tuple, origin: tuple, own: bool,
                    patient_id: str, patient_name: str, moved: dict | None = None,
                    label_as: str = "series", study_date: str = "20260101") -> dict[str, bytes]:
    """``{relative path: bytes}`` of one exported study: ``images`` (``{sequence: (D, H, W)}`` on the
    study's grid of ``spacing`` whose first voxel lies at ``origin``) and its ``labels``, every
    sequence after the first on a grid of its own with ``own`` (those in ``moved``, in a frame of
    reference of their own: :func:`infra.data.grids.own_grids`), plus the extra series; the labels
    as a label series or (``label_as="seg"``) a SEG on the first sequence's slices; every series
    dated ``study_date`` (YYYYMMDD)."""
    names = list(images)
    for name in names:
        if name not in ACQUISITION:
            raise ValueError(f"sequence {name!r} has no place in the exported exam (it holds {', '.join(ACQUISITION)})")
    placed = (own_grids(images, spacing, origin, moved) if own else
              {name: (volume, spacing, origin, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)) for name, volume in images.items()})
    study_uid, frame_uid = generate_uid(), generate_uid()
    identity = dict(patient_id=patient_id, patient_name=patient_name, study_uid=study_uid,
                    frame_of_reference_uid=frame_uid, study_date=study_date)
    first = placed[names[0]]
    series: dict[str, tuple[np.ndarray, writer.SeriesSpec]] = {}
    for name, (volume, grid_spacing, grid_origin, orientation) in placed.items():
        description, protocol, tr, te, ti, kind, agent = ACQUISITION[name]
        frame = {"frame_of_reference_uid": generate_uid()} if moved and name in moved else {}
        series[name] = (volume, writer.SeriesSpec(
            spacing=grid_spacing, origin=grid_origin, orientation=orientation, **{**identity, **frame},
            series_description=f"{plane_prefix(orientation)} {description}", protocol_name=protocol,
            repetition_time=tr, echo_time=te, inversion_time=ti, acquisition_type=kind, contrast_agent=agent,
            image_type=("ORIGINAL", "PRIMARY", "M", "ND")))
    reference = images[names[0]]
    axial = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    thick = (spacing[0] * 3, spacing[1] * 2, spacing[2] * 2)
    series["localiser"] = (_extra_volume(reference[:, ::4, ::4], 3), writer.SeriesSpec(
        spacing=(spacing[0] * reference.shape[0] / 3, spacing[1] * 4, spacing[2] * 4), origin=origin,
        orientation=axial, **identity, series_description="localizer", protocol_name="AAHead_Scout",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")))
    diffusion = reference[::3, ::2, ::2]
    series["dwi"] = (_extra_volume(diffusion, diffusion.shape[0], 0.5), writer.SeriesSpec(
        spacing=thick, origin=origin, orientation=axial, **identity, series_description="ep2d_diff_b1000 TRACEW",
        protocol_name="ep2d_diff", repetition_time=5000.0, echo_time=80.0, acquisition_type="2D",
        image_type=("ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW")))
    series["adc"] = (_extra_volume(diffusion, diffusion.shape[0], 0.8), writer.SeriesSpec(
        spacing=thick, origin=origin, orientation=axial, **identity, series_description="ep2d_diff_b1000_ADC",
        protocol_name="ep2d_diff", image_type=("DERIVED", "PRIMARY", "DIFFUSION", "ADC")))
    coronal = np.ascontiguousarray(reference[::-1].transpose(1, 0, 2)[::4])
    top = (origin[0], origin[1], origin[2] + (reference.shape[0] - 1) * spacing[0])  # rows run down from the top slice
    series["mpr"] = (coronal, writer.SeriesSpec(
        spacing=(spacing[1] * 4, spacing[0], spacing[2]), origin=top, orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
        **identity, series_description="T1 MPRAGE +C MPR COR", image_type=("DERIVED", "SECONDARY", "MPR")))
    series["labels"] = (labels, writer.SeriesSpec(
        spacing=first[1], origin=first[2], orientation=first[3], **identity,
        series_description="tumour labels", image_type=("DERIVED", "SECONDARY")))
    nested = index % 2 == 0
    written: dict[str, list] = {}  # the slices of each series written, for the SEG to reference
    files = {f"DICOM/PA{index:04d}/DICOMDIR": b"DICOMDIR stub: a media directory, not an image\n"} if nested else {}
    for number, name in enumerate((name for name in SERIES_ORDER if name in series), start=1):
        volume, spec = series[name]
        spec = replace(spec, series_number=number, series_uid=generate_uid(), series_time=f"{9 + number // 6:02d}"
                       f"{(number * 7) % 60:02d}00")
        if name == "labels" and label_as == "seg":
            sop_uid = generate_uid()
            files[f"DICOM/PA{index:04d}/ST0/SE{number}/IM1" if nested else f"{study_uid}/{spec.series_uid}/{sop_uid}.dcm"] = (
                _seg(written[names[0]], volume, spec.series_uid, sop_uid))
            continue
        datasets = writer.slice_datasets(volume, spec)
        written[name] = datasets
        for slice_number, dataset in enumerate(datasets, start=1):
            path = (f"DICOM/PA{index:04d}/ST0/SE{number}/IM{slice_number}" if nested
                    else f"{study_uid}/{spec.series_uid}/{dataset.SOPInstanceUID}.dcm")
            files[path] = writer.encode(dataset)
    return files
