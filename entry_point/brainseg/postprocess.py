"""Postprocessing of the predicted regions, chosen on the validation cases.

Per region (WT, TC, ET, or a class), one :class:`Rule`: remove the predicted 26-connected
components smaller than a volume in mm³, or keep only the largest component, or leave the
prediction alone. Volumes are in mm³, so a rule means the same on every grid it meets.

A rule is *offered* only where the training labels support it (:func:`offer`): thresholds stay
at or below BraTS's 50 mm³ scoring floor, so no scored lesion's whole prediction is under one,
and "keep the largest component" is offered only when no training case holds several lesions of
the region (the fingerprint's :class:`~brainseg.data.fingerprint.LesionCounts`). Among the offered
rules a region takes the one with the highest mean lesion-wise Dice (BraTS's) over the
validation cases (:func:`choose`), and only when it adds at least :data:`MIN_GAIN` to leaving the
prediction alone *and* lowers the case's lesion-wise Dice of that region (by more than
:data:`LOWER`) on at most :data:`HARM_FRACTION` of the validation cases. With cross-validation the choice is made on the
folds' validation cases pooled (every case once, each predicted by the fold that held it out),
among the rules every fold offered, as nnU-Net does. The model's description stores the choice
and prediction applies it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from brainseg.overlap import LesionMatch

_COMPONENTS = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity, as the lesion-wise score counts components


@dataclass(frozen=True)
class Rule:
    """Which predicted components of a region stay: those of at least ``min_mm3`` mm³, and with
    ``largest_only`` only the largest one. The default rule keeps everything."""

    min_mm3: float = 0.0
    largest_only: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.min_mm3, (int, float)) and np.isfinite(self.min_mm3) and self.min_mm3 >= 0):
            raise ValueError(f"postprocessing min_mm3 {self.min_mm3!r}: expected a volume >= 0 in mm³")

    @property
    def changes_nothing(self) -> bool:
        return self.min_mm3 == 0 and not self.largest_only

    def keeps(self, component_mm3: np.ndarray) -> np.ndarray:
        """Which of the components (volumes in mm³, in label order) the rule keeps."""
        keep = np.asarray(component_mm3) >= self.min_mm3
        if self.largest_only and len(component_mm3):
            keep &= np.arange(len(component_mm3)) == int(np.argmax(component_mm3))
        return keep

    def apply(self, mask: np.ndarray, spacing: tuple) -> np.ndarray:
        """``mask`` (booleans ``(D, H, W)``) without the components the rule removes."""
        if self.changes_nothing or not mask.any():
            return mask
        labelled, count = ndimage.label(mask, _COMPONENTS)
        sizes = np.bincount(labelled.ravel(), minlength=count + 1)[1:] * float(np.prod(spacing))
        kept = np.concatenate([[False], self.keeps(sizes)])
        return kept[labelled]

    def describe(self) -> str:
        if self.largest_only:
            return "keep the largest component"
        return f"remove components under {self.min_mm3:g} mm³" if self.min_mm3 else "none"

    def to_dict(self) -> dict:
        return asdict(self)


NONE = Rule()
LARGEST_ONLY = Rule(largest_only=True)
# Thresholds stop at BraTS's 50 mm³ scoring floor: a component that small is no scored lesion's
# whole prediction. Larger ones, chosen on a few validation cases, removed small true lesions of
# the test cases (benchmarks/peer.py, seed 2: 800 mm³ took enhancing tumour Dice 0.86 -> 0.62).
THRESHOLDS_MM3 = (10, 25, 50)
CANDIDATES = (*(Rule(min_mm3=volume) for volume in THRESHOLDS_MM3), LARGEST_ONLY)
MIN_GAIN = 0.005  # validation lesion-wise Dice a rule must add to be kept: noise on a few cases is no gain
HARM_FRACTION = 0.1  # a rule that lowers more than this share of the validation cases' scores is not kept
# A case is lowered when its lesion-wise Dice falls by more than this: shaving a few voxels' fragment
# off a found lesion costs thousandths, losing a lesion or its core costs tenths.
LOWER = 0.01


@dataclass(frozen=True)
class Offer:
    """The rules one region may take (``rules``) and, by description, why others are not offered."""

    rules: tuple = CANDIDATES
    withheld: tuple = ()  # ((description, reason), ...)

    def to_dict(self) -> dict:
        return {"rules": [rule.to_dict() for rule in self.rules], "withheld": [list(pair) for pair in self.withheld]}

    @classmethod
    def from_dict(cls, data: dict) -> Offer:
        """The offer :meth:`to_dict` wrote.

        Raises:
            ValueError: not such a dict.
        """
        try:
            return cls(tuple(Rule(**rule) for rule in data["rules"]),
                       tuple((str(description), str(reason)) for description, reason in data["withheld"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"postprocessing offer {str(data)[:200]}: expected rules and withheld ({err})") from None


def offer(lesions) -> Offer:
    """What the training labels support for one region, from its
    :class:`~brainseg.data.fingerprint.LesionCounts` (``None``: not counted)."""
    if lesions is None or lesions.cases == 0:
        reason = "the training cases' lesions were not counted"
    elif lesions.uncounted:
        reason = f"{lesions.uncounted} of {lesions.cases} training cases have no lesion count"
    elif lesions.several:
        reason = f"{lesions.several} of {lesions.cases} training cases hold several lesions (up to {lesions.most})"
    else:
        return Offer()
    return Offer(tuple(rule for rule in CANDIDATES if rule != LARGEST_ONLY), ((LARGEST_ONLY.describe(), reason),))


def common_offer(offers: list[Offer]) -> Offer:
    """The rules every one of ``offers`` holds (the folds' of a cross-validation), with every reason given."""
    rules = tuple(rule for rule in CANDIDATES if all(rule in each.rules for each in offers))
    withheld = tuple(dict.fromkeys(pair for each in offers for pair in each.withheld))
    return Offer(rules, withheld)


@dataclass(frozen=True)
class Trial:
    """One offered rule on the validation cases: their mean lesion-wise Dice with it and how many it lowered."""

    rule: Rule
    after: float
    lowered: int

    def to_dict(self) -> dict:
        return {"description": self.rule.describe(), "val_lesion_dice": self.after, "cases_lowered": self.lowered}


@dataclass(frozen=True)
class Choice:
    """A region's chosen rule, the mean validation lesion-wise Dice without (``before``) and with it,
    every offered rule's :class:`Trial` and the rules not offered."""

    rule: Rule
    before: float
    after: float
    cases: int
    trials: tuple = ()
    withheld: tuple = ()

    def to_dict(self) -> dict:
        return {"rule": self.rule.to_dict(), "description": self.rule.describe(), "val_lesion_dice_before": self.before,
                "val_lesion_dice_after": self.after, "cases": self.cases,
                "tried": [trial.to_dict() for trial in self.trials],
                "not_offered": {description: reason for description, reason in self.withheld}}


def choose(matches: list[dict[str, LesionMatch]], offers: dict[str, Offer]) -> dict[str, Choice]:
    """Each region's rule over the validation cases' lesion matches (``[{region: LesionMatch}]``, one
    dict per case) among its offered rules (``offers``; a region missing there is offered every
    candidate): the best mean lesion-wise Dice among those that add :data:`MIN_GAIN` and lower at
    most :data:`HARM_FRACTION` of the cases; else none."""
    if not matches:
        return {}
    allowed = int(HARM_FRACTION * len(matches) + 1e-9)
    choices = {}
    for name in matches[0]:
        offered = offers.get(name, Offer())
        cases = [case[name] for case in matches]
        before_each = np.asarray([case.dice() for case in cases])
        before = float(before_each.mean())
        trials = []
        for rule in offered.rules:
            after_each = np.asarray([case.dice(rule.keeps(case.component_voxels * case.voxel_mm3)) for case in cases])
            trials.append(Trial(rule, float(after_each.mean()), int(np.count_nonzero(after_each < before_each - LOWER))))
        kept = [trial for trial in trials if trial.after >= before + MIN_GAIN and trial.lowered <= allowed]
        best = max(kept, key=lambda trial: trial.after, default=None)
        choices[name] = Choice(best.rule if best else NONE, before, best.after if best else before, len(cases),
                               tuple(trials), offered.withheld)
    return choices


def validation_record(matches: dict, offers: dict[str, Offer], tumour: dict[str, bool] | None = None) -> dict:
    """What a run writes for a cross-validation to pool: the offers, each validation case's
    lesion matches (``{case_id: {region: LesionMatch}}``) and whether it holds tumour (``tumour``,
    for the detection threshold); case IDs and counts only."""
    return {"offers": {name: value.to_dict() for name, value in offers.items()},
            "cases": {case_id: {name: match.to_dict() for name, match in by_region.items()}
                      for case_id, by_region in sorted(matches.items())},
            **({"tumour": {case_id: bool(tumour[case_id]) for case_id in sorted(matches)}} if tumour is not None else {})}


def choose_pooled(records: list[dict]) -> dict[str, Choice]:
    """Each region's rule over the validation cases of several runs pooled (the folds of a
    cross-validation, each case validated by the fold that held it out), among the rules every
    run offered (:func:`validation_record`'s).

    Raises:
        ValueError: a record that is not one, or records of different regions.
    """
    try:
        regions = [tuple(sorted(record["offers"])) for record in records]
        if len(set(regions)) > 1:
            raise ValueError(f"the runs' regions differ: {sorted(set(regions))}")
        offers = {name: common_offer([Offer.from_dict(record["offers"][name]) for record in records])
                  for name in (regions[0] if regions else ())}
        matches = [case for record in records for _, case in sorted(record_matches(record).items())]
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"validation record: expected offers and cases ({err!r})") from None
    return choose(matches, offers)


