"""Prediction against the moto S3 server: a model trained for a few steps segments new synthetic
studies; the DICOM SEG it writes reads back with highdicom onto the source slices; volumes, scores,
ensembles, test-time mirroring, skipped cases, reruns and the hosting handler."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from brainseg.commands import predict, train
from brainseg.commands import serving as inference
from brainseg.data.catalog import build_catalog
from brainseg.data.stream import read_case_region
from brainseg.detection import Threshold, largest_component_ml_of
from brainseg.dicom import HeaderError, writer
from brainseg.dicom.seg import Algorithm, encode_segmentation
from brainseg.io import s3
from brainseg.metrics import lesion_wise
from brainseg.model.artifact import ModelError, load_model, read_artifact
from brainseg.model.description import ModelDescription
from brainseg.postprocess import Rule, apply_rules, rules_of
from brainseg.prediction.options import parse_options
from brainseg.prediction.predictor import Predictor
from infra.data.synth import SynthSpec, encode_case, write_dataset
from infra.review import cli as review
from infra.review.predictions import load_prediction, seg_overlay

SEQUENCES = "t1c,flair"
NEW = SynthSpec(shape=(20, 40, 44), sequences=("t1c", "flair"), thicknesses=(1, 2), seed=7)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(s3_server, tmp_path_factory):
    """A two-sequence, three-region model trained for a few steps: its run URI and model folder."""
    bucket = f"predict-{os.getpid()}"
    s3.client().create_bucket(Bucket=bucket)
    write_dataset(8, f"s3://{bucket}/train/", SynthSpec(shape=(24, 48, 48), sequences=("t1c", "flair"),
                                                         thicknesses=(1, 2)))
    model_dir = tmp_path_factory.mktemp("model")
    saved = os.environ.get("SM_MODEL_DIR")
    os.environ["SM_MODEL_DIR"] = str(model_dir)
    try:
        assert train.main(["--data-uri", f"s3://{bucket}/train/", "--output-uri", f"s3://{bucket}/runs",
                           "--run-name", "r", "--sequences", SEQUENCES, "--labels", "ncr=1,ed=2,et=4",
                           "--regions", "brats", "--channels", "8,16", "--patch-size", "8,32,32", "--batch-size", "2",
                           "--num-workers", "0", "--epochs", "1", "--steps-per-epoch", "4", "--res-units", "1",
                           "--memory-budget-mb", "64", "--warmup-steps", "1"]) == 0
    finally:
        os.environ["SM_MODEL_DIR"] = saved
    write_dataset(3, f"s3://{bucket}/new/", NEW)
    return {"bucket": bucket, "run": f"s3://{bucket}/runs/r/", "model_dir": model_dir, "data": f"s3://{bucket}/new/"}


def _rows(uri: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(s3.read_uri(uri).decode())))


def _source(bucket: str, case_id: str) -> dict:
    """The case's t1c slices as pydicom datasets, by SOP instance UID."""
    datasets = [pydicom.dcmread(io.BytesIO(s3.get_object(bucket, info.key)))
                for info in s3.list_objects(bucket, f"new/{case_id}/t1c/")]
    return {dataset.SOPInstanceUID: dataset for dataset in datasets}


def _seg_planes(seg, source: dict, shape: tuple) -> np.ndarray:
    """The SEG's frames placed on the source slices they reference: ``(segments, D, H, W)``, z in
    the order of the slices' positions along the normal. Checks each frame's position and orientation."""
    normal = np.cross(*np.reshape(next(iter(source.values())).ImageOrientationPatient, (2, 3)))
    order = sorted(source, key=lambda uid: float(np.dot(normal, source[uid].ImagePositionPatient)))
    z_of = {uid: z for z, uid in enumerate(order)}
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == pytest.approx(
        [float(v) for v in source[order[0]].ImageOrientationPatient])
    volume = np.zeros((len(seg.SegmentSequence), *shape), dtype=bool)
    pixels = seg.pixel_array if seg.NumberOfFrames > 1 else seg.pixel_array[None]
    for frame, group in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in source[uid].ImagePositionPatient])
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        volume[segment - 1, z_of[uid]] = frame > 0
    return volume


