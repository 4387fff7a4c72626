"""The studies layout against the moto S3 server: exams written as a PACS exports them (objects
named by UIDs or numbers, localisers, diffusion, reformats and labels beside the sequences, each
sequence on a grid of its own), found by their headers and named by the sequence rules."""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import logging
import re
from collections import Counter

import numpy as np
import pydicom
import pytest

from brainseg.data.catalog import build_catalog
from brainseg.data.identify import RulesError, default_rules, load_rules, parse_rules
from brainseg.dicom import writer
from brainseg.dicom.header import ObjectHeader
from brainseg.io import s3
from brainseg.labels import parse_scheme
from infra.data.exported import encode_exported
from infra.data.profile import format_profile, profile_catalog
from infra.data.synth import SynthSpec, write_dataset, write_files

SEQUENCES = ("t1c", "t1", "t2", "flair")
SPEC = SynthSpec(shape=(20, 40, 40), spacing=(2.0, 1.0, 1.0), sequences=SEQUENCES, grids="own", layout="studies")


def _exam(index: int, **changes) -> dict[str, bytes]:
    """One exported exam of SPEC's study ``index``, with ``changes`` to its files (path -> bytes or None)."""
    images, labels, spacing = SPEC.volumes(index)
    origin = (-20.0, -20.0, -20.0)
    files = encode_exported(index, images, labels, spacing, origin, True, f"PID{index}", f"Doe^Jane^{index}")
    for path, data in changes.items():
        if data is None:
            files.pop(path)
        else:
            files[path] = data
    return files


def test_exported_exams_are_found_by_their_headers_and_read_as_their_folder_twins(bucket):
    root = f"s3://{bucket}/export/"
    write_dataset(3, root, SPEC)
    assert not any(re.search(r"/(t1c|t1|t2|flair|mask)/", info.key) for info in s3.list_tree(bucket, "export/"))
    catalog = build_catalog(root, sequences=SEQUENCES, layout="auto", split_fractions=(1.0, 0.0, 0.0))
    assert catalog.layout == "studies" and not catalog.exclusions and len(catalog.cases) == 3
    assert all(re.fullmatch(r"study-[0-9a-f]{12}", case.case_id) for case in catalog.cases)
    # a confusion table of what each series was written as against what it was found to be
    written = ["localiser", "t1", "t2", "flair", "diffusion", "adc", "t1c", "mpr", "labels"]
    found = Counter((what, verdict.role) for verdicts in catalog.discovery.verdicts.values()
                    for what, verdict in zip(written, verdicts))
    assert found == Counter({("localiser", "ignored"): 3, ("t1", "t1"): 3, ("t2", "t2"): 3, ("flair", "flair"): 3,
                             ("diffusion", "ignored"): 3, ("adc", "ignored"): 3, ("t1c", "t1c"): 3,
                             ("mpr", "ignored"): 3, ("labels", "label"): 3})
    assert catalog.discovery.left_out == {"not an image (DICOMDIR (a media directory), not part of a series)": 2}
    # each study reads as the same study written in folders on one grid: the T1c and labels exactly,
    # the other sequences through their own geometry
    for index in range(3):
        images, labels, _ = SPEC.volumes(index)
        case = next(case for case in catalog.cases
                    if np.array_equal(case.image.read_volume(), images["t1c"].astype(np.float32)))
        np.testing.assert_array_equal(case.mask.read_volume(), labels)
        assert sorted(case.resampled) == ["flair", "t1", "t2"]
        assert [stats.sequence for stats in case.summary.intensities] == list(SEQUENCES)


