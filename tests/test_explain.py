"""What a model looks at: sequence importance, occlusion sensitivity and gradient saliency, checked
with a network whose answer rests on one sequence by construction, and as a training run and its
review report them."""

from __future__ import annotations

import dataclasses
import html
import json
import re

import matplotlib.image
import numpy as np
import pytest
import torch

from brainseg.commands import train
from brainseg.config import Hyperparameters
from brainseg.data.catalog import build_catalog
from brainseg.data.resample import NATIVE
from brainseg.io import s3
from brainseg.run.evaluate import evaluate, sequence_importance
from brainseg.tasks import task_of
from infra.data.synth import SynthSpec, write_dataset
from infra.review import cli as review
from infra.review.explain import occlusion_map, saliency_maps
from tests.test_training import SMALL


class BrightOnFirst(torch.nn.Module):
    """Tumour wherever the first sequence is over two standard deviations above its body mean: the
    second sequence plays no part."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        first = image[:, :1]
        return torch.cat([torch.zeros_like(first), 10.0 * (first - 2.0)], dim=1)


def test_a_sequence_the_network_rests_on_matters_and_one_it_ignores_does_not(bucket):
    uri = f"s3://{bucket}/two/"
    write_dataset(4, uri, SynthSpec(shape=(16, 40, 40), sequences=("t1c", "flair")))
    cases = list(build_catalog(uri, sequences=("t1c", "flair")).cases)
    hp = Hyperparameters(sequences="t1c,flair", patch_size=(16, 32, 32), channels=(8, 16), sequence_importance=3)
    task, device = task_of(hp), torch.device("cpu")
    intact = evaluate(BrightOnFirst(), cases, hp, task, device)
    found = sequence_importance(BrightOnFirst(), cases, hp, task, device, NATIVE, {}, intact)
    assert found["cases"] == 3 and set(found["without"]) == {"t1c", "flair"}
    whole = found["intact"]["tumour"]["dice"]
    first_three = sorted(result.case_id for result in intact)[:3]
    assert whole == pytest.approx(sum(r.dice for r in intact if r.case_id in first_three) / 3) and whole > 0.1
    assert found["without"]["flair"]["tumour"] == {**found["intact"]["tumour"], "dice_drop": 0.0}
    assert found["without"]["t1c"]["tumour"]["dice"] == 0.0  # nothing is bright on a zeroed sequence
    assert found["without"]["t1c"]["tumour"]["dice_drop"] == pytest.approx(whole)
    assert found["reading"].startswith("reliance: trained without --sequence-dropout")
    assert json.loads(json.dumps(found)) == found
    dropped = sequence_importance(BrightOnFirst(), cases, dataclasses.replace(hp, sequence_dropout=0.25), task, device,
                                  NATIVE, {}, intact)
    assert dropped["reading"].startswith("information: trained with --sequence-dropout 0.25")
    assert "except" not in dropped["reading"]
    among = sequence_importance(BrightOnFirst(), cases, dataclasses.replace(
        hp, sequence_dropout=0.25, sequence_dropout_among="flair"), task, device, NATIVE, {}, intact)
    assert among["reading"].startswith("information: trained with --sequence-dropout 0.25") and among[
        "reading"].endswith("; except without t1c, which training never dropped (--sequence-dropout-among): those "
                            "figures read as reliance")


def test_occlusion_and_saliency_find_what_the_network_reads():
    image = np.zeros((2, 16, 32, 32), dtype=np.float32)
    image[0, 4:8, 8:14, 8:14] = 5.0  # bright on the first sequence: the tumour the network sees
    image[1, 10:14, 20:28, 20:28] = 5.0  # bright on the second, which it ignores
    occlusion = occlusion_map(BrightOnFirst(), image, sigmoid=False, multiple=8)
    assert occlusion.shape == (16, 32, 32)
    assert np.allclose(occlusion[0:8, 8:16, 8:16], 1.0)  # the one 8-voxel cell holding it: hidden, all is lost
    assert np.allclose(occlusion[8:], 0.0) and np.allclose(occlusion[:, 16:], 0.0)  # hiding elsewhere: nothing
    saliency = saliency_maps(BrightOnFirst(), image, sigmoid=False, multiple=8)
    assert saliency.shape == (2, 16, 32, 32) and not saliency[1].any()  # the second sequence moves nothing
    assert saliency[0][4:8, 8:14, 8:14].min() > 0 and saliency[0][image[0] == 0].max() == 0


def test_a_multi_sequence_run_reports_each_sequences_importance(bucket, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("SM_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    data = f"s3://{bucket}/four/"
    write_dataset(8, data, SynthSpec(shape=(32, 48, 48), sequences=("t1c", "flair")))
    output = f"s3://{bucket}/runs"
    assert train.main(["--data-uri", data, "--output-uri", output, "--run-name", "importance", *SMALL,
                       "--sequences", "t1c,flair", "--epochs", "1", "--steps-per-epoch", "6",
                       "--sequence-importance", "2"]) == 0
    summary = json.loads(s3.read_uri(f"{output}/importance/summary.json"))
    found = summary["sequence_importance"]
    assert found["cases"] == 2 and set(found["without"]) == {"t1c", "flair"}
    for sequence, structures in found["without"].items():
        values = structures["tumour"]
        assert 0.0 <= values["dice"] <= 1.0 and values["dice_drop"] == pytest.approx(
            found["intact"]["tumour"]["dice"] - values["dice"]), sequence
    assert review.main([f"{output}/importance", "--report", str(tmp_path / "report")]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("importance: sequence"))
    for sequence, structures in found["without"].items():
        assert f"without {sequence}: tumour {structures['tumour']['dice']:.3f}" in line
    assert line.endswith(f". Read as {found['reading']}") and found["reading"].startswith("reliance")
    page = (tmp_path / "report" / "index.html").read_text()
    table = page.split("Sequence importance:")[1].split("</table>")[0]
    assert table.count('<td class="name">') == 2 and "Dice tumour" in table
    assert f"Read as {found['reading']}." in " ".join(html.unescape(page).split("Sequence importance:")[1].split("<table>")[0].split())
    assert review.main([f"{output}/importance", "--report", str(tmp_path / "explained"), "--explain"]) == 0
    page = (tmp_path / "explained" / "index.html").read_text()
    shown = re.findall(r'<img src="(explain_importance_\d\.png)"', page)
    assert shown == ["explain_importance_0.png", "explain_importance_1.png"]  # the worst and best case
    for file in shown:
        assert matplotlib.image.imread(tmp_path / "explained" / file).shape[0] > 300
