"""Reviewing runs from S3: listing, comparing, partial runs, the HTML report, and (with Chromium)
that every figure of the report renders in a real headless browser."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess

import matplotlib.image
import pytest

import train
from brainseg import s3io
from infra import review
from infra.runs import list_runs, load_run, read_metrics
from tests.conftest import synthetic_dataset

TINY = ["--channels", "8,16,32", "--patch-size", "32,32,32", "--res-units", "1", "--epochs", "2",
        "--steps-per-epoch", "3", "--num-workers", "0", "--warmup-steps", "2", "--log-every", "1000"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> str:
    """Two finished runs that differ in lr, one still running (torn metrics line), one failed."""
    dataset = synthetic_dataset("review", 8)
    output = dataset.replace("/ds/", "/runs")
    os.environ["SM_MODEL_DIR"] = str(tmp_path_factory.mktemp("model"))
    try:
        for name, lr in (("fast", "0.003"), ("slow", "0.001")):
            assert train.main(["--data-uri", dataset, "--output-uri", output, "--run-name", name, "--lr", lr, *TINY]) == 0
    finally:
        os.environ.pop("SM_MODEL_DIR")
    s3io.put_bytes(f"{output}/going/run.json", json.dumps(
        {"status": "running", "started": 1.8e9, "hyperparameters": {"lr": 0.01}}).encode())
    s3io.put_bytes(f"{output}/going/metrics/metrics.jsonl",
                   b'{"epoch": 1, "step": 3, "train_loss": 1.2, "val_dice": 0.1, "lr": 0.01}\n{"epoch": 2, "st')
    s3io.put_bytes(f"{output}/broken/run.json", json.dumps(
        {"status": "failed", "started": 1.7e9, "error": "TrainingError: no usable training cases"}).encode())
    s3io.put_bytes(f"{output}/not-a-run/notes.txt", b"ignored")
    return output


def test_listing_shows_every_run_with_status_scores_and_differences(runs, capsys):
    assert review.main([runs]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in
            ("fast", "slow", "going", "broken")}
    assert set(rows) == {"fast", "slow", "going", "broken"} and "not-a-run" not in out
    assert " finished " in rows["fast"] and " running " in rows["going"] and " failed " in rows["broken"]
    fast = load_run(f"{runs}/fast")
    assert f"{fast.best_val_dice:.4f}" in rows["fast"] and f"{fast.test_dice:.4f}" in rows["fast"]
    assert re.search(r"^  lr: .*0\.003.*0\.001", out, re.M)
    assert "going: metrics/metrics.jsonl: line 2 is incomplete or malformed; skipped" in out
    assert "broken: failed: TrainingError: no usable training cases" in out
    assert "broken: metrics/metrics.jsonl: missing" in out


def test_a_running_jobs_metrics_are_read_as_they_grow(runs):
    uri = f"{runs}/going/metrics/metrics.jsonl"
    problems = []
    assert [line["epoch"] for line in read_metrics(uri, problems)] == [1] and problems
    s3io.put_bytes(uri, b'{"epoch": 1, "val_dice": 0.1}\n{"epoch": 2, "val_dice": 0.3}\n{"epoch": 3, "val_dice": 0.4}\n')
    problems = []
    assert [line["epoch"] for line in read_metrics(uri, problems)] == [1, 2, 3] and not problems


def test_report_has_curves_tables_and_overlays(runs, tmp_path, capsys):
    assert review.main([f"{runs}/fast", f"{runs}/slow", f"{runs}/broken", "--report", str(tmp_path)]) == 0
    assert f"report: {tmp_path / 'index.html'}" in capsys.readouterr().out
    page = (tmp_path / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert {"curves.png", "learning_rate.png", "throughput.png"} <= set(images)
    assert {f"overlay_{run}_{which}.png" for run in ("fast", "slow") for which in ("worst", "best")} <= set(images)
    for image in images:
        assert matplotlib.image.imread(tmp_path / image).shape[0] > 100  # a real PNG with pixels
    assert "broken: summary.json: missing" not in page  # a failed run has no summary to miss
    assert "no test evaluation" in page
    table = page.split("<h2>fast: test cases, worst first</h2>")[1].split("</table>")[0]
    shown = re.findall(r'<td class="name">(case_\d+)</td><td>([0-9.]+)</td>', table)
    rows = list(csv.DictReader(io.StringIO(s3io.read_uri(f"{runs}/fast/metrics/test_per_case.csv").decode())))
    assert [case for case, _ in shown] == [row["case_id"] for row in sorted(rows, key=lambda r: float(r["dice"]))]


def test_bad_uris_are_clear(runs, capsys):
    assert review.main(["/tmp/runs"]) == 2
    assert "expected an S3 URI" in capsys.readouterr().err
    assert review.main([f"{runs}/not-a-run/"]) == 2
    assert "no runs under" in capsys.readouterr().err
    assert list_runs(f"{runs}/not-a-run/") == []


@pytest.mark.slow
@pytest.mark.browser
def test_every_figure_renders_in_headless_chromium(runs, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); `make test-browser` installs it")
    assert review.main([f"{runs}/fast", f"{runs}/slow", "--report", str(tmp_path)]) == 0
    page = (tmp_path / "index.html").read_text()
    expected = len(re.findall(r"<img ", page))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          "--virtual-time-budget=10000", (tmp_path / "index.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    body = re.search(r'<body data-images="(\d+)" data-images-rendered="(\d+)"', dom)
    assert body, dom[:2000]
    assert int(body.group(1)) == expected >= 7 and int(body.group(2)) == expected