def test_an_export_with_a_seg_label_and_a_flair_from_another_frame_is_usable_whole(bucket):
    """What a scanner and a reader write: the label as a DICOM SEG on the T1c (segments 1-3), and one
    study's FLAIR acquired after the patient moved (its own frame of reference), registered back."""
    spec = SynthSpec(shape=(40, 64, 64), spacing=(3.0, 2.0, 2.0), sequences=SEQUENCES, grids="own", layout="studies",
                     other_frame=1, label_as="seg")
    root = f"s3://{bucket}/seg-export/"
    write_dataset(2, root, spec)
    catalog = build_catalog(root, sequences=SEQUENCES, labels=parse_scheme("ncr=1,ed=2,et=3"), layout="studies",
                            split_fractions=(1.0, 0.0, 0.0))
    assert not catalog.exclusions and len(catalog.cases) == 2
    registered = 0
    for index in range(2):
        images, labels, _ = spec.volumes(index)
        case = next(case for case in catalog.cases
                    if np.array_equal(case.image.read_volume(), images["t1c"].astype(np.float32)))
        np.testing.assert_array_equal(case.mask.read_volume(), np.where(labels == 4, 3, labels))
        registered += case.resampled["flair"].registration is not None
        assert (case.resampled["flair"].registration is not None) == bool(spec.motion(index))
    assert registered == 1


def test_what_the_data_owner_sees_and_the_job_logs(bucket, caplog):
    root = f"s3://{bucket}/export/"
    write_files(_exam(0), root)
    with caplog.at_level(logging.INFO):
        catalog = build_catalog(root, sequences=SEQUENCES, layout="studies")
    report = format_profile(profile_catalog(catalog))
    assert re.search(r"  t1c: 1 by 'T1 with a contrast agent given'", report)
    assert re.search(r"series 4 \([0-9a-f]{8}\) +flair +description FLAIR +'AX T2 FLAIR \| t2_tirm_flair'", report)
    # the job's log names rules and counts; no description, name or UID from the headers
    logged = caplog.text
    assert "t1c: 1 by 'T1 with a contrast agent given'" in logged
    assert "T2 FLAIR" not in logged and "Doe" not in logged and "PID0" not in logged


def test_a_study_that_cannot_be_used_is_excluded_with_a_reason_naming_its_series(bucket):
    root = f"s3://{bucket}/export/"
    no_t1c = {path: data for path, data in _exam(0).items() if "/SE7/" not in path}  # the post-contrast T1
    write_files(no_t1c, root)
    twice = _exam(1)  # a repeated FLAIR with the same number and time: nothing tells the two apart
    flair = [(path, data) for path, data in twice.items() if b"T2 FLAIR" in data[:4000]]
    repeated = {}
    for path, data in flair:
        dataset = pydicom.dcmread(io.BytesIO(data))
        dataset.SeriesInstanceUID = "1.2.826.0.1.3680043.10.99.1"
        dataset.SOPInstanceUID = dataset.SOPInstanceUID + ".9"
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        repeated[path.rsplit("/", 1)[0] + "/again/" + path.rsplit("/", 1)[1]] = writer.encode(dataset)
    write_files({**twice, **repeated}, root)
    catalog = build_catalog(root, sequences=SEQUENCES, layout="studies")
    assert not catalog.cases
    reasons = sorted(item.reason for item in catalog.exclusions)
    assert re.fullmatch(r"2 equally good flair series \(series 4 \([0-9a-f]{8}\), series 4 \([0-9a-f]{8}\)\): 3d, "
                        r"slices, later do not tell them apart; keep one, or tell them apart with --sequence-rules",
                        reasons[0]), reasons[0]
    assert reasons[1] == ("no series identified as t1c among its 8 series (4 ignored (derived or reformatted, diffusion, "
                          "localiser), 1 t1 (description T1), 1 t2 (description T2), 1 flair (description FLAIR), "
                          "1 label (label series)); name it with --sequence-rules, or zero-fill it with "
                          "--missing-sequences zero")
    with_zeros = build_catalog(root, sequences=SEQUENCES, layout="studies", zero_fill=True)
    assert [case.missing for case in with_zeros.cases] == [("t1c",)]


