"""Postprocessing chosen on validation (hand-built masks whose answers are worked out by hand), the
ensemble's shared rules, and patient-level cross-validation folds."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from brainseg.config import Hyperparameters
from brainseg.data.fingerprint import LesionCounts
from brainseg.data.splits import assign_folds
from brainseg.data.summary import CaseSummary, count_lesions
from brainseg.metrics import lesion_scores, lesion_wise
from brainseg.model.artifact import ModelError
from brainseg.postprocess import (
    CANDIDATES,
    LARGEST_ONLY,
    NONE,
    Offer,
    Rule,
    apply_rules,
    choose,
    common_offer,
    offer,
    rules_of,
)
from brainseg.prediction.predictor import shared_rules

SHAPE = (24, 40, 40)
ONE_MM = (1.0, 1.0, 1.0)


def _cube(corner: tuple, size: int) -> np.ndarray:
    volume = np.zeros(SHAPE, dtype=bool)
    z, y, x = corner
    volume[z:z + size, y:y + size, x:x + size] = True
    return volume


LESION = _cube((4, 4, 4), 5)  # 125 voxels
SPECK = _cube((18, 30, 30), 2)  # 8 voxels far from the lesion: a false positive
SMALL_FIND = _cube((15, 20, 20), 4)  # 64 voxels: a second, small true lesion
BLOB = _cube((16, 30, 4), 4)  # 64 voxels far from the others: a false positive over the 50 mm³ floor
EVERY_RULE = {"wt": Offer()}  # the training labels support every candidate


def test_a_rule_removes_components_by_volume_in_mm3_and_keeps_the_largest_when_asked():
    assert np.array_equal(Rule(min_mm3=10).apply(LESION | SPECK, ONE_MM), LESION)  # 8 mm³ < 10
    assert np.array_equal(Rule(min_mm3=10).apply(LESION | SPECK, (2.0, 1.0, 1.0)), LESION | SPECK)  # 16 mm³ stays
    assert np.array_equal(Rule(largest_only=True).apply(LESION | SMALL_FIND | SPECK, ONE_MM), LESION)
    assert NONE.apply(LESION | SPECK, ONE_MM) is not None and NONE.changes_nothing
    empty = np.zeros(SHAPE, dtype=bool)
    assert not Rule(largest_only=True).apply(empty, ONE_MM).any()
    assert [rule.describe() for rule in (NONE, Rule(min_mm3=50), Rule(largest_only=True))] == [
        "none", "remove components under 50 mm³", "keep the largest component"]
    with pytest.raises(ValueError, match="min_mm3 -1"):
        Rule(min_mm3=-1)


def test_the_lesion_match_scores_any_kept_subset_as_the_metric_scores_the_pruned_mask():
    truth = LESION | SMALL_FIND
    prediction = _cube((4, 4, 5), 5) | _cube((15, 20, 21), 3) | SPECK  # both found, one false positive
    figures, match = lesion_scores(prediction, truth, ONE_MM)
    assert figures.dice == pytest.approx(match.dice())
    # By hand: lesion 1, the 5-cube shifted one voxel: overlap 100, Dice 200 / 250 = 0.8; lesion 2,
    # the 3-cube inside the 4-cube: overlap 27, Dice 54 / (27 + 64); and one false positive scoring 0.
    assert match.dice() == pytest.approx((0.8 + 54 / 91) / 3)
    for rule in CANDIDATES:
        keep = rule.keeps(match.component_voxels * match.voxel_mm3)
        pruned = rule.apply(prediction, ONE_MM)
        assert match.dice(keep) == pytest.approx(lesion_wise(pruned, truth, ONE_MM).dice), rule


def _matches(pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[dict]:
    return [{"wt": lesion_scores(prediction, truth, ONE_MM)[1]} for prediction, truth in pairs]


def test_a_threshold_that_removes_false_positives_is_chosen_and_says_what_it_bought():
    # Case 1: the lesion found plus a speck (0.5); case 2: the lesion found alone (1.0). Removing
    # components under 10 mm³ makes both 1.0, the smallest candidate that does.
    choices = choose(_matches([(LESION | SPECK, LESION), (LESION, LESION)]), EVERY_RULE)
    assert choices["wt"].rule == Rule(min_mm3=10)
    assert (choices["wt"].before, choices["wt"].after, choices["wt"].cases) == (pytest.approx(0.75), 1.0, 2)
    reported = choices["wt"].to_dict()
    assert reported["description"] == "remove components under 10 mm³" and reported["not_offered"] == {}
    assert [(trial["description"], trial["val_lesion_dice"], trial["cases_lowered"]) for trial in reported["tried"]] == [
        ("remove components under 10 mm³", 1.0, 0), ("remove components under 25 mm³", 1.0, 0),
        ("remove components under 50 mm³", 1.0, 0), ("keep the largest component", 1.0, 0)]


def test_a_gain_below_half_a_dice_point_is_noise_and_chooses_nothing():
    speck, clean = _matches([(LESION | SPECK, LESION), (LESION, LESION)])
    assert choose([speck, clean] + [clean] * 150, EVERY_RULE)["wt"].rule == NONE  # 0.5 -> 1 on one of 152: +0.0033
    assert choose([speck, clean] + [clean] * 80, EVERY_RULE)["wt"].rule == Rule(min_mm3=10)  # one of 82: +0.0061


def test_a_rule_that_would_cost_a_true_lesion_is_not_chosen_and_a_tie_keeps_the_prediction():
    # Keeping only the largest would drop the found 64-voxel lesion.
    truth = LESION | SMALL_FIND
    choices = choose(_matches([(truth, truth)]), EVERY_RULE)
    assert choices["wt"].rule == NONE and choices["wt"].before == choices["wt"].after == 1.0
    assert choose([], EVERY_RULE) == {}


def test_no_threshold_reaches_past_the_scoring_floor():
    assert max(rule.min_mm3 for rule in CANDIDATES) == 50
    # A 64 mm³ false positive: only "keep the largest" removes it, and only when it is offered.
    case = _matches([(LESION | BLOB, LESION)])
    assert choose(case, EVERY_RULE)["wt"].rule == LARGEST_ONLY
    assert choose(case, {"wt": Offer(tuple(rule for rule in CANDIDATES if rule != LARGEST_ONLY))})["wt"].rule == NONE


def test_keeping_the_largest_is_not_offered_where_training_cases_hold_several_lesions():
    several = offer(LesionCounts(cases=20, several=3, most=4, uncounted=0))
    assert LARGEST_ONLY not in several.rules and several.rules == CANDIDATES[:-1]
    assert several.withheld == (("keep the largest component", "3 of 20 training cases hold several lesions (up to 4)"),)
    assert offer(LesionCounts(cases=20, several=0, most=1, uncounted=0)) == Offer()
    assert offer(LesionCounts(cases=20, several=0, most=1, uncounted=2)).withheld == (
        ("keep the largest component", "2 of 20 training cases have no lesion count"),)
    assert LARGEST_ONLY not in offer(None).rules
    # The validation cases would gain from it (a 64 mm³ false positive), but it is not on offer.
    choices = choose(_matches([(LESION | BLOB, LESION)] * 3), {"wt": several})
    assert choices["wt"].rule == NONE
    assert choices["wt"].to_dict()["not_offered"] == {
        "keep the largest component": "3 of 20 training cases hold several lesions (up to 4)"}
    # Folds pool what every fold offered, with each reason.
    pooled = common_offer([Offer(), several])
    assert pooled.rules == several.rules and pooled.withheld == several.withheld


def test_a_rule_that_lowers_more_than_a_tenth_of_the_cases_is_not_kept_even_when_the_mean_rises():
    found_with_stray = (LESION | BLOB, LESION)  # 0.5; keeping the largest makes it 1.0
    two_lesions = (LESION | SMALL_FIND, LESION | SMALL_FIND)  # 1.0; keeping the largest drops one: 0.5
    three = choose(_matches([found_with_stray, found_with_stray, two_lesions]), EVERY_RULE)["wt"]
    assert three.after == three.before == pytest.approx(2 / 3) and three.rule == NONE  # +0.167, but 1 of 3 lowered
    assert [trial.lowered for trial in three.trials] == [0, 0, 0, 1]
    ten = choose(_matches([found_with_stray] * 9 + [two_lesions]), EVERY_RULE)["wt"]
    assert ten.rule == LARGEST_ONLY and ten.after == pytest.approx(0.95)  # 1 of 10 lowered: allowed


def test_shaving_a_fragment_off_a_found_lesion_does_not_count_as_lowering_a_case():
    fragment = np.zeros(SHAPE, dtype=bool)
    fragment[8, 4, 4] = True  # one voxel of the lesion, two slices from the rest of its prediction
    shaved = (_cube((4, 4, 4), 5) & (np.arange(SHAPE[0]) < 7)[:, None, None]) | fragment  # z 4-6 and the voxel at z 8
    # Removing components under 10 mm³ takes the fragment: 2 x 76 / 201 -> 2 x 75 / 200, 0.006 lower.
    cases = _matches([(LESION | SPECK, LESION), (shaved, LESION)])
    assert cases[1]["wt"].dice() - cases[1]["wt"].dice(np.array([True, False])) == pytest.approx(152 / 201 - 0.75)
    choice = choose(cases, EVERY_RULE)["wt"]
    assert choice.rule == Rule(min_mm3=10) and choice.trials[0].lowered == 0


def test_lesions_are_counted_for_every_set_of_label_values():
    labels = np.zeros((20, 20, 20), dtype=np.int64)
    labels[2:7, 2:7, 2:7] = 2  # lesion A: oedema (125 voxels) ...
    labels[3:6, 3:6, 3:6] = 4  # ... around an enhancing core of 27 voxels
    labels[12:16, 12:16, 12:16] = 2  # lesion B: 64 voxels of oedema
    labels[17:19, 2:4, 17:19] = 4  # a speck of 8 enhancing voxels
    one_mm = count_lesions(labels, ONE_MM)
    assert dict(one_mm) == {(2,): 2, (4,): 0, (2, 4): 2}  # the core (27 mm³) and the speck are under 50 mm³
    assert dict(count_lesions(labels, (2.0, 1.0, 1.0))) == {(2,): 2, (4,): 1, (2, 4): 2}
    summary = CaseSummary((), 0, 0.0, (), (), label_counts=((2, 1), (4, 1)), lesion_counts=one_mm)
    assert summary.lesions_of(None) == 2 and summary.lesions_of(frozenset({1, 4})) == 0
    assert summary.lesions_of(frozenset({1})) == 0 and summary.lesions_of(frozenset({2, 4})) == 2
    assert CaseSummary((), 0, 0.0, (), (), label_counts=((2, 1),)).lesions_of(None) is None  # an older summary


def test_rules_apply_per_structure_and_are_read_back_from_a_description():
    masks = [LESION | SPECK, LESION | SPECK]
    pruned = apply_rules({"tc": Rule(min_mm3=25)}, ("wt", "tc"), masks, ONE_MM)
    assert np.array_equal(pruned[0], LESION | SPECK) and np.array_equal(pruned[1], LESION)
    assert rules_of({"tc": Rule(min_mm3=25).to_dict()}) == {"tc": Rule(min_mm3=25)} and rules_of({}) == {}
    with pytest.raises(ValueError, match="postprocessing"):
        rules_of({"tc": {"min_voxels": 3}})


def _loaded(postprocessing: dict) -> SimpleNamespace:
    return SimpleNamespace(description=SimpleNamespace(postprocessing=postprocessing))


def test_an_ensemble_applies_only_the_rules_every_model_chose():
    a = {"wt": {"min_mm3": 50, "largest_only": False}, "et": {"min_mm3": 0, "largest_only": True}}
    b = {"wt": {"min_mm3": 50, "largest_only": False}, "et": {"min_mm3": 100, "largest_only": False}}
    assert shared_rules([_loaded(a), _loaded(b)]) == {"wt": Rule(min_mm3=50)}
    assert shared_rules([_loaded(a)]) == rules_of(a)
    assert shared_rules([_loaded({}), _loaded(a)]) == {}
    with pytest.raises(ModelError, match="postprocessing"):
        shared_rules([_loaded({"wt": {"min_mm3": "big"}})])


# ----------------------------------------------------------------------------- folds
GROUPS = {f"case_{n:02d}": f"patient_{n // 2}" if n < 6 else "" for n in range(17)}  # 3 patients with 2 cases


def test_folds_are_patient_level_disjoint_balanced_and_seeded():
    folds = assign_folds(GROUPS, 5, seed=3)
    assert sorted(folds) == sorted(GROUPS) and set(folds.values()) == set(range(5))
    for patient in ("patient_0", "patient_1", "patient_2"):
        assert len({folds[case] for case, group in GROUPS.items() if group == patient}) == 1
    sizes = np.bincount(list(folds.values()))
    assert sizes.max() - sizes.min() <= 1, sizes  # 17 cases in 5 folds: 4,4,3,3,3 in some order
    assert assign_folds(GROUPS, 5, seed=3) == folds
    assert assign_folds(GROUPS, 5, seed=4) != folds
    with pytest.raises(ValueError, match="3 patient.*cannot fill 4 folds"):
        assign_folds({"a": "p", "b": "p", "c": "q", "d": "r"}, 4, seed=0)


@pytest.mark.parametrize("folds, fold", [(1, 0), (5, 5), (3, -2)])
def test_a_fold_outside_the_folds_is_refused(folds, fold):
    with pytest.raises(ValueError, match=f"fold {fold} of folds {folds}"):
        Hyperparameters(folds=folds, fold=fold)
