"""Scale benchmark: what a dataset's object count costs the catalog, single-frame and packed.

    python benchmarks/scale.py [--studies 60] [--slices 155] [--pixels 16] [--contours 20000] [--points 37]
                               [--out benchmarks/results/scale.json]

BraTS-shaped studies (T1c, T1, T2, FLAIR and a label series, ``--slices`` single-frame objects
each) with small pixels (``--pixels`` square: the object count is what is measured here, not the
bytes; docs/performance.md measures bytes and GETs per patch at 240x240) go into the embedded S3.
Measured, for the dataset as written and after ``brainseg-pack`` (one object per series):

- indexing: ``build_catalog`` with no saved index (every header read, masks summarised), headers/s;
- the catalog's resident size: a fresh process builds the catalog from the saved index, and the
  Python memory it holds afterwards (tracemalloc) and its RSS growth are divided by the objects;
- packing: seconds, objects and bytes before and after;
- a large RT Structure Set (``--contours`` rings of ``--points`` points on a 155x240x240 series,
  about 20 MB by default): seconds to place it (``build_catalog``) and to rasterise every plane,
  and the peak Python memory of both.

Extrapolated to BraTS 2023 GLI's 1,251 studies (1,251 x 5 x 155 = 969,525 single-frame objects).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support: the hand-written structure set

from brainseg.data.catalog import build_catalog  # noqa: E402
from brainseg.io import s3  # noqa: E402
from infra.data import pack  # noqa: E402
from infra.data.synth import SynthSpec, write_dataset  # noqa: E402
from infra.s3server import EmbeddedS3  # noqa: E402

SEQUENCES = ("t1c", "t1", "t2", "flair")
BRATS_STUDIES = 1251
# A fresh process: the catalog built from the saved index once (imports, clients and caches warmed),
# dropped, then built again; what the second one holds is the catalog's own.
RESIDENT = """
import gc, json, sys, tracemalloc, psutil
from brainseg.data.catalog import build_catalog
build = lambda: build_catalog(sys.argv[1], sequences=tuple(sys.argv[2].split(",")), trust_index=True)
catalog = build()
del catalog
gc.collect()
process = psutil.Process()
rss = process.memory_info().rss
tracemalloc.start()
catalog = build()
gc.collect()
held, _ = tracemalloc.get_traced_memory()
objects = sum(len(volume.keys) for case in catalog.cases for volume in (*case.images, case.mask))
print(json.dumps({"cases": len(catalog.cases), "objects": objects, "python_bytes": held,
                  "rss_growth_bytes": process.memory_info().rss - rss}))
"""


def resident(uri: str) -> dict:
    """The catalog's resident size, built from the saved index in a fresh process."""
    out = subprocess.run([sys.executable, "-c", RESIDENT, uri, ",".join(SEQUENCES)], capture_output=True, text=True,
                         env=os.environ, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    figures["python_bytes_per_object"] = round(figures["python_bytes"] / figures["objects"], 1)
    figures["rss_bytes_per_object"] = round(figures["rss_growth_bytes"] / figures["objects"], 1)
    return figures


def indexed(uri: str) -> dict:
    """A cold catalog build (no saved index): seconds, and headers per second while reading headers."""
    started = time.perf_counter()
    catalog = build_catalog(uri, sequences=SEQUENCES)
    seconds = time.perf_counter() - started
    return {"cases": len(catalog.cases), "excluded": len(catalog.exclusions), "seconds": round(seconds, 1),
            "index_stats": catalog.index_stats, "objects": catalog.index_stats["headers_read"],
            "headers_per_s": catalog.index_stats["headers_per_s"]}


def structure_set_cost(contours: int, points: int, shape: tuple = (155, 240, 240)) -> dict:
    """A structure set of ``contours`` closed contours of ``points`` points each (rings spread over the
    planes of a ``shape`` series): its size, and the seconds and peak Python memory of placing it on
    the series (``build_catalog``) and rasterising every plane."""
    import io
    import tracemalloc

    import numpy as np
    import pydicom

    from brainseg.dicom import writer
    from tests.support.fuzz import identified_spec, structure_set

    spec = identified_spec(spacing=(1.0, 1.0, 1.0))
    slices = [pydicom.dcmread(io.BytesIO(writer.encode(dataset)))
              for dataset in writer.slice_datasets(np.zeros(shape, np.int16), spec)]
    dataset = pydicom.dcmread(io.BytesIO(structure_set(slices)))
    template = dataset.ROIContourSequence[0].ContourSequence[0]
    rng = np.random.default_rng(0)
    items = []
    for number in range(contours):
        plane = slices[1 + number % (len(slices) - 2)]
        angles = np.linspace(0.0, 2 * np.pi, points, endpoint=False)
        centre = np.asarray(plane.ImagePositionPatient, float) + [rng.uniform(20, 220), rng.uniform(20, 220), 0.0]
        ring = centre + np.stack([3 * np.cos(angles), 3 * np.sin(angles), np.zeros(points)], axis=1)
        item = pydicom.Dataset()
        item.ContourGeometricType, item.NumberOfContourPoints = "CLOSED_PLANAR", points
        item.ContourData = [round(float(v), 3) for v in ring.ravel()]
        item.ContourImageSequence = template.ContourImageSequence
        items.append(item)
    dataset.ROIContourSequence[0].ContourSequence = pydicom.Sequence(items)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    prefix = "s3://scale/rtstruct/case/"
    for index, image in enumerate(slices):
        s3.put_bytes(f"{prefix}image/IM_{index:04d}.dcm", writer.encode(image))
    s3.put_bytes(f"{prefix}mask/RS.dcm", buffer.getvalue())
    tracemalloc.start()
    started = time.perf_counter()
    catalog = build_catalog("s3://scale/rtstruct/", split_fractions=(1.0, 0.0, 0.0))
    placed = time.perf_counter() - started
    started = time.perf_counter()
    labels = catalog.cases[0].mask.read_volume()
    rasterised = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"contours": contours, "points": contours * points, "megabytes": round(len(buffer.getvalue()) / 1e6, 1),
            "catalog_seconds": round(placed, 1), "rasterise_seconds": round(rasterised, 1),
            "peak_python_mib": round(peak / 2**20), "labelled_voxels": int((labels > 0).sum())}


