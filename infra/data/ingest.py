"""Convert public brain-tumour datasets to the brainseg DICOM layout, written in parallel.

    brainseg-ingest SRC s3://bucket/dataset/ [--format brats|msd|lgg] [--jobs 4] [--spacing 1,1,1]
                    [--resample-to t1c]

Formats (detected from SRC when ``--format`` is not given):

  brats  one folder per case holding ``<case>_t1.nii.gz``, ``_t1ce``, ``_t2``, ``_flair`` and
         ``_seg`` (BraTS 2012-2021), or ``<case>-t1n.nii.gz``, ``-t1c``, ``-t2w``, ``-t2f`` and ``-seg``
         (BraTS 2023 onwards); labels 1 necrotic core, 2 oedema, 4 enhancing (3 from 2023). Files on
         another grid than the T1's are refused, or with ``--resample-to SEQUENCE`` resampled onto
         that sequence's grid by patient position (trilinear; labels nearest).
  msd    the Medical Segmentation Decathlon layout: ``dataset.json``, ``imagesTr/<case>.nii.gz``
         (4D: one volume per modality, named in dataset.json) and ``labelsTr/<case>.nii.gz``.
  lgg    2D slice folders (the LGG segmentation set): per case ``<case>_<n>.tif`` (RGB: pre-contrast,
         FLAIR, post-contrast) and ``<case>_<n>_mask.tif``; slices carry no geometry, so ``--spacing``
         (mm, default 1,1,1) gives it.

Each case becomes ``<case>/<sequence>/IM_*.dcm`` (one MR series per sequence, geometry from the
NIfTI affine, converted from RAS to DICOM's LPS) and ``<case>/mask/seg.dcm``, a DICOM SEG written
with highdicom whose segment numbers 1, 2, ... are the label values present in the dataset's label
table, in ascending order: BraTS's table has 1, 2, 3 and 4 (3 from 2023, 4 before), so its segments
are 1 (necrotic core), 2 (oedema), 3 and 4 (both enhancing tumour) and the labels to train with are
``ncr=1,ed=2,et=3+4``. The end of the run prints the ``--sequences`` and ``--labels`` to train with. Float images are stored as 16-bit integers with a rescale slope.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from brainseg.dicom import writer
from brainseg.io import s3
from brainseg.progress import Progress
from infra.data.nifti import IngestError, geometry_from_affine, resample_onto, slices
from infra.data.synth import write_files

logger = logging.getLogger("ingest")
FORMATS = ("brats", "msd", "lgg")
# BraTS file namings: (separator, {file suffix: sequence}). 2012-2021: <case>_t1ce.nii.gz ... <case>_seg.nii.gz;
# 2023 onwards: BraTS-GLI-00000-000-t1c.nii.gz, -t1n, -t2w, -t2f, -seg.
BRATS_NAMINGS = (("_", {"t1": "t1", "t1ce": "t1c", "t2": "t2", "flair": "flair"}),
                 ("-", {"t1n": "t1", "t1c": "t1c", "t2w": "t2", "t2f": "flair"}))
BRATS_SEQUENCES = BRATS_NAMINGS[0][1]
BRATS_EXPECTED = ("BraTS 2012-2021 <case>/<case>_seg.nii.gz beside _t1, _t1ce, _t2, _flair; or BraTS 2023+ "
                  "<case>/<case>-seg.nii.gz beside -t1n, -t1c, -t2w, -t2f")
BRATS_LABELS = {1: "ncr", 2: "ed", 3: "et", 4: "et"}
LGG_SEQUENCES = ("t1", "flair", "t1c")  # the RGB channels: pre-contrast, FLAIR, post-contrast
NAME = re.compile(r"[^a-z0-9_]+")


@dataclass
class CaseSource:
    """One case to convert: its ID and how to load it."""

    case_id: str
    format: str
    paths: dict  # what the loader of its format needs


@dataclass
class Study:
    """A loaded case: sequences ``{name: (D, H, W)}``, labels ``(D, H, W)``, and the geometry of the grid."""

    images: dict
    labels: np.ndarray
    spacing: tuple  # (dz, dy, dx) mm
    origin: tuple  # LPS mm of voxel (0, 0, 0)
    orientation: tuple  # row then column direction cosines (LPS)


def _nifti(path: Path):
    import nibabel

    try:
        image = nibabel.load(str(path))
        return np.asanyarray(image.dataobj), image.affine
    except Exception as err:  # nibabel raises many kinds on damaged files
        raise IngestError(f"{path.name}: not a readable NIfTI file ({type(err).__name__}: {err})") from None


def load_brats(source: CaseSource) -> Study:
    """A BraTS case (either naming); every file must lie on the reference sequence's grid, or
    (``resample_to``) is resampled onto it."""
    if source.paths["problem"]:  # a file missing: this case is left out, the others are converted
        raise IngestError(source.paths["problem"])
    sequences = source.paths["sequences"]  # {file suffix: sequence}
    by_name = {name: key for key, name in sequences.items()}
    reference = by_name.get(source.paths.get("resample_to") or "t1", by_name["t1"])
    loaded = {key: _nifti(source.paths[key]) for key in (*sequences, "seg")}
    reference_data, reference_affine = loaded[reference]
    volumes = {}
    for key, (data, affine) in loaded.items():
        if data.shape != reference_data.shape or not np.allclose(affine, reference_affine, atol=1e-3):
            if not source.paths.get("resample_to"):
                raise IngestError(f"{source.paths[key].name}: its grid (shape {data.shape}) differs from "
                                  f"{source.paths[reference].name}'s (shape {reference_data.shape}); pass "
                                  f"--resample-to {sequences[reference]} to resample it onto that grid")
            data = resample_onto(data, affine, reference_affine, reference_data.shape, labels=key == "seg")
        volumes[key] = data
    spacing, origin, orientation, flipped = geometry_from_affine(reference_affine, reference_data.shape)
    images = {sequences[key]: slices(volumes[key], flipped) for key in sequences}
    return Study(images, slices(volumes["seg"], flipped), spacing, origin, orientation)


def load_msd(source: CaseSource) -> Study:
    data, affine = _nifti(source.paths["image"])
    if data.ndim != 4 or data.shape[3] != len(source.paths["modalities"]):
        raise IngestError(f"{source.paths['image'].name}: shape {data.shape}; expected 4D with "
                          f"{len(source.paths['modalities'])} modalities (dataset.json)")
    spacing, origin, orientation, flipped = geometry_from_affine(affine, data.shape)
    images = {name: slices(data[..., index], flipped) for index, name in enumerate(source.paths["modalities"])}
    labels, _ = _nifti(source.paths["label"])
    if labels.shape != data.shape[:3]:
        raise IngestError(f"{source.paths['label'].name}: shape {labels.shape}, images {data.shape[:3]}")
    return Study(images, slices(labels, flipped), spacing, origin, orientation)


def load_lgg(source: CaseSource) -> Study:
    from PIL import Image

    planes, masks = [], []
    for image_path, mask_path in source.paths["slices"]:
        try:
            rgb = np.asarray(Image.open(image_path))
            mask = np.asarray(Image.open(mask_path))
        except Exception as err:
            raise IngestError(f"{image_path.name}: not a readable TIFF slice ({type(err).__name__})") from None
        if rgb.ndim != 3 or rgb.shape[2] != 3 or mask.shape[:2] != rgb.shape[:2]:
            raise IngestError(f"{image_path.name}: shape {rgb.shape} with mask {mask.shape}; expected an RGB slice "
                              "and a mask of its size")
        planes.append(rgb)
        masks.append(mask if mask.ndim == 2 else mask[..., 0])
    stack = np.stack(planes)
    images = {name: np.ascontiguousarray(stack[..., index]) for index, name in enumerate(LGG_SEQUENCES)}
    spacing = source.paths["spacing"]
    return Study(images, (np.stack(masks) > 0).astype(np.uint8), spacing, (0.0, 0.0, 0.0),
                 (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))


LOADERS = {"brats": load_brats, "msd": load_msd, "lgg": load_lgg}


def _stored(volume: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Integer pixels DICOM can hold, with the rescale that gives the values back."""
    if np.issubdtype(volume.dtype, np.integer) and volume.min() >= 0 and volume.max() <= 65535:
        return volume.astype(np.uint16), 1.0, 0.0
    if np.issubdtype(volume.dtype, np.integer) and volume.min() >= -32768 and volume.max() <= 32767:
        return volume.astype(np.int16), 1.0, 0.0
    low, high = float(np.min(volume)), float(np.max(volume))
    slope = (high - low) / 65535.0 or 1.0
    return np.round((volume - low) / slope).astype(np.uint16), slope, low


