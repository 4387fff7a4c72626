"""Plans from the dataset: a fingerprint in, a plan out (nnU-Net's anisotropy rule, the patch fitted
to the memory, the network's depth from the patch, the batch), flags given win, and a run with
``--plan auto`` end to end against the moto S3 server."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from brainseg.commands import train
from brainseg.config import Hyperparameters
from brainseg.data.fingerprint import Fingerprint
from brainseg.data.summary import Intensity
from brainseg.flags import given_flags
from brainseg.io import s3
from brainseg.model.networks import NetworkSpec, build_model
from brainseg.run.plan import activations_per_voxel, estimate_gb, make_plan, planned, target_spacing
from tests.conftest import synthetic_dataset

BRATS = Hyperparameters(sequences="t1c,t1,t2,flair", labels="ncr=1,ed=2,et=4", regions="brats")


def _case(spacing, shape, mean, labels, tumour_ml):
    intensities = tuple(Intensity(name, 0, 1000, 10, 900, mean + k, 50) for k, name in enumerate(("t1c", "flair")))
    return SimpleNamespace(image=SimpleNamespace(spacing=spacing, shape=shape),
                           summary=SimpleNamespace(intensities=intensities, label_counts=labels, tumour_ml=tumour_ml))


def _fingerprint(spacing=(1.0, 1.0, 1.0), shape=(155, 240, 240), p10=None, cases=100) -> Fingerprint:
    return Fingerprint(cases=cases, median_spacing=spacing, spacing_p10=p10 or spacing, median_shape=shape,
                       intensities={}, median_tumour_ml=40.0, label_shares={})


def test_the_fingerprint_holds_medians_percentiles_intensities_and_the_label_mix():
    cases = [_case((1.0, 1.0, 1.0), (150, 240, 240), 100, ((1, 10), (2, 30)), 5.0),
             _case((3.0, 0.9, 0.9), (50, 256, 256), 200, ((2, 40),), 7.0),
             _case((5.0, 1.0, 1.0), (30, 240, 240), 300, ((1, 20), (2, 20)), 9.0)]
    fingerprint = Fingerprint.of(cases, ("t1c", "flair"))
    assert fingerprint.cases == 3 and fingerprint.median_spacing == (3.0, 1.0, 1.0)
    assert fingerprint.spacing_p10 == (1.4, 0.92, 0.92) and fingerprint.median_shape == (50, 240, 240)
    assert fingerprint.intensities["t1c"] == {"low": 10, "high": 900, "mean": 200, "std": 50}
    assert fingerprint.intensities["flair"]["mean"] == 201 and fingerprint.median_tumour_ml == 7.0
    assert fingerprint.label_shares == {1: 0.25, 2: 0.75}  # shares 0.25/0/0.5 and 0.75/1/0.5, medians
    assert json.loads(json.dumps(fingerprint.to_dict()))["label_shares"] == {"1": 0.25, "2": 0.75}
    with pytest.raises(ValueError, match="at least one case"):
        Fingerprint.of([], ("t1c",))


def test_anisotropic_data_takes_the_10th_percentile_of_the_coarse_axis_never_finer_than_the_others():
    assert target_spacing(_fingerprint((1.0, 1.0, 1.0)))[0] == (1.0, 1.0, 1.0)
    assert target_spacing(_fingerprint((2.5, 1.0, 1.0), p10=(1.0, 1.0, 1.0)))[0] == (2.5, 1.0, 1.0)  # ratio 2.5
    spacing, why = target_spacing(_fingerprint((5.0, 0.9, 0.9), p10=(3.0, 0.8, 0.8)))
    assert spacing == (3.0, 0.9, 0.9) and "anisotropic" in why
    assert target_spacing(_fingerprint((5.0, 0.9, 0.9), p10=(0.5, 0.8, 0.8)))[0] == (0.9, 0.9, 0.9)


def test_activations_grow_with_the_patch_as_counted():
    spec = NetworkSpec(channels=(8, 16, 32), in_channels=2, out_channels=3, res_units=1)
    counted = [0]
    with torch.device("meta"):
        network = build_model(spec)
        for module in network.modules():
            if not list(module.children()):
                module.register_forward_hook(lambda m, i, o: counted.__setitem__(0, counted[0] + o.numel()))
        network(torch.empty(1, 2, 16, 24, 32))
    assert activations_per_voxel(spec) * 16 * 24 * 32 == pytest.approx(counted[0])
    assert estimate_gb(spec, (32, 32, 32), 2, "fp32") < estimate_gb(spec, (32, 32, 64), 2, "fp32")
    assert estimate_gb(spec, (32, 32, 32), 2, "fp32") < estimate_gb(spec, (32, 32, 32), 3, "fp32")
    assert estimate_gb(spec, (32, 32, 32), 2, "bf16") < estimate_gb(spec, (32, 32, 32), 2, "fp32")


@pytest.mark.parametrize("memory_gb", [8, 24])
def test_a_brats_fingerprint_plans_a_patch_that_fits_the_memory_and_divides_by_the_stride(memory_gb):
    plan = make_plan(_fingerprint(), BRATS, 3, memory_gb)
    stride = 2 ** (len(plan.channels) - 1)
    assert all(size % stride == 0 and size <= shape for size, shape in zip(plan.patch_size, (155, 240, 240)))
    assert plan.estimated_gb <= memory_gb and plan.batch_size >= 2
    assert plan.channels[0] == 32 and max(plan.channels) == 320 and len(plan.channels) <= 6
    assert min(plan.patch_size) / stride >= 4  # the bottleneck keeps at least 4 voxels per side
    Hyperparameters(**{**BRATS.to_dict(), **plan.values()})  # a valid configuration


def test_less_memory_plans_a_smaller_patch_and_batch():
    small, large = (make_plan(_fingerprint(), BRATS, 3, memory) for memory in (8, 24))
    assert math.prod(small.patch_size) * small.batch_size < math.prod(large.patch_size) * large.batch_size


def test_the_flags_given_win_and_the_rest_is_planned_around_them():
    hp = Hyperparameters(**{**BRATS.to_dict(), "channels": (16, 32, 64), "batch_size": 3})
    plan = make_plan(_fingerprint(), hp, 3, 24, given=frozenset({"channels", "batch_size"}))
    assert plan.channels == (16, 32, 64) and plan.batch_size == 3 and all(v % 4 == 0 for v in plan.patch_size)
    result = planned(hp, frozenset({"channels", "batch_size"}), plan)
    assert (result.channels, result.batch_size, result.patch_size) == ((16, 32, 64), 3, plan.patch_size)
    assert result.target_spacing == "1,1,1"


def test_given_flags_are_the_ones_on_the_command_line_whatever_their_value():
    given = given_flags(["--data-uri", "s3://a/b/", "--output-uri", "s3://a/c/", "--patch_size", "32,32,32",
                         "--batch-size", "2", "--sagemaker_program", "train.py"])
    assert given == {"data_uri", "output_uri", "patch_size", "batch_size"}


def test_a_run_with_plan_auto_records_its_plan_and_keeps_the_flags_given(bucket, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "model"))
    dataset = synthetic_dataset("plan-data", 8)  # 32x64x64 cases
    output = f"s3://{bucket}/runs"
    assert train.main(["--data-uri", dataset, "--output-uri", output, "--run-name", "planned", "--plan", "auto",
                       "--gpu-memory-gb", "1.5", "--channels", "8,16,32", "--res-units", "1", "--num-workers", "0",
                       "--epochs", "1", "--steps-per-epoch", "2", "--memory-budget-mb", "128"]) == 0
    plan = json.loads(s3.read_uri(f"{output}/planned/plan.json"))
    hyperparameters = json.loads(s3.read_uri(f"{output}/planned/summary.json"))["hyperparameters"]
    assert plan["channels"] == [8, 16, 32] and hyperparameters["channels"] == [8, 16, 32]  # given
    assert hyperparameters["patch_size"] == plan["patch_size"] == [32, 64, 64]  # the median shape, planned
    assert hyperparameters["batch_size"] == plan["batch_size"] and plan["fingerprint"]["median_shape"] == [32, 64, 64]
    assert hyperparameters["target_spacing"] == "1.5,1,1" and plan["estimated_gb"] <= 1.5
    log = capsys.readouterr().out
    assert "plan: target spacing 1.5x1x1 mm, patch 32x64x64" in log and "plan: channels (8, 16, 32) as given" in log