def test_predictions_are_dicom_seg_on_the_source_slices_with_volumes_and_scores(trained):
    bucket, output = trained["bucket"], f"s3://{trained['bucket']}/pred/"
    assert predict.main(["--model", trained["run"], "--data-uri", trained["data"], "--output-uri", output]) == 0
    complete = json.loads(s3.read_uri(output + "complete.json"))
    assert complete["cases"] == complete["predicted"] == 3
    rows = _rows(output + "predictions.csv")
    assert [row["case_id"] for row in rows] == ["case_0000", "case_0001", "case_0002"]

    model = load_model(trained["run"], torch.device("cpu"))
    predictor = Predictor([model], torch.device("cpu"))
    catalog = build_catalog(trained["data"], require_masks=False, sequences=("t1c", "flair"))
    for case, row in zip(catalog.cases, rows):
        seg = hd.seg.segread(io.BytesIO(s3.read_uri(f"{output}{case.case_id}/segmentation.dcm")))
        source = _source(bucket, case.case_id)
        first = next(iter(source.values()))
        assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
        assert [segment.SegmentLabel for segment in seg.SegmentSequence] == ["wt", "tc", "et"]

        depth, rows_, columns = case.image.shape
        channels, mask = read_case_region(case, (0, depth, 0, rows_, 0, columns))
        expected = predictor.predict(channels, case.summary.intensities, case.image.spacing).masks
        placed = _seg_planes(seg, source, case.image.shape)
        voxel_ml = float(np.prod(case.image.spacing)) / 1000
        for index, name in enumerate(("wt", "tc", "et")):
            assert np.array_equal(placed[index], expected[index]), name  # voxel for voxel on the source slices
            assert int(row[f"voxels_{name}"]) == int(expected[index].sum())
            assert float(row[f"predicted_ml_{name}"]) == pytest.approx(int(expected[index].sum()) * voxel_ml, abs=1e-6)
            assert 0.0 <= float(row[f"dice_{name}"]) <= 1.0 and float(row[f"hd95_{name}"]) >= 0.0
            truth = (mask > 0) if name == "wt" else np.isin(mask, (1, 4)) if name == "tc" else mask == 4
            lesions = lesion_wise(expected[index], truth, case.image.spacing)  # BraTS's lesion-wise columns
            assert float(row[f"lesion_dice_{name}"]) == pytest.approx(lesions.dice, abs=1e-6)
            assert float(row[f"lesion_hd95_{name}"]) == pytest.approx(lesions.hd95, abs=1e-3)
            assert (int(row[f"lesions_{name}"]), int(row[f"false_positives_{name}"])) == (lesions.lesions,
                                                                                        lesions.false_positives)
        score = largest_component_ml_of(expected, case.image.spacing)  # the study's detection score and call
        assert float(row["tumour_score_ml"]) == pytest.approx(score, abs=1e-4)
        assert row["tumour_present"] == str(int(score > model.description.detection["ml"]))
        assert float(row["spacing_mm"].split("x")[0]) in (1.5, 3.0)
        assert _rows(f"{output}{case.case_id}/volumes.csv")[0] == row
    assert {float(row["spacing_mm"].split("x")[0]) for row in rows} == {1.5, 3.0}  # both thicknesses were drawn


