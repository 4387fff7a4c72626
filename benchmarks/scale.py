"""Scale benchmark: what a dataset's object count costs the catalog, single-frame and packed.

    python benchmarks/scale.py [--studies 60] [--slices 155] [--pixels 16] [--contours 20000] [--points 37]
                               [--out benchmarks/results/scale.json]

BraTS-shaped studies (T1c, T1, T2, FLAIR and a label series, ``--slices`` single-frame objects
each) with small pixels (``--pixels`` square: the object count is what is measured here, not the
bytes; docs/performance.md measures bytes and GETs per patch at 240x240) go into the embedded S3.
Measured, for the dataset as written and after ``brainseg-pack`` (one object per series):

- indexing: ``build_catalog`` with no saved index (every header read, masks summarised), headers/s;
- the catalog's resident size: a fresh process builds the catalog from the saved index, and the
  Python memory it holds afterwards (tracemalloc) and its RSS growth are divided by the objects; a
  worker forked from it (as a DataLoader worker is) reports its RSS and the memory it holds of its
  own (USS) after a garbage collection and a pass over every series. The same again with the
  catalog grown to BraTS 2023 GLI's 1,251 studies by copying the indexed studies (each copy's
  keys, ETags and instance hashes its own, built through the same columns);
- packing: seconds, objects and bytes before and after;
- a large RT Structure Set (``--contours`` rings of ``--points`` points on a 155x240x240 series,
  about 20 MB by default): seconds to place it (``build_catalog``) and to rasterise every plane,
  and the peak Python memory of both.

Indexing is extrapolated to BraTS 2023 GLI's 1,251 studies (1,251 x 5 x 155 = 969,525 single-frame objects).
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
def cloned(catalog, studies: int):
    """``catalog`` grown to ``studies`` cases by copying its cases in turn, each copy's keys, ETags
    and instance hashes made its own, through the same columns a catalog builds (its series as
    they would be read from that many studies' index)."""
    import dataclasses
    import hashlib

    from brainseg.data.columns import Headers, Texts

    def unique(text: str, copy: int) -> str:
        return hashlib.md5(f"{copy}/{text}".encode()).hexdigest()

    def series(volume, case_id: str, copy_id: str, copy: int):
        headers = Headers.of([dataclasses.replace(header, instance_hash=unique(header.instance_hash, copy)[:16])
                              for header in volume.headers])
        return dataclasses.replace(volume, keys=Texts(key.replace(f"/{case_id}/", f"/{copy_id}/") for key in volume.keys),
                                   etags=Texts(f'"{unique(etag, copy)}"' for etag in volume.etags), headers=headers)

    cases = list(catalog.cases)
    for copy in range(len(cases), studies):
        case = catalog.cases[copy % len(catalog.cases)]
        copy_id = f"{case.case_id}-copy{copy}"
        cases.append(dataclasses.replace(case, case_id=copy_id, mask=series(case.mask, case.case_id, copy_id, copy),
                                         images=tuple(series(image, case.case_id, copy_id, copy)
                                                      for image in case.images)))
    return dataclasses.replace(catalog, cases=tuple(cases))


def measure_resident(uri: str, studies: int) -> dict:
    """In this (fresh) process: the catalog built from the saved index once (imports, clients and
    caches warmed), dropped, built again (grown to ``studies`` cases when more), and the Python
    memory it holds (tracemalloc), the process's RSS growth, and a forked worker's RSS and unique
    memory (USS: the pages it copied) after a garbage collection and a pass over every series, as
    a DataLoader worker forked from a training process holds it (torch imported and the parent's
    objects frozen first, as in the training process)."""
    import gc
    import tracemalloc

    import psutil
    import torch  # noqa: F401 (imported, as in the training process a DataLoader worker is forked from)

    build = lambda: build_catalog(uri, sequences=SEQUENCES, trust_index=True)
    catalog = build()
    del catalog
    gc.collect()
    process = psutil.Process()
    rss = process.memory_info().rss
    tracemalloc.start()
    catalog = cloned(build(), studies)
    gc.collect()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    volumes = [volume for case in catalog.cases for volume in (*case.images, case.mask)]
    figures = {"cases": len(catalog.cases), "objects": sum(len(volume.keys) for volume in volumes),
               "python_bytes": held, "rss_growth_bytes": process.memory_info().rss - rss}
    gc.collect()
    gc.freeze()  # as brainseg.run.cases.patch_loader does before its workers fork
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the worker: what it holds of its own once it has looked at every series
        os.close(read)
        gc.collect()
        touched = sum(len(volume.keys) + volume.headers[0].rows + len(volume.planes) for volume in volumes)
        memory = psutil.Process().memory_full_info()
        os.write(write, json.dumps({"worker_rss_bytes": memory.rss, "worker_uss_bytes": memory.uss,
                                    "touched": touched}).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        figures.update(json.loads(pipe.read()))
    os.waitpid(child, 0)
    figures.pop("touched")
    return figures


def resident(uri: str, studies: int = 0) -> dict:
    """:func:`measure_resident` in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--resident-of", uri, "--studies", str(studies)],
                         capture_output=True, text=True, env=os.environ, check=True)
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
        report["single_frame"] = {"index": indexed(data), "catalog": resident(data),
                                  "catalog_brats": resident(data, BRATS_STUDIES)}
        print(json.dumps({"single_frame": report["single_frame"]}), flush=True)
        packing = pack.pack(data, packed, jobs=2)
        report["pack"] = {key: packing[key] for key in ("objects_before", "bytes_before", "objects_after",
                                                         "bytes_after", "series_packed", "seconds")}
        report["packed"] = {"index": indexed(packed), "catalog": resident(packed),
                            "catalog_brats": resident(packed, BRATS_STUDIES)}
        print(json.dumps({"pack": report["pack"], "packed": report["packed"]}), flush=True)
        report["structure_set"] = structure_set_cost(args.contours, args.points)
        print(json.dumps({"structure_set": report["structure_set"]}), flush=True)
    objects = BRATS_STUDIES * (len(SEQUENCES) + 1) * args.slices
    report["brats_extrapolation"] = {
        "objects": objects, "single_frame_index_hours": round(objects / report["single_frame"]["index"]["headers_per_s"]
                                                              / 3600, 2)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--slices", type=int, default=155)
    parser.add_argument("--pixels", type=int, default=16)
    parser.add_argument("--contours", type=int, default=20_000, help="closed contours of the large structure set")
    parser.add_argument("--points", type=int, default=37, help="points per contour (20,000 x 37: about 20 MB)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    parser.add_argument("--resident-of", help=argparse.SUPPRESS)  # the fresh process resident() starts
    args = parser.parse_args()
    if args.resident_of:
        print(json.dumps(measure_resident(args.resident_of, args.studies)))
        return
    report = run(args)
    for kind in ("single_frame", "packed"):
        index = report[kind]["index"]
        print(f"{kind:12s}: indexed in {index['seconds']} s ({index['headers_per_s']} headers/s)")
        for catalog in (report[kind]["catalog"], report[kind]["catalog_brats"]):
            print(f"  {catalog['cases']} studies, {catalog['objects']:,} objects: catalog "
                  f"{catalog['python_bytes'] / 2**20:.1f} MiB of Python objects ({catalog['python_bytes_per_object']} B "
                  f"per object), RSS +{catalog['rss_growth_bytes'] / 2**20:.1f} MiB; a forked worker: RSS "
                  f"{catalog['worker_rss_bytes'] / 2**20:.0f} MiB, its own (USS) {catalog['worker_uss_bytes'] / 2**20:.1f} MiB")
    print(f"BraTS 2023 ({BRATS_STUDIES} studies): indexing {report['brats_extrapolation']['objects']:,} single-frame "
          f"objects about {report['brats_extrapolation']['single_frame_index_hours']} h at this rate")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