def _patient_exam(index: int, patient: str, date: str, series: tuple = (), **attributes) -> dict[str, bytes]:
    """SPEC's study ``index`` exported as ``patient``'s exam of ``date``: only the series numbered
    ``series`` (default all, SERIES_ORDER from 1), each object given ``attributes``."""
    images, labels, spacing = SPEC.volumes(index)
    files = encode_exported(index, images, labels, spacing, (-20.0, -20.0, -20.0), True, patient, "Doe^Jane",
                            study_date=date)
    kept = {}
    for path, data in files.items():
        if path.endswith("DICOMDIR"):
            continue
        dataset = pydicom.dcmread(io.BytesIO(data))
        if not series or dataset.SeriesNumber in series:
            for keyword, value in attributes.items():
                setattr(dataset, keyword, value)
            kept[path.replace("PA", f"{patient}/PA")] = writer.encode(dataset)
    return kept


def test_a_patients_studies_pool_into_one_case_with_case_per_patient(bucket):
    """One patient's exam split over two study UIDs by the export (the T1c and its label in one, the
    rest in the other, one frame of reference), and another patient's two complete visits."""
    root = f"s3://{bucket}/patients/"
    split = _patient_exam(0, "SPLIT", "20250301", series=(7, 9))  # T1c and the label series
    frame = pydicom.dcmread(io.BytesIO(next(iter(split.values())))).FrameOfReferenceUID
    split.update(_patient_exam(0, "SPLIT", "20250301", series=(1, 2, 3, 4, 5, 6, 8), FrameOfReferenceUID=frame))
    write_files({**split, **_patient_exam(1, "VISITS", "20240105"), **_patient_exam(2, "VISITS", "20250105")}, root)
    by_study = build_catalog(root, sequences=SEQUENCES, layout="studies", split_fractions=(1.0, 0.0, 0.0))
    assert len(by_study.cases) == 2 and len(by_study.exclusions) == 2  # each half of the split exam lacks sequences
    assert all(re.match(r"study-[0-9a-f]{12}$", case.case_id) for case in by_study.cases)
    catalog = build_catalog(root, sequences=SEQUENCES, layout="studies", case_per="patient",
                            split_fractions=(1.0, 0.0, 0.0))
    assert not catalog.exclusions and len(catalog.cases) == 2
    assert all(re.match(r"patient-[0-9a-f]{12}$", case.case_id) for case in catalog.cases)
    for index in (0, 2):  # the split exam whole; of the two visits, the later one's series and label
        images, labels, _ = SPEC.volumes(index)
        case = next(case for case in catalog.cases
                    if np.array_equal(case.image.read_volume(), images["t1c"].astype(np.float32)))
        np.testing.assert_array_equal(case.mask.read_volume(), labels)
        assert sorted(case.resampled) == ["flair", "t1", "t2"]
        assert all(resampled.registration is None for resampled in case.resampled.values())
    curated = f"s3://{bucket}/curated/"
    write_dataset(1, curated, SynthSpec(shape=(12, 24, 24), spacing=(2.0, 1.0, 1.0), sequences=SEQUENCES))
    with pytest.raises(ValueError, match=r"case_per 'patient': cases are grouped by patient only in the studies "
                                         r"layout, and s3://.*/curated/ was read as folders"):
        build_catalog(curated, sequences=SEQUENCES, case_per="patient", layout="auto")
    verdicts = catalog.discovery.verdicts[case.case_id]  # the visits: the first one's sequences and label set aside
    assert Counter(verdict.role for verdict in verdicts if verdict.role not in ("ignored",)) == Counter(
        {"not chosen": 5, "t1c": 1, "t1": 1, "t2": 1, "flair": 1, "label": 1})
    assert sum("drawn in another study than the reference" in verdict.detail for verdict in verdicts) == 1


def test_rules_a_user_writes_extend_or_replace_the_shipped_ones(tmp_path, bucket):
    own = tmp_path / "rules.yaml"
    own.write_text("extends: default\nsequences:\n  t1c:\n    - name: site post-contrast\n      description: ['kontrast']\n")
    rules = load_rules(str(own))
    assert rules.names == ("t1c", "flair", "t2", "t1") and rules.sequences[0][1][0].name == "site post-contrast"
    assert len(rules.ignore) == len(default_rules().ignore)
    s3.put_bytes(f"s3://{bucket}/rules.yaml", b"sequences:\n  dwi:\n    - name: trace\n      description: [trace]\n")
    only = load_rules(f"s3://{bucket}/rules.yaml")
    assert only.names == ("dwi",) and not only.ignore
    with pytest.raises(RulesError, match=r"--sequences names t1c, which the sequence rules .* do not define "
                                         r"\(they define dwi\)"):
        only.check_sequences(("t1c",))


