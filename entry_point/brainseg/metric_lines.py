"""The log lines metrics are read from, and the SageMaker metric regexes that read them: one table.

Each kind of line starts with its own tag (``epoch_metrics``, ``test_metrics``, ``progress``), so a
regex generated for one kind never matches another kind's line, though they share field names
(``lr``, ``patches_per_s``, ``data_wait_fraction``). Torch-free: the launcher imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


@dataclass(frozen=True)
class LineKind:
    """A kind of log line: its tag, its fields in order with their formats, and the SageMaker metric
    each field is published as (fields not in ``metrics`` are for people only)."""

    tag: str
    fields: tuple[tuple[str, str], ...]
    metrics: tuple[tuple[str, str], ...] = ()

    def format(self, values: dict, suffix: str = "") -> str:
        """``<tag> name=value ...`` for the fields present in ``values``, in table order, then the
        values the table does not name (per-structure figures such as ``val_dice_et``) in their order."""
        known = {name for name, _ in self.fields}
        parts = [self.tag] + [f"{name}={values[name]:{spec}}" for name, spec in self.fields if name in values]
        parts += [f"{name}={value:.4f}" if isinstance(value, float) else f"{name}={value}"
                  for name, value in values.items() if name not in known]
        return " ".join(parts) + (f" {suffix}" if suffix else "")

    def definitions(self) -> list[dict]:
        """SageMaker metric definitions (``Name``, ``Regex``) for this kind's published fields."""
        return [{"Name": metric, "Regex": rf"{self.tag}.*?\s{name}={NUMBER}"} for name, metric in self.metrics]


EPOCH = LineKind(
    "epoch_metrics",
    (("epoch", "d"), ("step", "d"), ("train_loss", ".4f"), ("val_dice", ".4f"), ("val_iou", ".4f"),
     ("val_dice_global", ".4f"), ("val_lesion_dice", ".4f"), ("val_lesion_hd95", ".2f"), ("val_loss", ".5f"), ("best_val_dice", ".4f"), ("best_val_loss", ".5f"),
     ("lr", ".3g"), ("patches_per_s", ".2f"), ("data_wait_fraction", ".3f"), ("seconds", ".1f"),
     ("val_seconds", ".1f"), ("gets_per_patch", ".2f"), ("mib_per_patch", ".3f"), ("val_gets", "d"), ("gets", "d"),
     ("cache_hit_fraction", ".3f"), ("request_cost_usd", ".5f"), ("gpu_memory_gib", ".2f")),
    (("train_loss", "train:loss"), ("val_dice", "validation:dice"), ("val_iou", "validation:iou"),
     ("val_loss", "validation:loss"), ("best_val_dice", "validation:best_dice"),
     ("best_val_loss", "validation:best_loss"), ("val_lesion_dice", "validation:lesion_dice"), ("lr", "train:lr"),
     ("patches_per_s", "train:patches_per_s"), ("data_wait_fraction", "train:data_wait_fraction"), ("gets_per_patch", "train:gets_per_patch"),
     ("request_cost_usd", "train:request_cost_usd"), ("gpu_memory_gib", "train:gpu_memory_gib")))
TEST = LineKind(
    "test_metrics",
    (("test_dice", ".4f"), ("test_dice_median", ".4f"), ("test_iou", ".4f"), ("test_hd95", ".2f"),
     ("test_lesion_dice", ".4f"), ("test_lesion_hd95", ".2f"),
     ("test_loss", ".5f"), ("cases", "d"), ("best_epoch", "d"), ("kept_epoch", "d")),
    (("test_dice", "test:dice"), ("test_dice_median", "test:dice_median"), ("test_iou", "test:iou"),
     ("test_hd95", "test:hd95"), ("test_loss", "test:loss"), ("test_lesion_dice", "test:lesion_dice"),
     ("test_lesion_hd95", "test:lesion_hd95")))
PROGRESS = LineKind(
    "progress",
    (("phase", ""), ("step", ""), ("case", ""), ("epoch", "d"), ("loss", ".4f"), ("lr", ".3g"), ("patches_per_s", ".1f"),
     ("data_wait_fraction", ".2f"), ("eta", "")))

METRIC_DEFINITIONS = EPOCH.definitions() + TEST.definitions()