def encode_study(case_id: str, study: Study, segment_names: dict) -> dict[str, bytes]:
    """``{relative path: DICOM bytes}``: one MR series per sequence and a DICOM SEG of the labels
    (segment ``n`` = the ``n``-th label value of ``segment_names``, ascending)."""
    common = dict(spacing=study.spacing, origin=study.origin, orientation=study.orientation,
                  patient_id=case_id, patient_name=f"{case_id}^")
    first = writer.SeriesSpec(**common)
    files, sources = {}, None
    for number, (name, volume) in enumerate(study.images.items(), start=1):
        pixels, slope, intercept = _stored(np.asarray(volume))
        spec = writer.SeriesSpec(**common, study_uid=first.study_uid, frame_of_reference_uid=first.frame_of_reference_uid,
                                 series_description=name, rescale_slope=slope, rescale_intercept=intercept)
        datasets = writer.slice_datasets(pixels, spec)
        for dataset in datasets:
            dataset.SeriesNumber = number
        sources = sources or datasets
        for index, dataset in enumerate(datasets, start=1):
            files[f"{case_id}/{name}/IM_{index:04d}.dcm"] = writer.encode(dataset, "explicit-le")
    labels = np.asarray(study.labels)
    values = sorted(segment_names)
    unknown = sorted(set(np.unique(labels).tolist()) - {0, *values})
    if unknown:
        raise IngestError(f"case {case_id}: label value(s) {unknown} are not among the dataset's labels {values}")
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=segment_names[value],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for number, value in enumerate(values, start=1)]
    planes = np.stack([labels == value for value in values], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=planes, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=len(study.images) + 1,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="brainseg ingest",
        manufacturer_model_name="brainseg", software_versions="1", device_serial_number="0")
    buffer = io.BytesIO()
    seg.save_as(buffer)
    files[f"{case_id}/mask/seg.dcm"] = buffer.getvalue()
    return files