@pytest.mark.parametrize("text, message", [
    ("sequences: [", r"site.yaml: not valid YAML at line 1, column 13 \(expected the node content"),
    ("sequences:\n  t1c:\n    - name: x\n      descripton: [t1]\n",
     r"sequences\.t1c\[0\]: unknown condition 'descripton' \(expected name, description"),
    ("sequences:\n  t1c:\n    - name: x\n      description: ['t1(']\n",
     r"sequences\.t1c\[0\]\.description: 't1\(' is not a regular expression"),
    ("sequences:\n  t1c:\n    - description: [t1]\n", r"sequences\.t1c\[0\]: every rule needs a name"),
    ("sequences:\n  t1c:\n    - name: x\n", r"a rule needs at least one condition besides its name"),
    ("sequences:\n  t1c:\n    - name: x\n      echo_time_ms: {min: short}\n", r"echo_time_ms\.min: expected a number"),
    ("sequences:\n  t1c:\n    - name: x\n      contrast_agent: yes please\n", r"contrast_agent: expected true or false"),
    ("prefer: [newest]\nsequences:\n  t1c:\n    - name: x\n      acquisition: 3D\n", r"prefer: expected a list of 3d"),
    ("sequence:\n  t1c: []\n", r"unknown section 'sequence'"),
    ("ignore: []\n", r"no sequences defined"),
])
def test_an_unusable_rules_file_is_refused_with_the_place_and_what_was_expected(text, message):
    with pytest.raises(RulesError, match=message):
        parse_rules(text, "site.yaml")


def test_a_rules_file_that_cannot_be_read_says_so(tmp_path):
    with pytest.raises(RulesError, match=r"sequence rules .*missing\.yaml: cannot be read"):
        load_rules(str(tmp_path / "missing.yaml"))


def _saved_days(index_uri: str) -> set:
    """The series days of the image headers a saved index holds."""
    at = [f.name for f in dataclasses.fields(ObjectHeader)].index("series_day")
    rows = [json.loads(line) for line in s3.read_uri(index_uri).decode().splitlines()[1:]]
    return {row["header"][at] for row in rows if row.get("header")}


def test_series_descriptions_and_dates_reach_the_saved_index_only_in_the_studies_layout(bucket):
    root = f"s3://{bucket}/export/"
    write_files(_exam(0), root)
    index = root + ".brainseg/index.jsonl"
    build_catalog(root, sequences=SEQUENCES, layout="studies")
    assert "T2 FLAIR" in s3.read_uri(index).decode()
    assert _saved_days(index) == {datetime.date(2026, 1, 1).toordinal()}  # the writer's StudyDate and SeriesDate
    curated = f"s3://{bucket}/curated/"
    write_dataset(1, curated, SynthSpec(shape=(12, 24, 24), spacing=(2.0, 1.0, 1.0), sequences=SEQUENCES))
    build_catalog(curated, sequences=SEQUENCES)
    saved = s3.read_uri(curated + ".brainseg/index.jsonl").decode()
    assert "FLAIR (synthetic)" not in saved and '"descriptions": false' in saved.splitlines()[0]
    assert _saved_days(curated + ".brainseg/index.jsonl") == {0}
    # the same objects read as studies: the index had no descriptions, so the headers are read again
    again = build_catalog(curated, sequences=SEQUENCES, layout="studies")
    assert again.index_stats["headers_read"] == again.index_stats["objects"] and len(again.cases) == 1
    assert "FLAIR (synthetic)" in s3.read_uri(curated + ".brainseg/index.jsonl").decode()
