"""Postprocessing of the predicted regions, chosen on the validation cases.

Per region (WT, TC, ET, or a class), one :class:`Rule`: remove the predicted 26-connected
components smaller than a volume in mm³, or keep only the largest component, or leave the
prediction alone. A run picks each region's rule among :data:`CANDIDATES` by the mean lesion-wise
Dice (BraTS's, :mod:`brainseg.metrics`) of its validation cases with the best weights, and keeps a
rule only when it raises that figure by :data:`MIN_GAIN`; the model's description stores the
choice and prediction applies it. Volumes are in mm³, so a rule means the same on every grid it meets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from brainseg.metrics import LesionMatch

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
# Thresholds stay near BraTS's 50 mm³ scoring floor: a component that small is no scored lesion's
# whole prediction. Larger ones, chosen on a few validation cases, removed small true lesions of
# the test cases (benchmarks/peer.py, seed 2: 800 mm³ took enhancing tumour Dice 0.86 -> 0.62).
CANDIDATES = (NONE, *(Rule(min_mm3=volume) for volume in (10, 25, 50, 100)), Rule(largest_only=True))
MIN_GAIN = 0.005  # validation lesion-wise Dice a rule must add to be kept: noise on a few cases is no gain


@dataclass(frozen=True)
class Choice:
    """A region's chosen rule and the mean validation lesion-wise Dice without (``before``) and with it."""

    rule: Rule
    before: float
    after: float
    cases: int

    def to_dict(self) -> dict:
        return {"rule": self.rule.to_dict(), "description": self.rule.describe(), "val_lesion_dice_before": self.before,
                "val_lesion_dice_after": self.after, "cases": self.cases}


def choose(matches: list[dict[str, LesionMatch]], candidates=CANDIDATES) -> dict[str, Choice]:
    """Each region's best rule over the cases' lesion matches (``[{region: LesionMatch}]``, one
    dict per validation case): the candidate with the highest mean lesion-wise Dice, kept only
    when it beats no postprocessing by :data:`MIN_GAIN` (else the prediction stays as it is)."""
    if not matches:
        return {}
    choices = {}
    for name in matches[0]:
        means = [float(np.mean([case[name].dice(rule.keeps(case[name].component_voxels * case[name].voxel_mm3))
                                for case in matches])) for rule in candidates]
        before = float(np.mean([case[name].dice() for case in matches]))
        best = int(np.argmax(means))
        rule, after = (candidates[best], means[best]) if means[best] >= before + MIN_GAIN else (NONE, before)
        choices[name] = Choice(rule, before, after, len(matches))
    return choices


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
