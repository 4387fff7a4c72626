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