def run(args) -> dict:
    with EmbeddedS3() as server:
        os.environ.update(server.environment())
        s3.reset_client()
        s3.create_bucket("scale")
        data, packed = "s3://scale/brats/", "s3://scale/packed/"
        started = time.perf_counter()
        write_dataset(args.studies, data, SynthSpec(shape=(args.slices, args.pixels, args.pixels),
                                                    spacing=(1.0, 1.0, 1.0), sequences=SEQUENCES), jobs=2)
        report = {"studies": args.studies, "slices": args.slices, "pixels": args.pixels,
                  "write_seconds": round(time.perf_counter() - started, 1), "cpu_count": os.cpu_count(),
                  "platform": platform.platform()}
        report["single_frame"] = {"index": indexed(data), "catalog": resident(data)}
        print(json.dumps({"single_frame": report["single_frame"]}), flush=True)
        packing = pack.pack(data, packed, jobs=2)
        report["pack"] = {key: packing[key] for key in ("objects_before", "bytes_before", "objects_after",
                                                         "bytes_after", "series_packed", "seconds")}
        report["packed"] = {"index": indexed(packed), "catalog": resident(packed)}
        print(json.dumps({"pack": report["pack"], "packed": report["packed"]}), flush=True)
        report["structure_set"] = structure_set_cost(args.contours, args.points)
        print(json.dumps({"structure_set": report["structure_set"]}), flush=True)
    objects = BRATS_STUDIES * (len(SEQUENCES) + 1) * args.slices
    per_object = report["single_frame"]["catalog"]["python_bytes_per_object"]
    report["brats_extrapolation"] = {
        "objects": objects, "single_frame_catalog_mib": round(objects * per_object / 2**20),
        "packed_objects": BRATS_STUDIES * (len(SEQUENCES) + 1),
        "packed_catalog_mib": round(report["packed"]["catalog"]["python_bytes"] * BRATS_STUDIES / args.studies / 2**20, 1),
        "single_frame_index_hours": round(objects / report["single_frame"]["index"]["headers_per_s"] / 3600, 2)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--slices", type=int, default=155)
    parser.add_argument("--pixels", type=int, default=16)
    parser.add_argument("--contours", type=int, default=20_000, help="closed contours of the large structure set")
    parser.add_argument("--points", type=int, default=37, help="points per contour (20,000 x 37: about 20 MB)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    args = parser.parse_args()
    report = run(args)
    for kind in ("single_frame", "packed"):
        index, catalog = report[kind]["index"], report[kind]["catalog"]
        print(f"{kind:12s}: {catalog['objects']:,} objects, indexed in {index['seconds']} s "
              f"({index['headers_per_s']} headers/s); catalog {catalog['python_bytes'] / 2**20:.1f} MiB of Python "
              f"objects ({catalog['python_bytes_per_object']} B per object), RSS +{catalog['rss_growth_bytes'] / 2**20:.1f} MiB")
    brats = report["brats_extrapolation"]
    print(f"BraTS 2023 ({BRATS_STUDIES} studies): {brats['objects']:,} single-frame objects -> catalog about "
          f"{brats['single_frame_catalog_mib']} MiB per process, indexing about {brats['single_frame_index_hours']} h "
          f"at this rate; packed: {brats['packed_objects']:,} objects, catalog about {brats['packed_catalog_mib']} MiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