def _case_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def discover(src: Path, kind: str | None = None, spacing: tuple = (1.0, 1.0, 1.0),
             resample_to: str = "") -> tuple[str, list[CaseSource], dict, dict]:
    """The format, the cases, the label names ``{value: name}`` and the sequences of ``src``.

    Raises:
        IngestError: no case of the format (or of any format) under ``src``.
    """
    if not src.is_dir():
        raise IngestError(f"{src} is not a folder")
    if kind is None:
        if (src / "dataset.json").exists():
            kind = "msd"
        elif any(src.glob("*/*_seg.nii*")) or any(src.glob("*/*-seg.nii*")):
            kind = "brats"
        elif any(src.glob("*/*_mask.tif")):
            kind = "lgg"
        else:
            raise IngestError(f"{src} holds no dataset.json (msd), */*_seg.nii.gz or */*-seg.nii.gz (brats) or "
                              "*/*_mask.tif (lgg); pass --format")
    if kind == "msd":
        try:
            meta = json.loads((src / "dataset.json").read_text())
            modalities = [NAME.sub("_", str(meta["modality"][key]).lower()).strip("_")
                          for key in sorted(meta["modality"], key=int)]
            labels = {int(key): NAME.sub("_", str(name).lower()).strip("_") for key, name in meta["labels"].items()
                      if int(key) != 0}
            entries = meta["training"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise IngestError(f"{src / 'dataset.json'}: not a Decathlon dataset.json ({type(err).__name__}: {err})") \
                from None
        cases = [CaseSource(_case_id(Path(entry["image"]).name.split(".")[0]), kind,
                            {"image": src / entry["image"], "label": src / entry["label"], "modalities": modalities})
                 for entry in entries]
        return kind, cases, labels, {name: name for name in modalities}
    if kind == "brats":
        cases = []
        for separator, sequences in BRATS_NAMINGS:
            for seg in sorted(src.glob(f"*/*{separator}seg.nii*")):
                case = seg.name.split(f"{separator}seg.nii")[0]
                suffix = seg.name[len(case) + len(f"{separator}seg"):]
                paths = {"seg": seg, **{key: seg.parent / f"{case}{separator}{key}{suffix}" for key in sequences}}
                missing = [path.name for path in paths.values() if not path.exists()]
                problem = f"{', '.join(missing)} missing beside {seg.name} (expected {BRATS_EXPECTED})" if missing \
                    else ""
                cases.append(CaseSource(_case_id(case), kind, {**paths, "sequences": sequences,
                                                               "resample_to": resample_to, "problem": problem}))
        if not cases:
            raise IngestError(f"{src}: no BraTS case found; expected {BRATS_EXPECTED}")
        return kind, cases, dict(BRATS_LABELS), dict(BRATS_SEQUENCES)
    if kind == "lgg":
        cases = []
        for folder in sorted(path for path in src.iterdir() if path.is_dir()):
            masks = sorted(folder.glob("*_mask.tif"), key=lambda p: int(re.findall(r"_(\d+)_mask", p.name)[0]))
            slices = [(mask.with_name(mask.name.replace("_mask.tif", ".tif")), mask) for mask in masks]
            if slices:
                cases.append(CaseSource(_case_id(folder.name), kind, {"slices": slices, "spacing": spacing}))
        return kind, cases, {1: "tumour"}, {name: name for name in LGG_SEQUENCES}
    raise IngestError(f"--format {kind!r}: expected one of {', '.join(FORMATS)}")


def _convert(source: CaseSource, labels: dict, out: str) -> tuple[str, int, str]:
    """``(case ID, bytes written, error)``; an error leaves the case out, never the batch."""
    try:
        study = LOADERS[source.format](source)
        return source.case_id, write_files(encode_study(source.case_id, study, labels), out), ""
    except (IngestError, s3.S3Error, OSError) as err:
        return source.case_id, 0, str(err)


def ingest(src: Path, out: str, kind: str | None = None, jobs: int = 4, spacing: tuple = (1.0, 1.0, 1.0),
           resample_to: str = "") -> dict:
    """Convert every case under ``src`` and write it under ``out``; returns a report.

    Raises:
        IngestError: no case of the format, or ``resample_to`` names no sequence of it.
    """
    if resample_to and resample_to not in BRATS_SEQUENCES.values():
        raise IngestError(f"--resample-to {resample_to!r}: expected one of {', '.join(BRATS_SEQUENCES.values())} "
                          "(BraTS cases; the Decathlon and LGG layouts share one grid by construction)")
    kind, cases, labels, sequences = discover(src, kind, spacing, resample_to)
    if not cases:
        raise IngestError(f"no {kind} case under {src}")
    started = time.perf_counter()
    written, failed = 0, {}
    progress = Progress(len(cases), phase="ingest", unit="case", log_seconds=30.0)
    # Spawned, not forked: a fork of a process whose threads hold locks (an S3 pool, logging) can hang.
    with progress, ProcessPoolExecutor(max(1, jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_convert, source, labels, out) for source in cases]
        for number, future in enumerate(futures, start=1):
            case_id, size, error = future.result()
            written += size
            if error:
                failed[case_id] = error
                logger.warning("case %s left out: %s", case_id, error)
            progress.update(number)
    segment_of: dict[str, list[int]] = {}
    for number, value in enumerate(sorted(labels), start=1):
        segment_of.setdefault(labels[value], []).append(number)
    return {"format": kind, "cases": len(cases) - len(failed), "failed": failed, "bytes": written,
            "seconds": round(time.perf_counter() - started, 1), "sequences": ",".join(sequences.values()),
            "labels": ",".join(f"{name}={'+'.join(map(str, numbers))}" for name, numbers in segment_of.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="the dataset's folder")
    parser.add_argument("out", help="s3://bucket/prefix/ or a local folder")
    parser.add_argument("--format", choices=FORMATS, help="default: detected from SRC")
    parser.add_argument("--jobs", type=int, default=4, help="cases converted at once (processes)")
    parser.add_argument("--spacing", default="1,1,1", help="lgg: slice thickness and pixel spacing dz,dy,dx in mm")
    parser.add_argument("--resample-to", default="", help="brats: resample every sequence and the labels onto this "
                        "sequence's grid (t1, t1c, t2 or flair) when they differ; without it such a case is left out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines quote the source objects' UIDs
    try:
        spacing = tuple(float(v) for v in args.spacing.split(","))
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError
    except ValueError:
        parser.error(f"--spacing {args.spacing!r}: expected three positive numbers like 1,1,1")
    try:
        if args.out.startswith("s3://"):
            s3.parse_uri(args.out)
        report = ingest(args.src, args.out, args.format, args.jobs, spacing, args.resample_to)
    except (IngestError, ValueError, s3.S3Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for case_id, error in report["failed"].items():
        print(f"left out {case_id}: {error}", file=sys.stderr)
    print(f"wrote {report['cases']} {report['format']} case(s), {report['bytes'] / 1e6:.1f} MB, to {args.out} in "
          f"{report['seconds']} s; train with --sequences {report['sequences']} --labels {report['labels']}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