def record_matches(record: dict) -> dict[str, dict[str, LesionMatch]]:
    """A :func:`validation_record`'s lesion matches, ``{case_id: {region: LesionMatch}}``."""
    return {case_id: {name: LesionMatch.from_dict(match) for name, match in case.items()}
            for case_id, case in record["cases"].items()}


def rules_of(data: dict) -> dict[str, Rule]:
    """``{region: Rule}`` from a description's ``postprocessing`` (``{region: {"min_mm3", "largest_only"}}``).

    Raises:
        ValueError: a region's entry is not a rule.
    """
    try:
        return {name: Rule(**value) for name, value in (data or {}).items()}
    except TypeError as err:
        raise ValueError(f"postprocessing {data!r}: expected {{region: {{min_mm3, largest_only}}}} ({err})") from None


def common_rules(rule_sets: list[dict[str, Rule]]) -> dict[str, Rule]:
    """Each structure's rule that every one of ``rule_sets`` holds (an ensemble's models'): a
    structure whose sets differ, or that one of them leaves alone, gets none."""
    if not rule_sets:
        return {}
    return {name: rule for name, rule in rule_sets[0].items() if all(rules.get(name) == rule for rules in rule_sets[1:])}


def apply_rules(rules: dict[str, Rule], names, masks: list[np.ndarray], spacing: tuple) -> list[np.ndarray]:
    """Each region's mask (``names`` in the masks' order) with its rule applied (no rule: unchanged)."""
    return [rules[name].apply(mask, spacing) if name in rules else mask for name, mask in zip(names, masks)]
