"""Reviewing runs from S3: listing, comparing, partial runs, the HTML report, and (with Chromium)
that every figure of the report renders in a real headless browser."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from brainseg.commands import train
from brainseg.io import s3
from infra.review import cli as review
from infra.review.report import overlay_figure
from infra.review.runs import MetricsTail, list_runs, load_run
from tests.conftest import synthetic_dataset

TINY = ["--channels", "8,16,32", "--patch-size", "32,32,32", "--res-units", "1", "--epochs", "2",
        "--steps-per-epoch", "3", "--num-workers", "0", "--warmup-steps", "2", "--log-every", "1000"]


@pytest.fixture(scope="module")
def runs() -> str:
    """Two finished runs that differ in lr, one still running (torn metrics line), one failed."""
    dataset = synthetic_dataset("review", 8)
    output = dataset.replace("/ds/", "/runs")
    for name, lr in (("fast", "0.003"), ("slow", "0.001")):
        assert train.main(["--data-uri", dataset, "--output-uri", output, "--run-name", name, "--lr", lr, *TINY]) == 0
    s3.put_bytes(f"{output}/going/run.json", json.dumps(
        {"status": "running", "started": 1.8e9, "hyperparameters": {"lr": 0.01}}).encode())
    s3.put_bytes(f"{output}/going/metrics/metrics.jsonl",
                   b'{"epoch": 1, "step": 3, "train_loss": 1.2, "val_dice": 0.1, "lr": 0.01}\n{"epoch": 2, "st')
    s3.put_bytes(f"{output}/broken/run.json", json.dumps(
        {"status": "failed", "started": 1.7e9, "error": "TrainingError: no usable training cases"}).encode())
    s3.put_bytes(f"{output}/not-a-run/notes.txt", b"ignored")
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
    assert "going: metrics/metrics.jsonl: line 2 is incomplete (still being written?); skipped" in out
    assert "broken: failed: TrainingError: no usable training cases" in out
    assert "broken: metrics/metrics.jsonl: missing" in out
    history = [json.loads(line) for line in s3.read_uri(f"{runs}/fast/metrics/metrics.jsonl").splitlines()]
    gets = sum(line["gets"] for line in history)
    assert re.search(rf"^fast: S3 reads: {gets:,} GETs, request fee \$[0-9.]+; GETs per training patch "
                     rf"{history[0]['gets_per_patch']:.1f} \(epoch 1\) -> {history[1]['gets_per_patch']:.1f} \(epoch 2\); "
                     r"local cache hits \d+% in the last epoch$", out, re.M)
    assert "going: S3 reads" not in out  # its lines hold no reads
    lesions = json.loads(s3.read_uri(f"{runs}/fast/summary.json"))["lesion_wise"]["tumour"]
    assert (f"fast: lesion-wise test: tumour Dice {lesions['dice']:.3f} HD95 {lesions['hd95']:.1f} mm "
            f"({lesions['lesions']} lesions, {lesions['false_positives']} false positives)") in out
    chosen = json.loads(s3.read_uri(f"{runs}/fast/summary.json"))["postprocessing"]["tumour"]
    withheld = "".join(f", not offered: {rule} ({reason})" for rule, reason in chosen["not_offered"].items())
    assert (f"fast: postprocessing (validation lesion-wise Dice): tumour {chosen['description']} "
            f"({chosen['val_lesion_dice_before']:.3f} -> {chosen['val_lesion_dice_after']:.3f}){withheld}") in out
    assert "cross-validation fold" not in out  # no run here is a fold


def test_metrics_are_read_incrementally_as_they_grow(runs):
    uri = f"{runs}/growing/metrics/metrics.jsonl"
    epochs = [json.dumps({"epoch": n, "step": 40 * n, "train_loss": 1 / n, "val_dice": 0.1 * n}) + "\n"
              for n in range(1, 31)]
    tail = MetricsTail(uri)
    assert tail.poll() == [] and tail.problems == ["metrics/metrics.jsonl: missing (no epoch finished yet?)"]
    s3.put_bytes(uri, "".join(epochs[:20]).encode() + epochs[20][:15].encode())
    assert [line["epoch"] for line in tail.poll()] == list(range(1, 21))
    assert tail.problems == ["metrics/metrics.jsonl: line 21 is incomplete (still being written?); skipped"]
    s3.put_bytes(uri, "".join(epochs).encode())
    s3.reset_stats()
    assert [line["epoch"] for line in tail.poll()] == list(range(21, 31)) and not tail.problems
    new_bytes = len("".join(epochs[20:]))
    assert new_bytes < s3.stats()["bytes_received"] <= new_bytes + MetricsTail.OVERLAP  # only the tail
    s3.reset_stats()
    assert tail.poll() == [] and s3.stats()["bytes_received"] <= MetricsTail.OVERLAP
    assert [line["epoch"] for line in tail.lines] == list(range(1, 31)) and tail.rewrites == 0

    # a resumed job rewrites the file from an older checkpoint's history: read again from the start
    resumed = epochs[:12] + [json.dumps({"epoch": 13, "step": 520, "train_loss": 0.5}) + "\n", "not json\n"]
    s3.put_bytes(uri, "".join(resumed).encode())
    assert [line["epoch"] for line in tail.poll()] == list(range(1, 14)) and tail.rewrites == 1
    assert tail.lines[-1]["train_loss"] == 0.5
    assert tail.problems == ["metrics/metrics.jsonl: line 14 is not an epoch record; skipped"]


def test_follow_prints_epochs_as_a_job_writes_them_until_it_finishes(runs, tmp_path, capsys):
    live = f"{runs}/live"
    lines = [json.dumps({"epoch": n, "step": 10 * n, "train_loss": 1.0 / n, "val_dice": 0.2 * n, "lr": 1e-3,
                         "patches_per_s": 9.5, "data_wait_fraction": 0.05}) + "\n" for n in (1, 2, 3)]
    s3.put_bytes(f"{live}/run.json", json.dumps({"status": "running", "started": 1.9e9}).encode())
    s3.put_bytes(f"{live}/metrics/metrics.jsonl", lines[0].encode())

    def job():
        time.sleep(0.5)
        s3.put_bytes(f"{live}/metrics/metrics.jsonl", "".join(lines[:2]).encode())
        time.sleep(0.5)
        s3.put_bytes(f"{live}/metrics/metrics.jsonl", "".join(lines).encode())
        s3.put_bytes(f"{live}/summary.json", json.dumps({"best_val_dice": 0.6, "test_dice_mean": 0.55}).encode())
        s3.put_bytes(f"{live}/metrics/test_per_case.csv", b"case_id,dice,iou\ncase_000,0.55,0.4\n")
        s3.put_bytes(f"{live}/run.json", json.dumps({"status": "finished", "started": 1.9e9}).encode())

    writer = threading.Thread(target=job)
    writer.start()
    try:
        assert review.main([live, "--follow", "--interval", "0.2", "--report", str(tmp_path)]) == 0
    finally:
        writer.join()
    out = capsys.readouterr().out
    printed = [line for line in out.splitlines() if line.startswith("live: epoch")]
    assert printed == ["live: epoch 1  step 10  train loss 1.0000  val Dice 0.2000  lr 1.00e-03  patches/s 9.5  "
                       "data wait 5.0%", *printed[1:]] and [line.split()[2] for line in printed] == ["1", "2", "3"]
    assert "live: finished" in out
    row = next(line for line in out.splitlines() if line.startswith("live "))
    assert " finished " in row and " 0.6000 " in row and row.endswith("0.5500")
    assert (tmp_path / "index.html").exists()


def test_damaged_artifacts_are_reported_and_the_rest_reviewed(runs, tmp_path, capsys):
    damaged = f"{runs}/damaged"
    s3.put_bytes(f"{damaged}/run.json", json.dumps({"status": "finished", "started": 1.6e9,
                                                      "hyperparameters": ["not", "a", "mapping"]}).encode())
    s3.put_bytes(f"{damaged}/summary.json", b'{"best_val_dice": 0.7, "test_dice_mean": ')
    s3.put_bytes(f"{damaged}/metrics/metrics.jsonl", b'{"epoch": 1, "val_dice": 0.7}\n')
    s3.put_bytes(f"{damaged}/metrics/test_per_case.csv",
                   b"case_id,dice,iou\ncase_001,0.31,0.2\ncase_002,,\ncase_003,0.9,0.8\n")
    s3.put_bytes(f"{damaged}/predictions/case_001.npz", b"PK\x03\x04 truncated upload")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, image=np.zeros((4, 4, 4)), mask=np.zeros((4, 4)))
    s3.put_bytes(f"{damaged}/predictions/case_003.npz", buffer.getvalue())
    assert review.main([damaged, "--report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "damaged: summary.json: not valid JSON" in out
    assert "damaged: run.json: hyperparameters should be a JSON object, found list" in out
    assert "damaged: metrics/test_per_case.csv: line 3 has no case_id or no numeric dice; skipped" in out
    assert "damaged: worst test cases: case_001 (Dice 0.310), case_003 (Dice 0.900)" in out
    page = (tmp_path / "index.html").read_text()
    assert "damaged: predictions/case_001.npz: not a readable .npz (BadZipFile" in page
    assert "damaged: predictions/case_003.npz: expected an image (C, D, H, W) or (D, H, W) with a mask and a " \
           "prediction (D, H, W) of the same size" in page
    assert "overlay_damaged" not in page and "curves.png" in page


def test_report_has_curves_tables_and_overlays(runs, tmp_path, capsys):
    assert review.main([f"{runs}/fast", f"{runs}/slow", f"{runs}/broken", "--report", str(tmp_path)]) == 0
    assert f"report: {tmp_path / 'index.html'}" in capsys.readouterr().out
    page = (tmp_path / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert {"curves.png", "learning_rate.png", "throughput.png", "reads.png"} <= set(images)
    assert {f"overlay_{run}_{number}.png" for run in ("fast", "slow") for number in (0, 1)} <= set(images)
    assert {"volumes_fast.png", "volumes_slow.png"} <= set(images)
    for image in images:
        assert matplotlib.image.imread(tmp_path / image).shape[0] > 100  # a real PNG with pixels
    assert "broken: summary.json: missing" not in page  # a failed run has no summary to miss
    assert "no test evaluation" in page
    table = page.split("<h2>fast: test cases, worst first</h2>")[1].split("</table>")[0]
    shown = re.findall(r'<td class="name">(case_\d+)</td><td>([0-9.]+)</td>', table)
    rows = list(csv.DictReader(io.StringIO(s3.read_uri(f"{runs}/fast/metrics/test_per_case.csv").decode())))
    assert [case for case, _ in shown] == [row["case_id"] for row in sorted(rows, key=lambda r: float(r["dice"]))]


def test_a_multi_region_run_shows_each_region_per_case(runs, tmp_path):
    regions = f"{runs}/regions"
    s3.put_bytes(f"{regions}/run.json", json.dumps({"status": "finished", "started": 1.9e9}).encode())
    s3.put_bytes(f"{regions}/metrics/metrics.jsonl", json.dumps({"epoch": 1, "val_dice": 0.5}).encode() + b"\n")
    s3.put_bytes(f"{regions}/summary.json", json.dumps({"best_val_dice": 0.5, "test_dice_mean": 0.45,
                                                        "structures": ["wt", "tc", "et"]}).encode())
    s3.put_bytes(f"{regions}/metrics/test_per_case.csv",
                 b"case_id,dice,iou,dice_wt,hd95_wt,dice_tc,hd95_tc,dice_et,hd95_et\n"
                 b"case_009,0.45,0.3,0.91,2.5,0.33,7.1,0.11,40.2\n")
    assert review.main([regions, "--report", str(tmp_path)]) == 0
    table = (tmp_path / "index.html").read_text().split("<h2>regions: test cases, worst first</h2>")[1]
    assert "<th>Dice wt</th><th>HD95 wt mm</th><th>Dice tc</th>" in table
    assert "<td>0.91</td><td>2.5</td><td>0.33</td><td>7.1</td><td>0.11</td><td>40.2</td>" in table


BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "monai"):
            raise ImportError("the review imported " + name)
sys.meta_path.insert(0, Block())
from infra.review import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _regions_run(folder: Path) -> None:
    """A finished three-region run of four sequences, written as files (what the demo copies out)."""
    (folder / "metrics").mkdir(parents=True)
    (folder / "predictions").mkdir()
    (folder / "run.json").write_text(json.dumps({"status": "finished", "started": 1.9e9,
                                                 "hyperparameters": {"sequences": "t1c,t1,t2,flair"}}))
    lines = [{"epoch": epoch, "train_loss": 1 / epoch, "val_dice": 0.2 * epoch, "val_dice_wt": 0.3 * epoch,
              "val_dice_tc": 0.2 * epoch, "val_dice_et": 0.1 * epoch} for epoch in (1, 2, 3)]
    (folder / "metrics" / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "summary.json").write_text(json.dumps({"best_val_dice": 0.6, "test_dice_mean": 0.5,
                                                     "structures": ["wt", "tc", "et"]}))
    rows = [("case_1", 0.8, 0.9, 0.8, 0.7), ("case_2", 0.5, 0.95, 0.1, 0.45), ("case_3", 0.3, 0.4, 0.3, 0.2)]
    header = "case_id,dice,truth_ml,predicted_ml," + ",".join(
        f"dice_{n},truth_ml_{n},predicted_ml_{n}" for n in ("wt", "tc", "et"))
    (folder / "metrics" / "test_per_case.csv").write_text(header + "\n" + "".join(
        f"{case},{dice},10,9," + ",".join(f"{value},{10 - k},{(10 - k) * value}" for k, value in enumerate(scores)) + "\n"
        for case, dice, *scores in rows))
    rng = np.random.default_rng(0)
    for case, *_ in rows:
        truth = np.zeros((8, 16, 16), np.uint8)
        truth[2:6, 4:12, 4:12] = 1
        truth[3:5, 6:10, 6:10] = 2
        truth[4, 7:9, 7:9] = 3
        np.savez_compressed(folder / "predictions" / f"{case}.npz", image=rng.normal(size=(4, 8, 16, 16)).astype(np.float16),
                            mask=truth, prediction=np.roll(truth, 1, axis=2), spacing=np.ones(3, np.float32))


def test_a_local_run_folder_is_reviewed_without_torch_with_structure_curves_overlays_and_volumes(tmp_path):
    run = tmp_path / "demo-output" / "brainseg-20261203"
    _regions_run(run)
    result = subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(run), "--report", str(tmp_path / "report"),
                             "--no-job-status"], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "brainseg-20261203" in result.stdout and "worst test cases: case_3 (Dice 0.300)" in result.stdout
    page = (tmp_path / "report" / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)" alt="([^"]+)"', page)
    files = [file for file, _ in images]
    assert files[:2] == ["curves.png", "structure_curves.png"] and "volumes_brainseg-20261203.png" in files
    picked = [alt for file, alt in images if file.startswith("overlay_")]
    assert picked == ["worst mean Dice, worst wt Dice, worst et Dice: case case_3", "best mean Dice: case case_1",
                      "worst tc Dice: case case_2"]  # case_3's et (0.2) is worse than case_2's 0.45
    overlay = matplotlib.image.imread(tmp_path / "report" / files[files.index("overlay_brainseg-20261203_0.png")])
    assert overlay.shape[0] > overlay.shape[1]  # four rows of three views: one row per sequence
    for file in files:
        assert matplotlib.image.imread(tmp_path / "report" / file).shape[0] > 100


def test_bad_uris_are_clear(runs, capsys):
    assert review.main(["/no/such/runs"]) == 2
    assert "/no/such/runs: not an s3:// URI and no such local folder" in capsys.readouterr().err
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


@pytest.mark.parametrize("case_id", ["case_$x^{2$", "$\\frac{a}{b}$", "Amélie_€"])
def test_case_names_are_drawn_as_written(tmp_path, case_id):
    crop = {"image": np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float16),
            "mask": np.zeros((8, 16, 16), np.uint8), "prediction": np.ones((8, 16, 16), np.uint8),
            "spacing": np.ones(3, np.float32)}
    crop["mask"][3:5, 6:9, 6:9] = 1
    overlay_figure(crop, f"run: worst test case {case_id} (Dice 0.100)", tmp_path / "overlay.png")
    assert matplotlib.image.imread(tmp_path / "overlay.png").shape[2] == 4
