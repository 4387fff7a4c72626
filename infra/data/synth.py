"""Write a synthetic brain-tumour DICOM dataset to S3 or a local folder.

    brainseg-synth --cases 20 --out s3://bucket/dataset/ [--shape 96,128,128]
        [--sequences t1c,t1,t2,flair] [--thickness 1,2,3]
        [--transfer-syntax explicit-le|implicit-le|explicit-be|rle|jpeg2000|jpegls] [--multiframe]
        [--grids shared|own] [--other-frame N] [--layout folders|studies] [--label-as series|seg]
        [--healthy-fraction F]

By default each case becomes ``<case_id>/image/`` (a T1 post-contrast-like series) and
``<case_id>/mask/`` (the tumour, 0/1). With ``--sequences`` it becomes one folder per sequence
(co-registered, one frame of reference) and a mask of BraTS labels (1 necrotic/non-enhancing core,
2 oedema, 4 enhancing tumour); ``--thickness`` draws each case's slice thickness (a multiple of the
first spacing) from the list. With ``--grids own`` every sequence after the first lies on a grid of
its own in the same frame of reference (oblique, sagittal, thick axial slices, coronal: see
:mod:`infra.data.grids`), as a scanner writes them; the first sequence and the mask keep the study's
grid; with ``--other-frame N`` the last sequence of the first N cases lies in a frame of reference
of its own, the patient turned 5-10 degrees and shifted 5-15 mm (:meth:`SynthSpec.motion` says how).
With ``--layout studies`` each case is written as a PACS exports an exam (objects named by
UIDs or numbers, a localiser, diffusion, an MPR and the labels beside the sequences, no folder
naming a sequence: :mod:`infra.data.exported`; ``--label-as seg`` writes the labels as a DICOM SEG
on the first sequence). One object per slice, or one enhanced multi-frame
object per series. With ``--healthy-fraction F`` that share of the cases is tumour-free: the same
head without lesions, and an empty mask.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from brainseg.dicom import writer
from brainseg.io import s3
from infra.data.exported import encode_exported
from infra.data.grids import frame_motion, own_grids
from infra.data.phantom import SEQUENCES, make_phantom, make_study

logger = logging.getLogger("synth")
UPLOAD_THREADS = 16
GOLDEN = (5**0.5 - 1) / 2
DESCRIPTIONS = {"image": "T1 post-contrast", "t1": "T1", "t1c": "T1 post-contrast", "t2": "T2", "flair": "FLAIR"}


@dataclass(frozen=True)
class SynthSpec:
    """What every synthetic case looks like. ``shape`` is ``(D, H, W)``, spacing ``(dz, dy, dx)`` mm."""

    shape: tuple = (96, 128, 128)
    spacing: tuple = (1.5, 1.0, 1.0)
    transfer_syntax: str = "explicit-le"
    multiframe: bool = False
    seed: int = 0
    sequences: tuple = ("image",)  # ("image",): one T1c-like series and a 0/1 mask; else named sequences
    thicknesses: tuple = (1,)  # slice thickness factors drawn per case (multi-sequence studies)
    grids: str = "shared"  # "own": every sequence after the first on a grid of its own (multi-sequence studies)
    layout: str = "folders"  # "studies": as a PACS exports an exam (infra/data/exported.py; multi-sequence studies)
    other_frame: int = 0  # with grids "own": the first this many cases hold their last sequence in a frame of its own
    label_as: str = "series"  # layout "studies": the labels as a label series or a DICOM SEG ("seg") on the first sequence
    healthy_fraction: float = 0.0  # this share of the cases holds no tumour (an empty mask), spread evenly by index

    def healthy(self, index: int) -> bool:
        """Whether case ``index`` is tumour-free: the golden-ratio sequence, so any run of cases holds
        ``healthy_fraction`` of them to within one case."""
        return ((index + 1) * GOLDEN) % 1.0 < self.healthy_fraction

    def motion(self, index: int) -> dict:
        """``{sequence: 4x4 matrix}``: where case ``index``'s sequences in a frame of their own see the
        head (:func:`infra.data.grids.frame_motion`: first-frame patient mm to theirs); empty for most."""
        if self.grids != "own" or index >= self.other_frame or len(self.sequences) < 2:
            return {}
        # the study's grid is centred on the patient origin, which is near the head's centre
        return {self.sequences[-1]: frame_motion(np.random.default_rng([self.seed, index, 7]), np.zeros(3))}

    def volumes(self, index: int) -> tuple[dict, np.ndarray, tuple]:
        """``({folder: volume}, mask, spacing)`` of case ``index``."""
        rng = np.random.default_rng([self.seed, index])
        if self.sequences == ("image",):
            phantom = make_phantom(self.shape, rng, healthy=self.healthy(index))
            return {"image": phantom.image}, phantom.mask, tuple(self.spacing)
        thickness = int(rng.choice(self.thicknesses))
        study = make_study(self.shape, rng, self.sequences, thickness, healthy=self.healthy(index))
        return study.images, study.labels, (self.spacing[0] * thickness, *self.spacing[1:])


def case_id_for(index: int) -> str:
    return f"case_{index:04d}"


def encode_case(index: int, spec: SynthSpec) -> dict[str, bytes]:
    """Relative path -> DICOM bytes for one synthetic case."""
    images, mask, spacing = spec.volumes(index)
    origin = (-0.5 * spec.shape[2] * spacing[2], -0.5 * spec.shape[1] * spacing[1], -0.5 * spec.shape[0] * spec.spacing[0])
    if spec.layout == "studies" and spec.sequences != ("image",):
        return encode_exported(index, images, mask, spacing, origin, spec.grids == "own", f"SYN{spec.seed:03d}{index:05d}",
                               f"Synthetic^Patient{index}", spec.motion(index), spec.label_as)
    return encode_study(case_id_for(index), images, mask, spacing, f"SYN{spec.seed:03d}{index:05d}",
                        f"Synthetic^Patient{index}", spec.transfer_syntax, spec.multiframe, origin,
                        own=spec.grids == "own" and spec.sequences != ("image",), moved=spec.motion(index))


def encode_study(case_id: str, images: dict, mask: np.ndarray, spacing: tuple, patient_id: str, patient_name: str,
                 transfer_syntax: str = "explicit-le", multiframe: bool = False, origin: tuple | None = None,
                 own: bool = False, moved: dict | None = None) -> dict[str, bytes]:
    """Relative path -> DICOM bytes of one study: a series per ``images`` folder (``(D, H, W)``
    volumes of ``spacing`` mm) and the ``mask`` series, on one frame of reference (centred on the
    origin unless ``origin`` is given); with ``own``, every folder after the first resampled onto a
    grid of its own (:func:`infra.data.grids.own_grids`), those in ``moved`` in a frame of their own."""
    shape = mask.shape
    origin = origin or (-0.5 * shape[2] * spacing[2], -0.5 * shape[1] * spacing[1], -0.5 * shape[0] * spacing[0])
    identity = dict(patient_id=patient_id, patient_name=patient_name)
    first = writer.SeriesSpec(spacing=spacing, origin=origin, **identity)
    shared = dict(**identity, study_uid=first.study_uid, frame_of_reference_uid=first.frame_of_reference_uid)
    placed = (own_grids(images, spacing, origin, moved) if own else
              {folder: (volume, spacing, origin, first.orientation) for folder, volume in images.items()})
    frames = {folder: generate_uid() for folder in moved or {}}
    series = [(folder, volume, writer.SeriesSpec(spacing=grid_spacing, origin=grid_origin, orientation=orientation,
                                                 **{**shared, "frame_of_reference_uid": frames.get(
                                                     folder, shared["frame_of_reference_uid"])},
                                                 series_description=DESCRIPTIONS.get(folder, folder) + " (synthetic)"))
              for folder, (volume, grid_spacing, grid_origin, orientation) in placed.items()]
    series.append(("mask", mask, writer.SeriesSpec(spacing=spacing, origin=origin, **shared,
                                                   series_description="tumour labels (synthetic)")))
    files = {}
    for folder, volume, series_spec in series:
        if multiframe:
            files[f"{case_id}/{folder}/series.dcm"] = writer.encode(writer.multiframe_dataset(volume, series_spec),
                                                                    transfer_syntax)
        else:
            for number, dataset in enumerate(writer.slice_datasets(volume, series_spec), start=1):
                files[f"{case_id}/{folder}/IM_{number:04d}.dcm"] = writer.encode(dataset, transfer_syntax)
    return files


def write_files(files: dict[str, bytes], out: str) -> int:
    """Write relative paths under ``out`` (an ``s3://`` prefix or a folder); returns bytes written."""
    if out.startswith("s3://"):
        base = out.rstrip("/") + "/"
        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(lambda item: s3.put_bytes(base + item[0], item[1], "application/dicom"),
                          files.items()))
    else:
        for relative, data in files.items():
            path = Path(out) / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return sum(len(data) for data in files.values())


