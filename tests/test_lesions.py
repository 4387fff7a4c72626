"""BraTS lesion-wise Dice and HD95 on hand-built masks whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from brainseg.metrics import MISSED_HD95, LesionWise, lesion_wise

SHAPE = (24, 40, 40)
ONE_MM = (1.0, 1.0, 1.0)


def _cube(corner: tuple, size: int, shape=SHAPE) -> np.ndarray:
    volume = np.zeros(shape, dtype=bool)
    z, y, x = corner
    volume[z:z + size, y:y + size, x:x + size] = True
    return volume


def test_both_empty_is_a_perfect_score():
    empty = np.zeros(SHAPE, dtype=bool)
    assert lesion_wise(empty, empty, ONE_MM) == LesionWise(1.0, 0.0, 0, 0)


def test_a_prediction_where_there_is_no_lesion_is_one_false_positive():
    assert lesion_wise(_cube((2, 2, 2), 5), np.zeros(SHAPE, dtype=bool), ONE_MM) == LesionWise(0.0, MISSED_HD95, 0, 1)


def test_a_found_lesion_scores_one_and_a_missed_one_zero():
    lesion = _cube((4, 4, 4), 5)  # 125 voxels
    assert lesion_wise(lesion, lesion, ONE_MM) == LesionWise(1.0, 0.0, 1, 0)
    assert lesion_wise(np.zeros(SHAPE, dtype=bool), lesion, ONE_MM) == LesionWise(0.0, MISSED_HD95, 1, 0)


def test_a_false_positive_shares_the_region_score_with_the_lesions():
    lesion = _cube((4, 4, 4), 5)
    elsewhere = _cube((15, 30, 30), 4)
    assert lesion_wise(lesion | elsewhere, lesion, ONE_MM) == LesionWise(0.5, MISSED_HD95 / 2, 1, 1)


def test_lesions_of_at_most_50_mm3_are_not_scored_and_what_touches_them_is_no_false_positive():
    tiny = _cube((4, 4, 4), 3)  # 27 voxels
    assert lesion_wise(np.zeros(SHAPE, dtype=bool), tiny, ONE_MM) == LesionWise(1.0, 0.0, 0, 0)
    assert lesion_wise(tiny, tiny, ONE_MM) == LesionWise(1.0, 0.0, 0, 0)
    assert lesion_wise(tiny, tiny, (2.0, 1.0, 1.0)).lesions == 1  # 54 mm³ at 2 mm slices: scored


def test_true_components_within_the_dilation_are_one_lesion_and_farther_ones_two():
    near = _cube((4, 4, 4), 4) | _cube((4, 4, 10), 4)  # 64 + 64 voxels, 2 empty voxels between them
    found = lesion_wise(_cube((4, 4, 4), 4), near, ONE_MM)
    assert (found.lesions, found.false_positives) == (1, 0)
    assert found.dice == pytest.approx(2 * 64 / (64 + 128))
    far = _cube((4, 4, 4), 4) | _cube((4, 4, 24), 4)  # 16 empty voxels between them
    found = lesion_wise(_cube((4, 4, 4), 4), far, ONE_MM)
    assert found == LesionWise(0.5, MISSED_HD95 / 2, 2, 0)


def test_a_prediction_beside_a_lesion_within_the_dilation_belongs_to_it():
    lesion = _cube((4, 4, 4), 5)
    beside = _cube((4, 4, 11), 5)  # 2 empty voxels after the lesion's last column: reached by the dilation
    found = lesion_wise(beside, lesion, ONE_MM)
    assert (found.dice, found.lesions, found.false_positives) == (0.0, 1, 0)
    assert 0 < found.hd95 < MISSED_HD95  # a real distance, not the missed lesion's 374
    away = _cube((4, 4, 13), 5)  # 4 empty voxels: beyond 3 dilations, so a false positive and a missed lesion
    assert lesion_wise(away, lesion, ONE_MM) == LesionWise(0.0, MISSED_HD95, 1, 1)


def test_components_touching_at_a_corner_are_one_component():
    corner = _cube((4, 4, 4), 4) | _cube((8, 8, 8), 4)  # they share one vertex: 26-connected
    split = lesion_wise(corner, corner, ONE_MM)
    assert split == LesionWise(1.0, 0.0, 1, 0)
    two_predictions = _cube((4, 4, 4), 4) | _cube((15, 25, 25), 4)
    assert lesion_wise(two_predictions, corner, ONE_MM).false_positives == 1


def test_the_hd95_of_a_lesion_is_measured_on_its_own_components():
    lesion = _cube((4, 4, 4), 6)
    shifted = _cube((4, 4, 5), 6)  # one voxel along x
    found = lesion_wise(shifted, lesion, ONE_MM)
    assert found.lesions == 1 and found.dice == pytest.approx(2 * 180 / 432)
    assert found.hd95 == pytest.approx(1.0)
    assert lesion_wise(shifted, lesion, (1.0, 1.0, 2.0)).hd95 == pytest.approx(2.0)  # in mm along x


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="differ in shape"):
        lesion_wise(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool), ONE_MM)
