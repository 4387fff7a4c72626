"""Model factory, encoder freezing and transfer, losses, schedules, and the hand-written Dice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.losses import DeepSupervisionLoss
from monai.metrics import DiceMetric, compute_iou

from brainseg.config import Hyperparameters, check_patch_size
from brainseg.model.losses import build_loss
from brainseg.model.networks import (
    NetworkSpec,
    build_model,
    encoder_state,
    freeze_encoder,
    is_encoder_parameter,
    load_matching,
)
from brainseg.model.optim import build_optimizer, build_scheduler
from brainseg.overlap import Overlap, tumour_centre
from brainseg.tasks import task_of

SMALL = dict(channels=(4, 8, 16), res_units=1)
BRATS = dict(sequences="t1c,t1,t2,flair", labels="ncr=1,ed=2,et=4")


@pytest.mark.parametrize("name", ["unet", "attention_unet", "segresnet", "dynunet"])
@pytest.mark.parametrize("settings, channels_in, channels_out", [
    ({}, 1, 2),  # binary: background and tumour
    (BRATS, 4, 4),  # softmax: background and three classes
    ({**BRATS, "regions": "brats"}, 4, 3),  # sigmoid: WT, TC, ET
    ({"task": "autoencoder", "sequences": "t1,flair"}, 2, 2),  # reconstructs every sequence
])
def test_every_model_maps_a_patch_to_logits(name, settings, channels_in, channels_out):
    hp = Hyperparameters(model=name, dropout=0.1, **settings)
    spec = NetworkSpec.of(hp, task_of(hp).out_channels)
    assert (spec.in_channels, spec.out_channels) == (channels_in, channels_out)
    model = build_model(NetworkSpec(name=name, dropout=0.1, in_channels=channels_in, out_channels=channels_out,
                                    **SMALL))
    assert model(torch.zeros(2, channels_in, 16, 16, 16)).shape == (2, channels_out, 16, 16, 16)


def test_activation_and_dropout_reach_the_network():
    relu = build_model(NetworkSpec(activation="relu", dropout=0.2, **SMALL))
    kinds = {type(module).__name__ for module in relu.modules()}
    assert "ReLU" in kinds and "PReLU" not in kinds and {"Dropout", "Dropout3d"} & kinds
    assert "PReLU" in {type(module).__name__ for module in build_model(NetworkSpec(**SMALL)).modules()}


def test_patch_size_must_divide_by_the_downsampling():
    with pytest.raises(ValueError, match=r"every size must be a multiple of 4"):
        check_patch_size((16, 18, 16), (4, 8, 16))
    with pytest.raises(ValueError, match=r"patch_size \(100, 100, 100\): with 5 levels .* multiple of 16"):
        Hyperparameters(patch_size=(100, 100, 100))


def test_segresnet_needs_doubling_channels():
    with pytest.raises(ValueError, match="segresnet widths double per level"):
        build_model(NetworkSpec(name="segresnet", channels=(4, 6, 16)))


@pytest.mark.parametrize("name", ["unet", "attention_unet", "segresnet", "dynunet"])
def test_frozen_encoder_stays_put_while_the_decoder_learns(name):
    model = build_model(NetworkSpec(name=name, **SMALL))
    frozen, trainable = freeze_encoder(model, name)
    assert frozen > 0 and trainable > 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model.parameters(), "adamw", lr=1e-3, weight_decay=1e-5)
    loss = build_loss("dice_ce")(model(torch.randn(2, 1, 16, 16, 16)), torch.randint(0, 2, (2, 1, 16, 16, 16)))
    loss.backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if is_encoder_parameter(name, n):
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters()
               if not is_encoder_parameter(name, n))


def test_encoder_transfers_to_a_segmentation_model_and_reports_the_rest():
    pretrained = build_model(NetworkSpec(out_channels=1, **SMALL))
    target = build_model(NetworkSpec(**SMALL))
    report = load_matching(target, encoder_state(pretrained, "unet"))
    assert report["loaded"] and not report["shape_mismatch"] and not report["unexpected"]
    for name in report["loaded"]:
        assert torch.equal(target.state_dict()[name], pretrained.state_dict()[name])
    whole = load_matching(build_model(NetworkSpec(**SMALL)), pretrained.state_dict())
    assert whole["shape_mismatch"]  # the 1-channel output layer cannot go into a 2-class head


@pytest.mark.parametrize("loss", ["dice_ce", "dice", "focal_tversky"])
def test_losses_prefer_the_right_answer(loss):
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    label[..., 2:6, 2:6, 2:6] = 1
    right = torch.cat([1 - label, label], 1).float() * 10 - 5
    wrong = torch.cat([label, 1 - label], 1).float() * 10 - 5
    fn = build_loss(loss)
    assert float(fn(right, label)) < 0.1 < float(fn(wrong, label))


def test_region_loss_penalises_background_through_each_regions_binary_term():
    # Regions overlap, so a background voxel's target is (0, 0, 0); a softmax cross-entropy over the
    # region channels (MONAI's DiceCELoss(sigmoid=True) with several channels) is 0 there whatever
    # the logits. Logits of +20 everywhere on an all-background patch must cost about 20 per voxel.
    target = torch.zeros(1, 3, 4, 4, 4)
    confident_wrong = torch.full((1, 3, 4, 4, 4), 20.0)
    loss = float(build_loss("dice_ce", sigmoid=True)(confident_wrong, target))
    assert loss == pytest.approx(1.0 + 20.0, abs=1e-3)  # Dice 1 (nothing to find, everything found) + BCE 20
    right = float(build_loss("dice_ce", sigmoid=True)(-confident_wrong, target))
    assert right < 0.02  # BCE 2e-9; Dice 0.013, from MONAI's 1e-5 smoothing against 64 x sigmoid(-20)


def test_region_loss_is_dice_plus_binary_cross_entropy_by_hand():
    # Two regions, two voxels: sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4.
    logits = torch.tensor([[0.0, math.log(3)], [-math.log(3), 0.0]]).reshape(1, 2, 1, 1, 2)
    target = torch.tensor([[0.0, 1.0], [0.0, 0.0]]).reshape(1, 2, 1, 1, 2)
    smooth = 1e-5  # MONAI's default numerator and denominator smoothing
    dice_first = 1 - (2 * 0.75 + smooth) / (0.5 + 0.75 + 1 + smooth)
    dice_second = 1 - smooth / (0.25 + 0.5 + smooth)
    bce = (math.log(2) - math.log(0.75) - math.log(0.75) + math.log(2)) / 4  # every voxel of every channel
    expected = (dice_first + dice_second) / 2 + bce
    assert float(build_loss("dice_ce", sigmoid=True)(logits, target)) == pytest.approx(expected, rel=1e-6)


def test_class_loss_is_dice_plus_softmax_cross_entropy_by_hand():
    # Background and one class, two voxels: softmax([0, ln 3]) = (1/4, 3/4); labels 1 then 0.
    logits = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0]]).reshape(1, 2, 1, 1, 2)
    label = torch.tensor([1, 0]).reshape(1, 1, 1, 1, 2)
    smooth = 1e-5
    dice = 1 - (2 * 0.75 + smooth) / (1 + 1 + smooth)  # both channels alike: 3/4 of the right voxel each
    cross_entropy = -math.log(0.75)
    assert float(build_loss("dice_ce")(logits, label)) == pytest.approx(dice + cross_entropy, rel=1e-6)


def test_region_loss_refuses_a_target_of_class_indices():
    with pytest.raises(ValueError, match=r"region logits \(1, 3, 4, 4, 4\) and target \(1, 1, 4, 4, 4\)"):
        build_loss("dice_ce", sigmoid=True)(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4))


def test_deep_supervision_weighs_the_heads_by_halves_and_leaves_evaluation_to_the_main_head():
    hp = Hyperparameters(model="dynunet", deep_supervision=True, channels=(4, 8, 16, 32), patch_size=(16, 16, 16),
                         labels="ncr=1,ed=2,et=4", regions="brats")
    spec = NetworkSpec.of(hp, 3)
    network = build_model(spec)
    image = torch.randn(2, 1, 16, 16, 16)
    assert spec.deep_supervision == 2 and network(image).shape == (2, 3, 3, 16, 16, 16)  # main + 2 heads
    network.eval()
    assert network(image).shape == (2, 3, 16, 16, 16)
    target = (torch.rand(2, 3, 16, 16, 16) > 0.5).float()
    heads = torch.randn(2, 3, 3, 16, 16, 16)
    plain, supervised = build_loss("dice_ce", sigmoid=True), task_of(hp).loss(hp)
    expected = (plain(heads[:, 0], target) + plain(heads[:, 1], target) / 2 + plain(heads[:, 2], target) / 4) / 1.75
    assert float(supervised(heads, target)) == pytest.approx(float(expected), rel=1e-6)
    # MONAI's own DeepSupervisionLoss (weight_mode "exp": 1, 1/2, 1/4) on the same heads and target
    # sums the same weights without normalising them: the same loss, scaled by 1.75.
    monai = DeepSupervisionLoss(plain)(list(torch.unbind(heads, dim=1)), target)
    assert float(supervised(heads, target)) * 1.75 == pytest.approx(float(monai), rel=1e-6)
    assert float(supervised(heads[:, 0], target)) == pytest.approx(float(plain(heads[:, 0], target)))
    with pytest.raises(ValueError, match="deep_supervision with task segmentation, model unet"):
        Hyperparameters(deep_supervision=True)


@pytest.mark.parametrize("schedule", ["cosine", "poly", "constant", "onecycle"])
def test_schedules_warm_up_then_follow_their_shape(schedule):
    optimizer = build_optimizer(build_model(NetworkSpec(**SMALL)).parameters(), "adamw", lr=1.0, weight_decay=1e-5)
    scheduler = build_scheduler(optimizer, schedule, lr=1.0, warmup_steps=10, total_steps=100)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] < rates[9] and max(rates) == pytest.approx(1.0, rel=0.05)
    if schedule == "constant":
        assert rates[-1] == pytest.approx(1.0)
    else:
        assert rates[-1] < 0.05 and all(a >= b for a, b in zip(rates[12:], rates[13:]))


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_optimizers_apply_weight_decay(optimizer):
    built = build_optimizer(build_model(NetworkSpec(**SMALL)).parameters(), optimizer, lr=1e-3, weight_decay=0.1,
                            momentum=0.99)
    assert built.param_groups[0]["weight_decay"] == 0.1


def test_hand_written_dice_and_iou_match_monai():
    rng = np.random.default_rng(0)
    for _ in range(10):
        truth = rng.random((12, 16, 16)) < rng.uniform(0.01, 0.3)
        prediction = truth ^ (rng.random(truth.shape) < rng.uniform(0.0, 0.2))
        ours = Overlap.of(prediction, truth)
        p, t = (torch.from_numpy(a)[None, None].float() for a in (prediction, truth))
        metric = DiceMetric(include_background=True)
        metric(p, t)
        assert ours.dice == pytest.approx(float(metric.aggregate()), abs=1e-6)
        assert ours.iou == pytest.approx(float(compute_iou(p, t)), abs=1e-6)


def test_empty_prediction_and_truth_is_a_perfect_case():
    empty = np.zeros((4, 4, 4), dtype=bool)
    assert Overlap.of(empty, empty).dice == 1.0 and Overlap.of(empty, empty).iou == 1.0
    full = ~empty
    assert Overlap.of(full, empty).dice == 0.0


def test_tumour_centre_prefers_truth_then_prediction_then_the_middle():
    truth, prediction = np.zeros((8, 10, 12), dtype=bool), np.zeros((8, 10, 12), dtype=np.uint8)
    assert tumour_centre(truth, prediction).tolist() == [4, 5, 6]
    prediction[1, 2, 3] = 1
    assert tumour_centre(truth, prediction).tolist() == [1, 2, 3]
    truth[6, 7, 8:11] = True
    assert tumour_centre(truth, prediction).tolist() == [6, 7, 9]
