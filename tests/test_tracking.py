"""Experiment tracking (the slow tier): a run logs its parameters, epochs and summary to a real
MLflow tracking server over HTTP (started here), continues the same MLflow run when it resumes, and
trains on when the server cannot be reached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from brainseg.commands import train
from brainseg.io import s3
from brainseg.run.tracking import Tracker
from infra.s3server import free_port
from tests.conftest import synthetic_dataset

pytestmark = pytest.mark.slow  # an MLflow server to start and three short trainings

SMALL = ["--channels", "8,16,32", "--patch-size", "32,32,32", "--batch-size", "2", "--num-workers", "0",
         "--warmup-steps", "2", "--memory-budget-mb", "64", "--res-units", "1", "--log-every", "1000",
         "--epochs", "2", "--steps-per-epoch", "3", "--max-val-cases", "1"]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with a SQLite store: the REST API SageMaker's managed MLflow serves."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{root}/db.sqlite", "--artifacts-destination", str(root / "artifacts"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("the MLflow server did not start")
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def dataset() -> str:
    return synthetic_dataset("track-data", 6)


def test_a_run_logs_parameters_epochs_and_summary_to_mlflow(mlflow_server, dataset, bucket):
    from mlflow.tracking import MlflowClient
    output = f"s3://{bucket}/runs"
    assert train.main(["--data-uri", dataset, "--output-uri", output, "--run-name", "tracked", *SMALL,
                       "--mlflow-tracking-uri", mlflow_server, "--mlflow-experiment", "glioma"]) == 0
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("glioma")
    [run] = client.search_runs([experiment.experiment_id], "tags.`brainseg.run_name` = 'tracked'")
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["epochs"] == "2" and run.data.params["channels"] == "[8, 16, 32]"
    lines = [json.loads(line) for line in s3.read_uri(f"{output}/tracked/metrics/metrics.jsonl").splitlines()]
    history = client.get_metric_history(run.info.run_id, "val_dice")
    assert [(m.step, round(m.value, 6)) for m in history] == [(line["epoch"], round(line["val_dice"], 6))
                                                              for line in lines]
    summary = json.loads(s3.read_uri(f"{output}/tracked/summary.json"))
    assert run.data.metrics["final_test_dice_mean"] == pytest.approx(summary["test_dice_mean"])
    assert run.data.metrics["final_best_val_dice"] == pytest.approx(summary["best_val_dice"])

    import mlflow
    import numpy as np
    import torch

    from brainseg.model.artifact import load_model
    from brainseg.model.inferer import sliding_window
    mlflow.set_tracking_uri(mlflow_server)
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", "glioma-segmentation")  # a registry takes it
    assert version.version == "1"
    logged = mlflow.pyfunc.load_model(f"models:/glioma-segmentation/{version.version}")
    assert logged.metadata.metadata["brainseg"]["run_name"] == "tracked"
    assert logged.metadata.get_input_schema().inputs[0].shape == (-1, 1, -1, -1, -1)
    volume = np.random.default_rng(0).normal(size=(1, 1, 32, 40, 36)).astype(np.float32)
    ours = load_model(f"{output}/tracked/", torch.device("cpu"))  # the run's own model, by brainseg
    logits = sliding_window(ours.network, volume[0], (32, 32, 32), ours.description.sw_overlap, 2, "fp32",
                            torch.device("cpu"))
    expected = torch.softmax(logits, 0)[1:]  # the binary task: softmax classes, background dropped
    np.testing.assert_allclose(logged.predict(volume)[0], expected.numpy(), atol=1e-5)


def test_a_resumed_run_continues_its_mlflow_run(mlflow_server):
    first = Tracker(mlflow_server, "resume")
    first.start("r-resume", {"lr": 0.01})
    first.epoch({"epoch": 1, "val_dice": 0.3})
    first.end("KILLED")
    again = Tracker(mlflow_server, "resume")
    again.start("r-resume", {"lr": 0.01})
    again.epoch({"epoch": 2, "val_dice": 0.4})
    again.end("FINISHED")
    assert again.run_id == first.run_id
    from mlflow.tracking import MlflowClient
    history = MlflowClient(mlflow_server).get_metric_history(first.run_id, "val_dice")
    assert [(m.step, m.value) for m in history] == [(1, 0.3), (2, 0.4)]


def test_an_unreachable_server_costs_a_warning_not_the_run(dataset, bucket, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    output = f"s3://{bucket}/runs"
    assert train.main(["--data-uri", dataset, "--output-uri", output, "--run-name", "untracked", *SMALL,
                       "--mlflow-tracking-uri", f"http://127.0.0.1:{free_port()}"]) == 0
    assert json.loads(s3.read_uri(f"{output}/untracked/summary.json"))["status"] == "finished"
    warnings = [line for line in capsys.readouterr().out.splitlines() if "MLflow" in line]
    assert len(warnings) == 1 and "MLflow start failed" in warnings[0] and "tracking is off" in warnings[0]
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"  # the user's setting wins over ours


def test_a_tracking_uri_must_be_a_server(capsys):
    assert train.main(["--data-uri", "s3://d/x/", "--output-uri", "s3://o/", "--mlflow-tracking-uri",
                       "./mlruns"]) == 2
    assert "mlflow_tracking_uri './mlruns': expected a SageMaker MLflow tracking server ARN" in capsys.readouterr().err