def test_nifti_label_maps_sit_on_the_source_slices_in_scanner_coordinates(trained):
    bucket, output = trained["bucket"], f"s3://{trained['bucket']}/pred-nifti/"
    assert predict.main(["--model", trained["run"], "--data-uri", trained["data"], "--output-uri", output,
                         "--output-format", "nifti"]) == 0
    predictor = Predictor([load_model(trained["run"], torch.device("cpu"))], torch.device("cpu"))
    catalog = build_catalog(trained["data"], require_masks=False, sequences=("t1c", "flair"))
    for case in catalog.cases:
        assert s3.read_uri(f"{output}{case.case_id}/segmentation.dcm") is None  # nifti only, as asked
        image = nib.Nifti1Image.from_bytes(gzip.decompress(s3.read_uri(f"{output}{case.case_id}/{case.case_id}.nii.gz")))
        assert image.header["qform_code"] == image.header["sform_code"] == 1
        labels = np.asarray(image.dataobj).transpose(2, 1, 0)  # (x, y, z) back to (slice, row, column)
        depth, rows_, columns = case.image.shape
        channels, _ = read_case_region(case, (0, depth, 0, rows_, 0, columns))
        wt, tc, et = predictor.predict(channels, case.summary.intensities, case.image.spacing).masks
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 4}
        assert np.array_equal(labels == 4, et) and np.array_equal(labels > 0, wt | tc | et)  # ET painted last
        assert np.array_equal(labels == 1, tc & ~et) and np.array_equal(labels == 2, wt & ~tc & ~et)
        source = _source(bucket, case.case_id)
        normal = np.cross(*np.reshape(next(iter(source.values())).ImageOrientationPatient, (2, 3)))
        slices = sorted(source.values(), key=lambda d: float(np.dot(normal, d.ImagePositionPatient)))
        for z, row, column in ((0, 0, 0), (depth - 1, 5, 7), (depth // 2, rows_ - 1, columns - 1)):
            dataset = slices[z]  # where pydicom's headers put the voxel, in LPS mm
            row_cosine, column_cosine = np.reshape(np.asarray(dataset.ImageOrientationPatient, float), (2, 3))
            spacing = np.asarray(dataset.PixelSpacing, float)
            lps = (np.asarray(dataset.ImagePositionPatient, float) + column * spacing[1] * row_cosine
                   + row * spacing[0] * column_cosine)
            ras = image.affine @ np.array([column, row, z, 1.0])
            np.testing.assert_allclose(ras[:3] * [-1, -1, 1], lps, atol=1e-3)


def test_an_ensemble_from_archive_and_run_with_mirroring_runs_and_reruns_skip_complete_cases(trained, tmp_path):
    bucket = trained["bucket"]
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(trained["model_dir"].rglob("*")):
            tar.add(path, arcname=str(path.relative_to(trained["model_dir"])), recursive=False)
    s3.put_bytes(f"s3://{bucket}/packaged/model.tar.gz", archive.read_bytes())
    output = f"s3://{bucket}/ensemble/"
    models = f"s3://{bucket}/packaged/model.tar.gz,{trained['run']}"
    flags = ["--model", models, "--data-uri", trained["data"], "--output-uri", output, "--mirror", "true",
             "--cases", "case_0001"]
    assert predict.main(flags) == 0
    settings = json.loads(s3.read_uri(output + "prediction.json"))
    assert [model["source"] for model in settings["models"]] == [
        f"s3://{bucket}/packaged/model.tar.gz!model.pt", f"{trained['run']}model/model.pt"]
    first = s3.read_uri(output + "case_0001/segmentation.dcm")
    assert predict.main(flags) == 0  # complete cases are kept, not predicted again
    assert s3.read_uri(output + "case_0001/segmentation.dcm") == first
    assert json.loads(s3.read_uri(output + "complete.json"))["predicted"] == 1
    assert predict.main([*flags, "--overwrite", "true"]) == 0
    assert s3.read_uri(output + "case_0001/segmentation.dcm") != first  # a new SEG (new UIDs)


def test_ensembles_average_probabilities_and_mirroring_makes_predictions_flip_equivariant(trained):
    loaded = load_model(trained["run"], torch.device("cpu"))
    other = load_model(trained["run"], torch.device("cpu"))
    torch.manual_seed(3)
    for parameter in other.network.parameters():
        parameter.data.add_(0.3 * torch.randn_like(parameter))
    rng = np.random.default_rng(0)
    channels = [rng.normal(100, 20, (8, 32, 32)).astype(np.float32) for _ in range(2)]
    stats = build_catalog(trained["data"], require_masks=False, sequences=("t1c", "flair")).cases[0].summary.intensities
    spacing = (1.5, 1.0, 1.0)  # the model's own grid: no resampling
    single = [Predictor([m], torch.device("cpu")).predict(channels, stats, spacing).probabilities for m in (loaded, other)]
    both = Predictor([loaded, other], torch.device("cpu")).predict(channels, stats, spacing).probabilities
    assert not np.allclose(single[0], single[1])
    assert np.allclose(both, (single[0] + single[1]) / 2, atol=1e-6)

    flipped = [channel[:, ::-1, :].copy() for channel in channels]
    plain, mirrored = (Predictor([loaded], torch.device("cpu"), mirror=mirror) for mirror in (False, True))
    assert not np.allclose(plain.predict(flipped, stats, spacing).probabilities,
                           plain.predict(channels, stats, spacing).probabilities[:, :, ::-1], atol=1e-5)
    assert np.allclose(mirrored.predict(flipped, stats, spacing).probabilities,
                       mirrored.predict(channels, stats, spacing).probabilities[:, :, ::-1], atol=1e-5)


def test_the_postprocessing_a_model_chose_is_applied_unless_turned_off(trained):
    loaded = load_model(trained["run"], torch.device("cpu"))
    chosen = {"wt": Rule(largest_only=True).to_dict(), "et": Rule(min_mm3=1e9).to_dict()}
    pruned = dataclasses.replace(loaded, description=dataclasses.replace(loaded.description, postprocessing=chosen))
    rng = np.random.default_rng(1)
    channels = [rng.normal(100, 40, (8, 32, 32)).astype(np.float32) for _ in range(2)]
    stats = build_catalog(trained["data"], require_masks=False, sequences=("t1c", "flair")).cases[0].summary.intensities
    spacing = (1.5, 1.0, 1.0)
    raw = Predictor([pruned], torch.device("cpu"), postprocess=False).predict(channels, stats, spacing).masks
    own = rules_of(loaded.description.postprocessing)  # what the fixture's run chose on its validation cases
    expected = apply_rules(own, ("wt", "tc", "et"), raw, spacing)
    assert all(np.array_equal(mask, wanted) for mask, wanted in zip(
        Predictor([loaded], torch.device("cpu")).predict(channels, stats, spacing).masks, expected))
    masks = Predictor([pruned], torch.device("cpu")).predict(channels, stats, spacing).masks
    assert raw[0].any() and raw[2].any()  # there is something to remove
    assert np.array_equal(masks[0], Rule(largest_only=True).apply(raw[0], spacing))
    assert np.array_equal(masks[1], raw[1]) and not masks[2].any()
    pooled = {"et": Rule(min_mm3=1e9)}  # a cross-validation's choice replaces the models' own
    masks = Predictor([pruned], torch.device("cpu"), rules=pooled).predict(channels, stats, spacing).masks
    assert np.array_equal(masks[0], raw[0]) and np.array_equal(masks[1], raw[1]) and not masks[2].any()
    with pytest.raises(ModelError, match="postprocessing for necrosis: the models' structures are wt, tc, et"):
        Predictor([loaded], torch.device("cpu"), rules={"necrosis": Rule(min_mm3=10)})


def test_an_ensemble_calls_a_tumour_above_the_median_of_its_models_thresholds(trained):
    loaded = load_model(trained["run"], torch.device("cpu"))
    assert set(loaded.description.detection) == {"ml", "chosen_on"}  # chosen on the run's validation cases
    at = lambda ml: dataclasses.replace(loaded, description=dataclasses.replace(
        loaded.description, detection={"ml": ml, "chosen_on": "test"}))
    assert Predictor([at(0.5)], torch.device("cpu")).detection == Threshold(0.5, "test")
    assert Predictor([at(0.5), at(2.0), at(0.1)], torch.device("cpu")).detection.ml == 0.5
    old = dataclasses.replace(loaded, description=dataclasses.replace(loaded.description, detection={}))
    assert Predictor([old], torch.device("cpu")).detection == Threshold()  # a model from before: any component
    damaged = dataclasses.replace(loaded, description=dataclasses.replace(loaded.description, detection={"mm": 1}))
    with pytest.raises(ModelError, match="detection threshold is damaged"):
        Predictor([damaged], torch.device("cpu"))


def test_a_bad_case_is_skipped_with_the_reason_and_the_batch_finishes(trained):
    bucket = trained["bucket"]
    data = f"s3://{bucket}/mixed/"
    write_dataset(2, data, NEW)
    write_dataset(1, data, SynthSpec(shape=(64, 128, 128), sequences=("t1c", "flair"), seed=9), first=2)  # large
    write_dataset(1, data, NEW, first=3)
    for info in list(s3.list_objects(bucket, "mixed/case_0003/flair/")):
        s3.delete(f"s3://{bucket}/{info.key}")
    output = f"s3://{bucket}/mixed-pred/"
    assert predict.main(["--model", trained["run"], "--data-uri", data, "--output-uri", output,
                         "--memory-budget-mb", "64"]) == 1
    rows = {row["case_id"]: row for row in _rows(output + "predictions.csv")}
    assert rows["case_0000"]["status"] == rows["case_0001"]["status"] == "predicted"
    assert rows["case_0002"]["status"] == "skipped" and "--memory-budget-mb 64" in rows["case_0002"]["reason"]
    assert rows["case_0003"]["status"] == "excluded" and "missing sequence(s) flair" in rows["case_0003"]["reason"]
    assert s3.read_uri(output + "case_0002/volumes.csv") is None and s3.read_uri(output + "case_0002/segmentation.dcm") is None
    assert json.loads(s3.read_uri(output + "complete.json")) | {"finished": 0} == {
        "cases": 4, "predicted": 2, "skipped": 1, "excluded": 1, "shards": 1, "finished": 0}


def test_shards_split_the_cases_and_the_last_one_marks_the_output_complete(trained):
    output = f"s3://{trained['bucket']}/sharded/"
    common = ["--model", trained["run"], "--data-uri", trained["data"], "--output-uri", output]
    assert predict.main([*common, "--shard", "1/2"]) == 0
    assert s3.read_uri(output + "shards/1-of-2.csv") is not None
    assert s3.read_uri(output + "complete.json") is None  # shard 0 has not run: not complete
    assert [row["case_id"] for row in _rows(output + "shards/1-of-2.csv")] == ["case_0001"]
    assert predict.main([*common, "--shard", "0/2"]) == 0
    assert [row["case_id"] for row in _rows(output + "predictions.csv")] == ["case_0000", "case_0001", "case_0002"]
    assert json.loads(s3.read_uri(output + "complete.json"))["predicted"] == 3


def test_the_hosting_handler_round_trips_a_case_by_bytes_and_by_location(trained):
    code = trained["model_dir"] / "code"
    assert (code / "inference.py").read_bytes() == (ROOT / "entry_point" / "inference.py").read_bytes()
    assert (code / "brainseg" / "prediction" / "job.py").is_file() and (code / "requirements.txt").is_file()
    predictor = inference.model_fn(str(trained["model_dir"]))
    files = {path.split("/", 1)[1]: data for path, data in encode_case(1, NEW).items()
             if path.split("/")[1] in ("t1c", "flair")}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    result = inference.predict_fn(inference.input_fn(buffer.getvalue(), "application/zip"), predictor)
    body, content_type = inference.output_fn(result, "application/dicom")
    assert content_type == "application/dicom"
    seg = hd.seg.segread(io.BytesIO(body))
    assert [segment.SegmentLabel for segment in seg.SegmentSequence] == ["wt", "tc", "et"]
    volumes, kind = inference.output_fn(result, "application/json")
    assert kind == "application/json" and set(json.loads(volumes)) >= {"predicted_ml_wt", "voxels_et"}

    by_location = inference.predict_fn(inference.input_fn(
        json.dumps({"case_uri": f"{trained['data']}case_0001/"}), "application/json"), predictor)
    assert by_location["volumes"] == result["volumes"]  # the same case, the same prediction
    with pytest.raises(inference.RequestError, match="expected application/json"):
        inference.input_fn(b"x", "text/plain")
    with pytest.raises(inference.RequestError, match="cannot be read"):
        inference.input_fn(b"not a zip", "application/zip")


def test_models_are_self_describing_and_anything_else_is_refused_with_the_reason(trained, tmp_path):
    description, state, source = read_artifact(trained["run"])
    assert description.sequences == ("t1c", "flair") and description.regions == "brats"
    assert description.target_spacing and description.network["in_channels"] == 2 and source.endswith("model/model.pt")
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)
    with pytest.raises(ModelError, match="bare state dict"):
        read_artifact(str(bare))
    hostile = tmp_path / "hostile.pt"
    torch.save({"state_dict": state, "description": ModelError("x")}, hostile)
    with pytest.raises(ModelError, match="weights_only=True"):
        read_artifact(str(hostile))
    newer = tmp_path / "newer.pt"
    data = description.to_dict() | {"version": 99}
    torch.save({"description": data, "state_dict": state}, newer)
    with pytest.raises(ModelError, match="version 99"):
        read_artifact(str(newer))
    with pytest.raises(ModelError, match="no such object"):
        read_artifact(f"s3://{trained['bucket']}/runs/missing/")
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(ModelError, match="no top-level model.pt"):
        read_artifact(str(empty))
    assert ModelDescription.from_dict(description.to_dict(), "x") == description
    assert description.resampling == "separate_z"  # the run's default, recorded for prediction
    older = {key: value for key, value in description.to_dict().items() if key != "resampling"}
    assert ModelDescription.from_dict(older, "x").resampling == "linear"  # how models before the choice trained


@pytest.mark.parametrize("argv, message", [
    (["--data-uri", "s3://b/d/", "--output-uri", "s3://b/d/out/", "--model", "m"], "inside data_uri"),
    (["--data-uri", "s3://b/d/", "--output-uri", "s3://b/o/", "--model", "m", "--shard", "2/2"], "0 <= k < n"),
    (["--data-uri", "s3://b/d/", "--output-uri", "s3://b/o/", "--model", "m", "--mirorr", "true"],
     "did you mean --mirror"),
    (["--data-uri", "s3://b/d/", "--output-uri", "s3://b/o/", "--model", "m", "--sw-overlap", "1.5"], "sw_overlap"),
    (["--data-uri", "s3://b/d/", "--output-uri", "s3://b/o/", "--model", "m", "--output-format", "seg,png"],
     "output_format 'seg,png': png is not one of seg, nifti"),
    (["--data-uri", "s3://b/d/", "--output-uri", "s3://b/o/", "--model", "m", "--postprocessing", "s3://b/cv.json",
      "--postprocess", "false"], "postprocessing s3://b/cv.json with postprocess false"),
])
def test_bad_options_are_refused_naming_the_value(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_options(argv)
    assert predict.main(argv) == 2


def test_review_reads_a_prediction_output_and_places_its_seg_with_the_training_seg_reader(trained, tmp_path, capsys):
    output = f"s3://{trained['bucket']}/reviewed/"
    assert predict.main(["--model", trained["run"], "--data-uri", trained["data"], "--output-uri", output,
                         "--cases", "case_0000,case_0002"]) == 0
    assert review.main([output, "--report", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "complete: 2 predicted" in printed and "case_0002" in printed and "wt ml" in printed
    assert (tmp_path / "predictions.html").is_file() and len(list(tmp_path.glob("seg_*.png"))) == 2

    prediction = load_prediction(output)
    case = next(c for c in build_catalog(trained["data"], require_masks=False, sequences=("t1c", "flair")).cases
                if c.case_id == "case_0002")
    depth, rows, columns = case.image.shape
    channels, _ = read_case_region(case, (0, depth, 0, rows, 0, columns), with_mask=False)
    masks = Predictor([load_model(trained["run"], torch.device("cpu"))], torch.device("cpu")).predict(
        channels, case.summary.intensities, case.image.spacing).masks
    expected = np.max([number * mask for number, mask in enumerate(masks, start=1)], axis=0)
    assert np.array_equal(seg_overlay(prediction, "case_0002")["prediction"], expected)

    s3.delete(output + "complete.json")
    assert "incomplete: no complete.json" in load_prediction(output).status_text()
    assert len(load_prediction(output).rows) == 2  # read from each case's volumes.csv


def test_a_source_series_highdicom_refuses_is_reported_without_its_header_values():
    volume = np.arange(3 * 8 * 8, dtype=np.uint16).reshape(3, 8, 8)
    datasets = writer.slice_datasets(volume, writer.SeriesSpec(patient_name="Secret^Name", patient_id="MRN123"))
    for dataset in datasets:
        del dataset.StudyInstanceUID
    with pytest.raises(HeaderError, match="cannot be referenced by a DICOM SEG") as refused:
        encode_segmentation([writer.encode(d) for d in datasets], tuple((z, 0) for z in range(3)),
                            [np.ones((3, 8, 8), bool)], ["wt"], Algorithm("brainseg unet", "test"))
    assert "Secret" not in str(refused.value) and "MRN123" not in str(refused.value)


def test_studies_as_a_pacs_exports_them_are_predicted_on_their_post_contrast_t1(trained):
    """--layout studies: exams found by their headers, the FLAIR on a grid of its own (an oblique stack),
    the SEG written on the series the rules named t1c."""
    bucket, data, output = trained["bucket"], f"s3://{trained['bucket']}/exams/", f"s3://{trained['bucket']}/pred-exams/"
    spec = SynthSpec(shape=(24, 48, 48), sequences=("t1c", "flair"), grids="own", layout="studies", seed=7)
    write_dataset(2, data, spec)
    assert predict.main(["--model", trained["run"], "--data-uri", data, "--output-uri", output,
                         "--layout", "studies"]) == 0
    rows = _rows(output + "predictions.csv")
    assert len(rows) == 2 and all(row["case_id"].startswith("study-") and row["status"] == "predicted" for row in rows)
    descriptions = {}  # SeriesInstanceUID -> SeriesDescription of every image object of the exams
    for info in s3.list_tree(bucket, "exams/"):
        if not info.key.endswith("DICOMDIR") and "/.brainseg/" not in info.key:
            dataset = pydicom.dcmread(io.BytesIO(s3.get_object(bucket, info.key)), stop_before_pixels=True)
            descriptions[dataset.SeriesInstanceUID] = dataset.SeriesDescription
    for row in rows:
        seg = hd.seg.segread(io.BytesIO(s3.read_uri(f"{output}{row['case_id']}/segmentation.dcm")))
        assert descriptions[seg.ReferencedSeriesSequence[0].SeriesInstanceUID] == "AX T1 MPRAGE +C"


def _seg_frames(seg) -> dict:
    """``{(source SOP instance UID, segment number): (rows, columns) bool}`` of a SEG's frames."""
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    return {(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID,
             int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)): frame.astype(bool)
            for item, frame in zip(seg.PerFrameFunctionalGroupsSequence, pixels)}


def _grid(datasets: list) -> tuple:
    """A series' slices sorted along their normal, and its voxel-to-patient matrix (z, y, x, 1)."""
    first = datasets[0]
    row, column = np.asarray(first.ImageOrientationPatient[:3], float), np.asarray(first.ImageOrientationPatient[3:], float)
    normal = np.cross(row, column)
    ordered = sorted(datasets, key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))))
    positions = [np.asarray(d.ImagePositionPatient, float) for d in ordered]
    step = float(np.dot(normal, positions[1] - positions[0]))
    matrix = np.eye(4)
    matrix[:3, 0], matrix[:3, 3] = normal * step, positions[0]
    matrix[:3, 1], matrix[:3, 2] = column * float(first.PixelSpacing[0]), row * float(first.PixelSpacing[1])
    return ordered, matrix


