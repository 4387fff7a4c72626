"""The training entry script end to end against the moto S3 server: artifacts, learning, exact
resume after a real kill, SIGTERM, transfer from an autoencoder, and bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from brainseg.commands import train
from brainseg.data.catalog import build_catalog
from brainseg.data.splits import assign_folds
from brainseg.io import s3
from brainseg.model.artifact import load_model
from brainseg.model.networks import NetworkSpec, build_model, is_encoder_parameter
from brainseg.postprocess import Offer, choose_pooled
from infra.data.synth import SynthSpec, write_dataset
from tests.conftest import synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--channels", "8,16,32", "--patch-size", "32,32,32", "--batch-size", "2", "--num-workers", "0",
         "--warmup-steps", "5", "--lr", "3e-3", "--foreground-fraction", "0.5", "--memory-budget-mb", "64",
         "--res-units", "1", "--log-every", "1000"]
METRIC_LINE = re.compile(r"epoch_metrics epoch=(\d+) step=\d+ train_loss=([0-9.]+) val_dice=([0-9.]+) "
                         r"val_iou=([0-9.]+)")


@pytest.fixture(scope="module")
def dataset() -> str:
    """10 synthetic cases of 32x64x64 (5 train, 2 val, 3 test)."""
    return synthetic_dataset("train-data", 10)


def _args(dataset: str, output: str, run: str, *extra: str) -> list[str]:
    return ["--data-uri", dataset, "--output-uri", output, "--run-name", run, *SMALL, *extra]


def _read_json(uri: str):
    return json.loads(s3.read_uri(uri))


def _checkpoint(output: str, run: str) -> dict:
    pointer = _read_json(f"{output}/{run}/checkpoints/latest.json")
    data = s3.read_uri(f"{output}/{run}/checkpoints/{pointer['checkpoint']}")
    return torch.load(io.BytesIO(data), weights_only=True)


def _subprocess_env(tmp_path: Path) -> dict:
    env = dict(os.environ, SM_MODEL_DIR=str(tmp_path / "model"))
    env.pop("SM_CHECKPOINT_DIR", None)
    return env


def test_a_run_learns_and_writes_well_formed_artifacts(dataset, bucket, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("SM_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    output = f"s3://{bucket}/runs"
    assert train.main(_args(dataset, output, "e2e", "--epochs", "3", "--steps-per-epoch", "30")) == 0
    run = f"{output}/e2e"
    bucket_name, prefix = s3.parse_uri(run + "/")
    keys = sorted(info.key[len(prefix):] for info in s3.list_objects(bucket_name, prefix))
    predictions = [key for key in keys if key.startswith("predictions/")]
    keys = [key for key in keys if key not in predictions]
    checkpoints = [f"checkpoints/step-000000{step}.{ext}" for step in (30, 60, 90) for ext in ("json", "pt")]
    assert keys == ["checkpoints/latest.json", *checkpoints, "metrics/metrics.jsonl", "metrics/test_per_case.csv",
                    "metrics/validation_lesions.json", "model/model.json", "model/model.pt", "owner.json", "run.json",
                    "summary.json"]
    assert _read_json(f"{output}/e2e/owner.json")["released"] is True

    lines = [json.loads(line) for line in s3.read_uri(f"{run}/metrics/metrics.jsonl").splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3] and [line["step"] for line in lines] == [30, 60, 90]
    for line in lines:
        for name in ("lr", "train_loss", "val_dice", "val_iou", "patches_per_s", "data_wait_fraction", "seconds"):
            assert isinstance(line[name], float), name
        assert 0 <= line["data_wait_fraction"] <= 1 and line["patches_per_s"] > 0

    rows = list(csv.DictReader(io.StringIO(s3.read_uri(f"{run}/metrics/test_per_case.csv").decode())))
    assert predictions == [f"predictions/{row['case_id']}.npz" for row in rows]
    crop = np.load(io.BytesIO(s3.read_uri(f"{run}/{predictions[0]}")))
    assert crop["image"].dtype == np.float16 and crop["image"].shape[1:] == crop["mask"].shape == crop["prediction"].shape
    assert all(a <= b for a, b in zip(crop["mask"].shape, (32, 64, 64))) and crop["mask"].any()
    assert len(s3.read_uri(f"{run}/{predictions[0]}")) < 300_000
    assert [row["case_id"] for row in rows] == sorted(row["case_id"] for row in rows) and len(rows) == 3
    assert all(row["case_id"].startswith("case_") and 0 <= float(row["dice"]) <= 1 for row in rows)

    summary = _read_json(f"{run}/summary.json")
    assert summary["test_dice_mean"] > 0.3, summary  # chance (all tumour) is ~0.02 here
    assert summary["best_epoch"] in (1, 2, 3) and summary["best_val_dice"] == max(line["val_dice"] for line in lines)
    assert summary["hyperparameters"]["patch_size"] == [32, 32, 32] and len(summary["dataset_fingerprint"]) == 16
    assert re.fullmatch(r"[0-9a-f]{12}", summary["code_version"]) and summary["test_cases"] == 3
    lesions = summary["lesion_wise"]["tumour"]  # BraTS's lesion-wise figures, beside the voxel ones
    assert 0 <= lesions["dice"] <= 1 and lesions["hd95"] >= 0 and lesions["lesions"] >= 3
    assert lesions["false_positives"] >= 0 and summary["test_lesion_dice"] == lesions["dice"]
    assert lesions["lesions"] == sum(int(row["lesions_tumour"]) for row in rows)
    assert lesions["dice"] == pytest.approx(np.mean([float(row["lesion_dice_tumour"]) for row in rows]), abs=1e-5)
    assert all("val_lesion_dice" in line and "val_lesion_hd95" in line for line in lines)
    assert _read_json(f"{run}/run.json")["status"] == "finished"
    assert summary["fold"] is None and summary["folds"] is None
    assert sorted(summary["splits"].values()) == ["test"] * 3 + ["train"] * 5 + ["val"] * 2
    assert sorted(row["case_id"] for row in rows) == sorted(k for k, v in summary["splits"].items() if v == "test")
    chosen = summary["postprocessing"]["tumour"]  # chosen on validation, stored with the model
    assert chosen["val_lesion_dice_after"] >= chosen["val_lesion_dice_before"] and chosen["cases"] == 2
    assert (chosen["description"] == "none") == (chosen["val_lesion_dice_after"] == chosen["val_lesion_dice_before"])
    record = _read_json(f"{run}/metrics/validation_lesions.json")  # what a cross-validation pools
    assert sorted(record["cases"]) == sorted(case for case, split in summary["splits"].items() if split == "val")
    assert choose_pooled([record])["tumour"].to_dict() == chosen  # the record alone gives the run's choice
    offered = Offer.from_dict(record["offers"]["tumour"])
    assert [trial["description"] for trial in chosen["tried"]] == [rule.describe() for rule in offered.rules]
    assert chosen["not_offered"] == dict(offered.withheld)

    saved = torch.load(io.BytesIO(s3.read_uri(f"{run}/model/model.pt")), weights_only=True)
    model = build_model(NetworkSpec(channels=(8, 16, 32), res_units=1))
    model.load_state_dict(saved["state_dict"])
    description = saved["description"]
    assert description["network"]["channels"] == [8, 16, 32] and description["sequences"] == ["image"]
    assert description["best_epoch"] == summary["best_epoch"] and description["run_name"] == "e2e"
    # The model keeps the last epoch's weights (--keep-weights last, the default): the final checkpoint's.
    assert summary["keep_weights"] == "last" and summary["kept_epoch"] == description["kept_epoch"] == 3
    final = _checkpoint(output, "e2e")["model"]
    assert final.keys() == saved["state_dict"].keys()
    assert all(torch.equal(final[name], saved["state_dict"][name]) for name in final)
    assert description["patch_size"] == [32, 32, 32] and description["labels"] == "tumour=*"
    assert description["postprocessing"] == ({} if chosen["description"] == "none" else {"tumour": chosen["rule"]})
    assert _read_json(f"{run}/model/model.json") == description
    assert {p.name for p in (tmp_path / "model").iterdir()} == {"model.pt", "model.json", "hyperparameters.json",
                                                                 "code"}
    assert (tmp_path / "model" / "code" / "inference.py").is_file()
    assert (tmp_path / "model" / "code" / "brainseg" / "prediction" / "predictor.py").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "e2e").iterdir()) == [
        "latest.json", *(name.removeprefix("checkpoints/") for name in checkpoints)]

    logged = [METRIC_LINE.search(line) for line in capsys.readouterr().out.splitlines()]
    epochs = [m for m in logged if m]
    assert [int(m.group(1)) for m in epochs] == [1, 2, 3]
    assert float(epochs[-1].group(3)) == pytest.approx(lines[-1]["val_dice"], abs=1e-4)
    out = s3.read_uri(f"{run}/metrics/test_per_case.csv").decode() + json.dumps(summary)
    assert "SYN" not in out and "Synthetic^" not in out  # no patient IDs or names in artifacts


def test_a_cross_validation_fold_validates_on_its_fold_and_keeps_the_test_cases(dataset, bucket, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "model"))
    output = f"s3://{bucket}/runs"
    assert train.main(_args(dataset, output, "fold1", "--epochs", "1", "--steps-per-epoch", "2", "--folds", "3",
                            "--fold", "1")) == 0
    summary = _read_json(f"{output}/fold1/summary.json")
    catalog = build_catalog(dataset)
    pool = {case.case_id: case.patient_group for case in catalog.cases if case.split != "test"}
    folds = assign_folds(pool, 3, seed=0)
    assert (summary["fold"], summary["folds"]) == (1, 3)
    assert summary["splits"] == {**{case.case_id: "test" for case in catalog.split("test")},
                                 **{case_id: "val" if fold == 1 else "train" for case_id, fold in folds.items()}}
    assert sorted(folds.values()).count(1) == 2 and _checkpoint(output, "fold1")["splits"]["val"] == sorted(
        case_id for case_id, fold in folds.items() if fold == 1)


def test_a_deep_supervised_dynunet_trains_and_its_model_predicts_with_the_main_head(dataset, bucket, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "model"))
    output = f"s3://{bucket}/runs"
    assert train.main(_args(dataset, output, "ds", "--model", "dynunet", "--deep-supervision", "true", "--epochs", "1",
                            "--steps-per-epoch", "3")) == 0
    lines = [json.loads(line) for line in s3.read_uri(f"{output}/ds/metrics/metrics.jsonl").splitlines()]
    assert np.isfinite(lines[0]["train_loss"]) and 0 <= lines[0]["val_dice"] <= 1
    loaded = load_model(f"{output}/ds/", torch.device("cpu"))
    assert loaded.description.network["deep_supervision"] == 1  # 3 levels: one coarser head
    assert loaded.network(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)  # the main head alone


def test_streamed_and_in_memory_training_are_the_same_computation(dataset, bucket):
    output = f"s3://{bucket}/runs"
    for source in ("stream", "memory"):
        assert train.main(_args(dataset, output, source, "--epochs", "1", "--steps-per-epoch", "6",
                                "--data-source", source, "--max-val-cases", "1")) == 0
    streamed, in_memory = _checkpoint(output, "stream")["model"], _checkpoint(output, "memory")["model"]
    assert all(torch.equal(streamed[name], in_memory[name]) for name in streamed)


def _wait_for_step(uri: str, step: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = s3.read_uri(uri)
        if data is not None and json.loads(data)["step"] >= step:
            return
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {step} within {timeout} s")


@pytest.mark.slow  # subprocesses killed and started again: the slow tier
def test_a_killed_run_resumes_bit_identical(dataset, bucket, tmp_path):
    """SIGKILL mid-epoch, run the same command again: the final weights equal an uninterrupted run's."""
    output = f"s3://{bucket}/runs"
    common = ["--epochs", "2", "--steps-per-epoch", "10", "--checkpoint-steps", "2", "--dropout", "0.1",
              "--num-workers", "2", "--deterministic", "true", "--max-val-cases", "1", "--keep-weights", "best"]
    env = _subprocess_env(tmp_path)
    command = [sys.executable, str(ROOT / "entry_point" / "train.py")]
    whole = subprocess.run(command + _args(dataset, output, "whole", *common), env=env, capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stdout + whole.stderr

    victim = subprocess.Popen(command + _args(dataset, output, "killed", *common), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(f"{output}/killed/checkpoints/latest.json", 4, victim)
    time.sleep(0.3)  # into the steps after the checkpoint
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    # the newest checkpoint with a record: a kill between the record and latest.json leaves the pointer one behind
    bucket_name, prefix = s3.parse_uri(f"{output}/killed/checkpoints/")
    killed_at = max(int(match.group(1)) for info in s3.list_objects(bucket_name, prefix)
                    if (match := re.search(r"step-(\d{8})\.json$", info.key)))
    assert killed_at < 20, "the run finished before it was killed"
    resumed = subprocess.run(command + _args(dataset, output, "killed", *common), env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from step-{killed_at:08d}.pt" in resumed.stdout, [
        line for line in resumed.stdout.splitlines() if re.search("resum|new run|checkpoint|owner|taken", line)]

    first, second = _checkpoint(output, "whole"), _checkpoint(output, "killed")
    assert first["state"]["step"] == second["state"]["step"] == 20
    for part in ("model", "best_model"):
        assert all(torch.equal(first[part][name], second[part][name]) for name in first[part]), part
    assert first["state"]["history"][-1]["train_loss"] == second["state"]["history"][-1]["train_loss"]
    assert first["state"]["kept_epoch"] == first["state"]["best_epoch"] == second["state"]["kept_epoch"]


@pytest.mark.slow  # subprocesses killed and started again: the slow tier
def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(dataset, bucket, tmp_path):
    output = f"s3://{bucket}/runs"
    args = _args(dataset, output, "spot", "--epochs", "2", "--steps-per-epoch", "40", "--max-val-cases", "1")
    command = [sys.executable, str(ROOT / "entry_point" / "train.py"), *args]
    process = subprocess.Popen(command, env=_subprocess_env(tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while s3.read_uri(f"{output}/spot/run.json") is None:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 4, out
    assert _read_json(f"{output}/spot/run.json")["status"] == "interrupted"
    stopped = _read_json(f"{output}/spot/checkpoints/latest.json")["step"]
    assert 0 < stopped < 80 and f"stopped by SIGTERM at step {stopped}" in out
    again = subprocess.run(command, env=_subprocess_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"step {stopped}" in again.stdout
    assert _read_json(f"{output}/spot/run.json")["status"] == "finished"


def test_autoencoder_pretraining_then_frozen_encoder_transfer(dataset, bucket):
    unlabelled = f"s3://{bucket}/unlabelled/"
    source_bucket, source_prefix = s3.parse_uri(dataset)
    for info in s3.list_objects(source_bucket, source_prefix):
        if "/image/" in info.key:
            s3.client().copy_object(Bucket=bucket, Key="unlabelled/" + info.key[len(source_prefix):],
                                      CopySource={"Bucket": source_bucket, "Key": info.key})
    output = f"s3://{bucket}/runs"
    assert train.main(_args(unlabelled, output, "pretrain", "--task", "autoencoder", "--epochs", "1",
                            "--steps-per-epoch", "4", "--max-val-cases", "1")) == 0
    summary = _read_json(f"{output}/pretrain/summary.json")
    assert summary["test_loss"] > 0 and summary["best_val_loss"] > 0
    encoder_uri = f"{output}/pretrain/model/encoder.pt"
    encoder = torch.load(io.BytesIO(s3.read_uri(encoder_uri)), weights_only=True)["encoder"]

    assert train.main(_args(dataset, output, "transfer", "--init-weights", encoder_uri, "--freeze-encoder", "true",
                            "--max-train-cases", "2", "--epochs", "1", "--steps-per-epoch", "4",
                            "--max-val-cases", "1")) == 0
    trained = _checkpoint(output, "transfer")["model"]
    assert encoder and all(torch.equal(trained[name], tensor) for name, tensor in encoder.items())
    assert all(is_encoder_parameter("unet", name) for name in encoder)


def test_resuming_with_other_hyperparameters_is_refused(dataset, bucket, capsys):
    output = f"s3://{bucket}/runs"
    args = _args(dataset, output, "fixed", "--epochs", "1", "--steps-per-epoch", "2", "--max-val-cases", "1")
    assert train.main(args) == 0
    finished = s3.read_uri(f"{output}/fixed/run.json")
    capsys.readouterr()
    assert train.main(args + ["--lr", "0.1", "--epochs", "2"]) == 2
    out = capsys.readouterr().out
    assert "from different hyperparameters (lr: 0.003 -> 0.1)" in out and "another --run-name" in out
    assert s3.read_uri(f"{output}/fixed/run.json") == finished  # the refused job wrote nothing into the run
    assert _read_json(f"{output}/fixed/run.json")["status"] == "finished"


def test_resuming_on_a_changed_dataset_is_refused_unless_allowed(bucket, capsys):
    data = synthetic_dataset("changing-data", 8)
    output = f"s3://{bucket}/runs"
    args = _args(data, output, "growing", "--epochs", "1", "--steps-per-epoch", "2", "--max-val-cases", "1")
    assert train.main(args) == 0
    write_dataset(1, data, SynthSpec(shape=(32, 64, 64)), first=8)
    added = sorted(s3.list_folders(*s3.parse_uri(data))[0])[-1].rstrip("/").rsplit("/", 1)[-1]
    capsys.readouterr()
    assert train.main(args + ["--epochs", "2"]) == 2
    out = capsys.readouterr().out
    assert re.search(r"the dataset under \S+ changed since checkpoint step-00000002\.pt \(fingerprint \w+ -> \w+: "
                     rf".*\b{added}\b", out), out
    assert "--allow-dataset-change true" in out
    assert _checkpoint(output, "growing")["state"]["epoch"] == 1
    assert train.main(args + ["--epochs", "2", "--allow-dataset-change", "true"]) == 0
    assert "continuing on the new data" in capsys.readouterr().out
    assert _checkpoint(output, "growing")["state"]["epoch"] == 2


def test_the_code_version_is_what_was_loaded_when_first_asked(tmp_path, monkeypatch):
    import brainseg.run.state as training

    source = tmp_path / "module.py"
    source.write_text("VALUE = 1\n")
    monkeypatch.setattr(training, "CODE_ROOT", tmp_path)
    training.code_version.cache_clear()
    first = training.code_version()
    source.write_text("VALUE = 2\n")
    assert training.code_version() == first
    training.code_version.cache_clear()
    assert training.code_version() != first
    monkeypatch.undo()
    training.code_version.cache_clear()


@pytest.mark.parametrize("extra, code, message", [
    (["--model", "vnet"], 2, "model 'vnet': expected one of unet"),
    (["--patch-size", "64,128,128"], 2, r"patch_size \(64, 128, 128\) is larger than every training volume"),
    (["--patch-size", "32,30,32"], 2, "every size must be a multiple of 4"),
])
def test_bad_configuration_stops_before_training(dataset, bucket, capsys, extra, code, message):
    output = f"s3://{bucket}/runs"
    assert train.main(_args(dataset, output, "bad", *extra)) == code
    captured = capsys.readouterr()
    assert re.search(message, captured.out + captured.err)  # flag errors on stderr, the job's on its log
    assert s3.read_uri(f"{output}/bad/checkpoints/latest.json") is None


def test_missing_bucket_is_named(bucket, capsys):
    assert train.main(_args("s3://no-such-bucket-here/ds/", f"s3://{bucket}/runs", "r")) == 3
    assert ("bucket 'no-such-bucket-here' of s3://no-such-bucket-here/ds/ is not usable: it does not exist"
            in capsys.readouterr().out)


def test_no_usable_cases_says_how_to_find_out_why(bucket, capsys):
    s3.put_bytes(f"s3://{bucket}/empty/case_0001/image/IM_0001.dcm", b"not dicom")
    assert train.main(_args(f"s3://{bucket}/empty/", f"s3://{bucket}/runs", "r")) == 2
    out = capsys.readouterr().out
    assert "no usable training cases" in out and "brainseg-inspect" in out
    status = _read_json(f"s3://{bucket}/runs/r/run.json")
    assert status["status"] == "failed" and "no usable training cases" in status["error"]


def test_a_damaged_newest_checkpoint_resumes_from_the_older_one_through_dropped_connections(
        dataset, bucket, faults, capsys):
    output = f"s3://{bucket}/runs"
    args = _args(dataset, output, "damaged", "--steps-per-epoch", "4", "--checkpoint-steps", "2",
                 "--max-val-cases", "1")
    assert train.main(args + ["--epochs", "1"]) == 0
    s3.put_bytes(f"{output}/damaged/checkpoints/step-00000004.pt", b"torn upload")
    capsys.readouterr()
    faults.set({"fault": "cut", "method": "GET", "key": "/damaged/checkpoints/", "times": 3})
    assert train.main(args + ["--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "resuming from s3 step-00000002.pt (step 2), passing over what cannot be used: s3 step-00000004.pt " \
           "does not match its record" in out
    assert "resumed from step-00000002.pt (s3) at epoch 0, step 2" in out and faults.injected() == 3
    assert _read_json(f"{output}/damaged/summary.json")["steps"] == 8


class _RunsCode:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_init_weights_that_would_run_code_are_refused(dataset, bucket, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    weights = tmp_path / "weights.pt"
    torch.save({"model": {"layer.weight": torch.zeros(1)}, "payload": _RunsCode(str(marker))}, weights)
    code = train.main(_args(dataset, f"s3://{bucket}/runs", "hostile", "--init-weights", str(weights)))
    assert code == 2 and not marker.exists()
    assert "is refused: it holds objects other than tensors and plain values (the first: getattr)" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--warmup", "5"], r"unknown flag --warmup; did you mean --warmup-steps\?"),
    (["--memory-budget-mb", "16", "--num-workers", "2", "--patch-size", "64,64,64"],
     r"--memory-budget-mb 16 gives each of 2 DataLoader worker\(s\) 8 MiB, but one slab needs"),
])
def test_bad_flags_stop_before_anything_is_read(bucket, capsys, extra, message):
    s3.reset_stats()
    assert train.main(_args("s3://no-bucket-needed/ds/", f"s3://{bucket}/runs", "r", *extra)) == 2
    captured = capsys.readouterr()
    assert re.search(message, captured.err) and captured.err.count("\n") == 1 and s3.stats()["get_requests"] == 0


def test_a_run_folder_holding_the_data_is_refused(bucket, capsys):
    s3.reset_stats()
    assert train.main(_args(f"s3://{bucket}/r1/ds/", f"s3://{bucket}", "r1")) == 2
    assert f"data_uri s3://{bucket}/r1/ds/ is inside the run folder s3://{bucket}/r1/" in capsys.readouterr().out
    assert s3.stats()["get_requests"] == 0


def test_the_exact_memory_budget_is_checked_before_the_model_is_built(dataset, bucket, capsys):
    args = _args(dataset, f"s3://{bucket}/runs", "budget", "--memory-budget-mb", "16", "--num-workers", "12",
                 "--patch-size", "32,64,16", "--slab-margin", "0,0", "--patches-per-slab", "1")
    assert train.main(args) == 2  # the volumes are 64 wide: a slab is 4 times the smallest one
    assert re.search(r"--memory-budget-mb 16 gives each of 12 DataLoader worker\(s\) 1 MiB, but one slab needs 2 "
                     r"MiB; raise --memory-budget-mb to at least 19", capsys.readouterr().out)


def test_a_job_name_that_is_not_a_folder_name_is_refused(dataset, bucket, capsys, monkeypatch):
    monkeypatch.setenv("TRAINING_JOB_NAME", "../../other-bucket")
    code = train.main(["--data-uri", dataset, "--output-uri", f"s3://{bucket}/runs", *SMALL])
    assert code == 2 and "TRAINING_JOB_NAME '../../other-bucket': expected 1-128 letters" in capsys.readouterr().out


def test_too_few_cases_for_the_split_stop_before_training(bucket, capsys):
    uri = synthetic_dataset("three-cases", 3, shape=(16, 32, 32))
    assert train.main(_args(uri, f"s3://{bucket}/runs", "few")) == 2
    assert ("3 usable case(s) cannot fill a 50/20/30 train/val/test split (train 2, val 1, test 0): add cases, or "
            "fix the split in manifest.csv" in capsys.readouterr().out)


def test_a_warm_up_longer_than_the_run_is_a_warning(dataset, bucket, capsys):
    args = _args(dataset, f"s3://{bucket}/runs", "warm", "--epochs", "1", "--steps-per-epoch", "2",
                 "--max-val-cases", "1", "--warmup-steps", "50")
    assert train.main(args) == 0
    assert "warmup_steps 50 is not shorter than the run (2 steps)" in capsys.readouterr().out


FLAKY_NETWORK = [{"fault": fault, "method": method, "probability": 0.04}
                 for method, kinds in (("GET", ("slowdown", "reset", "cut", "short", "short-checksum")),
                                       ("PUT", ("slowdown", "error500", "reset", "lost-reply")))
                 for fault in kinds]


@pytest.mark.slow  # two training runs with DataLoader workers
def test_training_through_a_flaky_network_computes_the_same_weights(dataset, bucket, faults, tmp_path):
    output = f"s3://{bucket}/runs"
    common = ["--epochs", "2", "--steps-per-epoch", "4", "--checkpoint-steps", "2", "--num-workers", "2",
              "--deterministic", "true", "--max-val-cases", "1"]
    assert train.main(_args(dataset, output, "clean", *common)) == 0
    faults.set(*FLAKY_NETWORK)  # its own, empty cache: every block comes through the faults
    assert train.main(_args(dataset, output, "flaky", *common, "--cache-dir", str(tmp_path / "cold"))) == 0
    injected = faults.injected()
    faults.clear()
    clean, flaky = _checkpoint(output, "clean"), _checkpoint(output, "flaky")
    assert injected > 20, injected
    for part in ("model", "best_model"):
        assert all(torch.equal(clean[part][name], flaky[part][name]) for name in clean[part]), part


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine's torch sees a GPU")
def test_a_cpu_image_on_a_gpu_instance_is_warned_about_loudly(bucket, capsys, monkeypatch):
    monkeypatch.setenv("SM_NUM_GPUS", "4")
    assert train.main(_args(f"s3://{bucket}/r1/ds/", f"s3://{bucket}", "r1")) == 2  # stops at once, after the warning
    out = capsys.readouterr().out
    assert re.search(r"WARNING brainseg.train: SM_NUM_GPUS=4 but torch \S+ sees no CUDA device: a CPU image", out)
    assert out.count("!" * 100) == 2
    monkeypatch.setenv("SM_NUM_GPUS", "0")
    assert train.main(_args(f"s3://{bucket}/r1/ds/", f"s3://{bucket}", "r1")) == 2
    assert "sees no CUDA" not in capsys.readouterr().out


def _first_epochs(dataset: str, output: str, **runs: list[str]) -> list[dict]:
    """Each of ``runs`` (its name: its extra flags) trained for 3 steps, deterministically; their
    first epoch lines, in order."""
    for run, extra in runs.items():
        assert train.main(_args(dataset, output, run, "--epochs", "1", "--steps-per-epoch", "3", "--deterministic",
                                "true", "--max-val-cases", "1", *extra)) == 0
    return [json.loads(s3.read_uri(f"{output}/{run}/metrics/metrics.jsonl").splitlines()[0]) for run in runs]


def test_bf16_autocast_on_the_cpu_trains_as_fp32_does_to_its_rounding(dataset, bucket):
    """The GPU's bf16 path (autocast around the forward and the loss, fp32 weights and optimiser)
    run on the CPU, where torch autocasts to bf16 too."""
    output = f"s3://{bucket}/runs"
    full, half = _first_epochs(dataset, output, fp32=[], bf16=["--precision", "bf16"])
    assert half["train_loss"] == pytest.approx(full["train_loss"], rel=0.02)  # bf16 keeps 8 bits of mantissa
    assert half["train_loss"] != full["train_loss"]  # it did run in bf16
    weights = _checkpoint(output, "bf16")["model"]
    assert {tensor.dtype for tensor in weights.values() if tensor.is_floating_point()} == {torch.float32}


def test_fp16_on_the_cpu_is_refused_with_what_to_use(dataset, bucket, capsys):
    """fp16 needs its gradient scaler, which is a GPU's (the CPU has bf16 instead)."""
    assert train.main(_args(dataset, f"s3://{bucket}/runs", "fp16", "--precision", "fp16")) == 2
    assert "precision fp16 needs a GPU; use bf16 or fp32 on CPU" in capsys.readouterr().out


def test_compile_without_a_compiler_is_refused_before_any_read(dataset, bucket, capsys, monkeypatch, tmp_path):
    """The images hold no compiler, and torch.compile needs one (C++ on the CPU, C for Triton on a GPU)."""
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no c++, g++ or clang++ there
    assert train.main(_args(dataset, f"s3://{bucket}/runs", "no-compiler", "--compile", "true")) == 2
    assert ("--compile true needs a C++ compiler ($CXX, or c++, g++, clang++ on PATH) to build torch.compile's "
            "kernels on cpu, and this machine has none") in capsys.readouterr().out
    assert not list(s3.list_objects(bucket, "runs/no-compiler/"))  # nothing written


@pytest.mark.slow  # torch.compile's first forward and backward on the CPU take about 15 s
def test_compile_on_the_cpu_trains_as_eager_does(dataset, bucket):
    output = f"s3://{bucket}/runs"
    eager, compiled = _first_epochs(dataset, output, eager=[], compiled=["--compile", "true"])
    # The same losses (weights may not match: a convolution's bias before a norm has a gradient of
    # rounding noise only, which AdamW turns into full steps of either sign, changing nothing downstream).
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-3)
    assert compiled["val_dice"] == pytest.approx(eager["val_dice"], abs=1e-3)
    assert _checkpoint(output, "compiled")["model"].keys() == _checkpoint(output, "eager")["model"].keys()