def _make_and_write(index: int, spec: SynthSpec, out: str) -> int:
    return write_files(encode_case(index, spec), out)


def write_dataset(cases: int, out: str, spec: SynthSpec = SynthSpec(), jobs: int = 1, first: int = 0) -> int:
    """Generate and write ``cases`` cases; returns the bytes written."""
    if cases < 1:
        raise ValueError(f"--cases must be at least 1, got {cases}")
    if out.startswith("s3://"):
        s3.parse_uri(out)
    indices = range(first, first + cases)
    if jobs <= 1:
        return sum(_make_and_write(i, spec, out) for i in indices)
    with ProcessPoolExecutor(jobs) as pool:
        return sum(pool.map(_make_and_write, indices, [spec] * cases, [out] * cases))


def _triple(text: str, kind) -> tuple:
    values = tuple(kind(v) for v in text.split(","))
    if len(values) != 3 or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected three positive numbers like 96,128,128")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, required=True)
    parser.add_argument("--out", required=True, help="s3://bucket/prefix/ or a local folder")
    parser.add_argument("--shape", type=lambda t: _triple(t, int), default=SynthSpec.shape, help="D,H,W voxels")
    parser.add_argument("--spacing", type=lambda t: _triple(t, float), default=SynthSpec.spacing,
                        help="dz,dy,dx in mm")
    parser.add_argument("--transfer-syntax", choices=sorted(writer.TRANSFER_SYNTAXES), default="explicit-le")
    parser.add_argument("--multiframe", action="store_true", help="one enhanced multi-frame object per series")
    parser.add_argument("--sequences", default="image",
                        help=f"image (one series, 0/1 mask) or sequences among {','.join(SEQUENCES)} (BraTS labels)")
    parser.add_argument("--thickness", default="1", help="slice thickness factors drawn per case, e.g. 1,2,3 "
                        "(multi-sequence studies)")
    parser.add_argument("--grids", choices=("shared", "own"), default="shared",
                        help="shared: every series on the study's grid; own: each sequence after the first on a grid "
                             "of its own (oblique, sagittal, thick axial, coronal), one frame of reference")
    parser.add_argument("--other-frame", type=int, default=0, metavar="N",
                        help="with --grids own: the first N cases hold their last sequence in a frame of reference of "
                             "its own (the patient moved 5-10 degrees and 5-15 mm)")
    parser.add_argument("--layout", choices=("folders", "studies"), default="folders",
                        help="folders: <case>/<sequence>/; studies: each case as a PACS exports an exam (multi-sequence)")
    parser.add_argument("--label-as", choices=("series", "seg"), default="series",
                        help="with --layout studies: the labels as a label series on the first sequence's grid, or a "
                             "DICOM SEG on its slices (segments 1 necrotic core, 2 oedema, 3 enhancing: train with "
                             "--labels ncr=1,ed=2,et=3)")
    parser.add_argument("--healthy-fraction", type=float, default=0.0, metavar="F",
                        help="this share of the cases holds no tumour (their masks are empty), spread evenly")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="processes generating cases")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("openjpeg").setLevel(logging.WARNING)  # one line per encoded tile otherwise
    try:
        thicknesses = tuple(int(v) for v in args.thickness.split(","))
    except ValueError:
        thicknesses = ()
    if not thicknesses or min(thicknesses) < 1:
        parser.error(f"--thickness {args.thickness!r}: expected positive integers like 1,2,3")
    if not 0.0 <= args.healthy_fraction <= 1.0:
        parser.error(f"--healthy-fraction {args.healthy_fraction}: expected a share from 0 to 1")
    spec = SynthSpec(args.shape, args.spacing, args.transfer_syntax, args.multiframe, args.seed,
                     tuple(name.strip() for name in args.sequences.split(",")), thicknesses, args.grids, args.layout,
                     args.other_frame, args.label_as, args.healthy_fraction)
    started = time.perf_counter()
    try:
        written = write_dataset(args.cases, args.out, spec, jobs=args.jobs)
    except (ValueError, s3.S3Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logger.info("wrote %d case(s), %.1f MB, to %s in %.1f s", args.cases, written / 1e6, args.out,
                time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