def test_the_seg_is_drawn_on_the_series_named_on_its_own_voxels(trained):
    """--seg-series flair: the SEG references the exam's FLAIR (its own oblique grid) and holds, at each
    FLAIR voxel, what the SEG on the post-contrast T1 holds at the nearest T1 voxel (pydicom's geometry)."""
    bucket = trained["bucket"]
    data = f"s3://{bucket}/exam-seg-series/"
    write_dataset(1, data, SynthSpec(shape=(24, 48, 48), sequences=("t1c", "flair"), grids="own", layout="studies",
                                     seed=8))
    segs = {}
    for name in ("t1c", "flair"):
        output = f"s3://{bucket}/pred-seg-{name}/"
        assert predict.main(["--model", trained["run"], "--data-uri", data, "--output-uri", output, "--layout",
                             "studies", "--postprocess", "false", *(["--seg-series", name] if name == "flair" else [])]) == 0
        [row] = _rows(output + "predictions.csv")
        segs[name] = hd.seg.segread(io.BytesIO(s3.read_uri(f"{output}{row['case_id']}/segmentation.dcm")))
    by_series: dict = {}
    for info in s3.list_tree(bucket, "exam-seg-series/"):
        if not info.key.endswith("DICOMDIR") and "/.brainseg/" not in info.key:
            dataset = pydicom.dcmread(io.BytesIO(s3.get_object(bucket, info.key)), stop_before_pixels=True)
            by_series.setdefault(dataset.SeriesInstanceUID, []).append(dataset)
    series = {name: by_series[seg.ReferencedSeriesSequence[0].SeriesInstanceUID] for name, seg in segs.items()}
    assert series["t1c"][0].SeriesDescription.endswith("T1 MPRAGE +C")
    assert series["flair"][0].SeriesDescription.endswith("T2 FLAIR")
    (t1c, t1c_matrix), (flair, flair_matrix) = _grid(series["t1c"]), _grid(series["flair"])
    frames = {name: _seg_frames(seg) for name, seg in segs.items()}
    assert {uid for uid, _ in frames["flair"]} <= {d.SOPInstanceUID for d in flair}
    flair_to_t1c = np.linalg.inv(t1c_matrix) @ flair_matrix
    shape = (len(t1c), int(t1c[0].Rows), int(t1c[0].Columns))
    compared = agreed = 0
    for segment in range(1, len(segs["flair"].SegmentSequence) + 1):
        for z, dataset in enumerate(flair):
            drawn = frames["flair"].get((dataset.SOPInstanceUID, segment), np.zeros((dataset.Rows, dataset.Columns), bool))
            y, x = np.mgrid[0:dataset.Rows, 0:dataset.Columns]
            points = np.stack([np.full(y.size, z), y.ravel(), x.ravel(), np.ones(y.size)]) .astype(float)
            where = (flair_to_t1c @ points)[:3].T
            clear = (np.abs(where - np.round(where)) < 0.45).all(axis=1)  # not within 0.05 voxel of a tie
            nearest = np.round(where).astype(int)
            inside = ((nearest >= 0) & (nearest < np.asarray(shape))).all(axis=1)
            expected = np.zeros(y.size, bool)
            for index in np.flatnonzero(inside):
                k, j, i = nearest[index]
                frame = frames["t1c"].get((t1c[k].SOPInstanceUID, segment))
                expected[index] = frame is not None and frame[j, i]
            compared += int(clear.sum())
            agreed += int((drawn.ravel() == expected)[clear].sum())
    assert compared > 0.5 * sum(d.Rows * d.Columns for d in flair) * len(segs["flair"].SegmentSequence)
    assert agreed == compared
    assert any(frame.any() for frame in frames["flair"].values())
    assert sum(int(frame.sum()) for frame in frames["flair"].values()) < compared  # not every voxel set


def test_a_seg_series_the_model_does_not_read_is_refused(trained, capsys):
    assert predict.main(["--model", trained["run"], "--data-uri", trained["data"], "--output-uri",
                         f"s3://{trained['bucket']}/pred-t2/", "--seg-series", "t2"]) != 0
    assert "--seg-series 't2': the model reads t1c, flair; name one of them" in capsys.readouterr().out
