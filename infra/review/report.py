"""A run comparison as plain text and as an HTML report with PNG figures (matplotlib, Jinja2).

Figures: train loss and validation Dice per epoch (all runs on one plot each), validation Dice of
each structure (WT/TC/ET), learning rate, throughput and data-wait fraction; per run, the test cases
sorted worst first, predicted against true volume per structure and overlays on three orthogonal
slices through the tumour of every sequence (structures coloured; the worst and best case and the
worst of each structure), the ROC curve of study-level detection and, with ``explain``, what the
model looked at in the worst and best case (occlusion sensitivity and gradient saliency); for learning-rate range tests
(task lr_find), loss against learning rate with the suggestions marked.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from jinja2 import Template
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from brainseg.io import s3
from brainseg.overlap import tumour_centre
from infra.review.runs import ReviewedRun, dice_rank, differing_hyperparameters, is_number

DPI = 100
TEMPLATE = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>brainseg runs: {{ names }}</title>
<style>
body { font-family: sans-serif; margin: 2em; max-width: 1100px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #bbb; padding: 0.2em 0.6em; text-align: right; }
th { background: #eee; } td.name { text-align: left; }
.problem { color: #a40; } img { max-width: 100%; border: 1px solid #ddd; }
</style></head>
<body>
<h1>Training runs</h1>
<table>
{% if differing %}<tr><th colspan="8"></th><th colspan="{{ differing|length }}">hyperparameters that differ</th></tr>{% endif %}
<tr><th>run</th><th>started</th><th>status</th><th>last write</th><th>epochs done</th><th>best val Dice</th><th>test Dice mean</th><th>test Dice median</th>
{% for name in differing %}<th>{{ name }}</th>{% endfor %}</tr>
{% for run in runs %}<tr><td class="name">{{ run.name }}</td><td>{{ run.started_text }}</td><td>{{ run.status_text }}</td>
<td>{{ run.updated_text }}</td><td>{{ run.metrics|length }}</td><td>{{ fmt(run.best_val_dice) }}</td><td>{{ fmt(run.test_dice) }}</td>
<td>{{ fmt((run.summary or {}).get("test_dice_median")) }}</td>
{% for name in differing %}<td>{{ run.hyperparameters.get(name) }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% for run in runs %}{% for problem in run.problems %}<p class="problem">{{ run.name }}: {{ problem }}</p>{% endfor %}{% endfor %}
{% if lr_find %}<h2>Learning-rate range tests</h2>
<table><tr><th>run</th><th>suggested lr (steepest descent)</th><th>loss minimum lr / 10</th><th>steps</th><th>diverged</th></tr>
{% for run in runs if run.lr_find %}<tr><td class="name">{{ run.name }}</td><td>{{ "%.2e" % run.lr_find.suggested_lr }}</td>
<td>{{ "%.2e" % run.lr_find.min_loss_lr }}</td><td>{{ run.lr_find.steps }}</td><td>{{ run.lr_find.diverged }}</td></tr>{% endfor %}</table>
<p><img src="{{ lr_find.file }}" alt="{{ lr_find.alt }}"></p>{% endif %}
<h2>Learning curves</h2>
{% for figure in curves %}<p><img src="{{ figure.file }}" alt="{{ figure.alt }}"></p>{% endfor %}
{% for run in runs if not run.lr_find %}
<h2>{{ run.name }}: test cases, worst first</h2>
{% for note in notes[run.name] %}<p>{{ note }}</p>{% endfor %}
{% if importance[run.name] %}<p>Sequence importance: test Dice with each sequence replaced by zeros (its change); a
structure rests on the sequence whose loss costs it most.{% if importance_note[run.name] %} Read as
{{ importance_note[run.name] }}.{% endif %}</p>
<table><tr><th>without</th>{% for name, _, _ in importance[run.name][0][1] %}<th>Dice {{ name }}</th>{% endfor %}</tr>
{% for sequence, cells in importance[run.name] %}<tr><td class="name">{{ sequence }}</td>
{% for name, dice, drop in cells %}<td>{{ "%.3f (%+.3f)" % (dice, -drop) }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
{% if run.per_case %}<table><tr><th>case</th><th>Dice</th><th>IoU</th><th>tumour ml</th><th>predicted ml</th>
{% for name in run.structures %}<th>Dice {{ name }}</th><th>HD95 {{ name }} mm</th>{% endfor %}</tr>
{% for row in run.cases_worst_first() %}<tr><td class="name">{{ row.case_id }}</td><td>{{ row.dice }}</td><td>{{ row.iou }}</td>
<td>{{ row.truth_ml }}</td><td>{{ row.predicted_ml }}</td>
{% for name in run.structures %}<td>{{ row.get("dice_" ~ name, "–") }}</td><td>{{ row.get("hd95_" ~ name, "–") }}</td>{% endfor %}</tr>{% endfor %}</table>
{% else %}<p class="problem">no test evaluation</p>{% endif %}
{% for figure in overlays.get(run.name, []) %}<p><img src="{{ figure.file }}" alt="{{ figure.alt }}"></p>{% endfor %}
{% endfor %}
<script>
// Marks the page once every figure has loaded and decoded, for headless checks.
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  document.body.dataset.images = images.length;
  document.body.dataset.imagesRendered = images.filter(i => i.complete && i.naturalWidth > 0).length;
});
</script>
</body></html>
""", autoescape=True)


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def text_summary(runs: list[ReviewedRun]) -> str:
    """What the report says, for a terminal: one line per run, differing settings, worst cases."""
    differing = differing_hyperparameters(runs)
    now = time.time()
    lines = [f"{'run':34} {'started':20} {'status':12} {'last write':12} {'epochs':>6} {'best val Dice':>13} "
             f"{'test Dice':>9}"]
    for run in runs:
        lines.append(f"{run.name:34} {run.started_text:20} {run.status_text:12} {run.updated_ago(now):12} "
                     f"{len(run.metrics):6d} "
                     f"{_fmt(run.best_val_dice):>13} {_fmt(run.test_dice):>9}")
    if len(runs) > 1:
        lines.append("hyperparameters that differ (in run order):" + ("" if differing else " none"))
        lines += [f"  {name}: {' | '.join(str(run.hyperparameters.get(name)) for run in runs)}" for name in differing]
    for run in runs:
        if run.lr_find:
            lines.append(f"{run.name}: learning-rate range test: suggested lr {run.lr_find['suggested_lr']:.2e} "
                         f"(steepest descent of the smoothed loss), loss minimum lr / 10 = "
                         f"{run.lr_find['min_loss_lr']:.2e}, {run.lr_find['steps']} steps"
                         + (", diverged" if run.lr_find.get("diverged") else ""))
        lines += [f"{run.name}: {text}" for text in run_notes(run)]
        reads = reads_text(run.metrics)
        if reads:
            lines.append(f"{run.name}: {reads}")
        if run.error:
            lines.append(f"{run.name}: failed: {run.error}")
        for problem in run.problems:
            lines.append(f"{run.name}: {problem}")
        worst = run.cases_worst_first()[:3]
        if worst:
            lines.append(f"{run.name}: worst test cases: " + ", ".join(
                f"{row['case_id']} (Dice {float(row['dice']):.3f})" for row in worst))
    return "\n".join(lines)


def run_notes(run: ReviewedRun, importance: bool = True) -> list[str]:
    """The lines that say what a run's summary holds beyond Dice: lesion-wise figures, the
    postprocessing chosen, detection, sequence importance (the HTML report draws it as a table
    instead), its fold."""
    summary = run.summary or {}
    texts = (lesion_text(summary.get("lesion_wise")), postprocessing_text(summary.get("postprocessing")),
             detection_text(summary.get("detection")),
             importance_text(summary.get("sequence_importance")) if importance else "", fold_text(summary))
    return [text for text in texts if text]


def detection_text(detection) -> str:
    """Study- and slice-level detection on the test split (:mod:`brainseg.detection`), or ""."""
    if not isinstance(detection, dict) or not all(is_number(detection.get(key)) for key in (
            "cases", "with_tumour", "tumour_free", "true_positives", "false_negatives", "false_positives",
            "true_negatives")):
        return ""
    threshold = detection.get("threshold") if isinstance(detection.get("threshold"), dict) else {}
    ml = threshold.get("ml")
    auc = detection.get("roc_auc")
    text = (f"detection on {detection['cases']} test studies ({detection['with_tumour']} with tumour, "
            f"{detection['tumour_free']} without), a tumour where the largest predicted component exceeds "
            f"{f'{ml:.3g} ml' if is_number(ml) else '?'} ({threshold.get('chosen_on', '?')}): "
            f"sensitivity {detection['true_positives']}/{detection['with_tumour']}, specificity "
            f"{detection['true_negatives']}/{detection['tumour_free']}, ROC AUC "
            + (f"{auc:.3f}" if is_number(auc) else "– (needs test studies with and without tumour)"))
    slices = detection.get("slices")
    if isinstance(slices, dict) and all(is_number(slices.get(key)) for key in ("found", "missed", "false_alarms", "clean")):
        text += (f"; slices with tumour found {slices['found']}/{slices['found'] + slices['missed']}, slices "
                 f"without flagged {slices['false_alarms']}/{slices['false_alarms'] + slices['clean']}")
    return text


def importance_rows(importance) -> list[tuple[str, list[tuple[str, float, float]]]]:
    """``[(sequence, [(structure, Dice without it, the drop), ...]), ...]`` from summary.json's
    ``sequence_importance``, the sequence that costs most first; empty when there is none."""
    without = importance.get("without") if isinstance(importance, dict) else None
    if not isinstance(without, dict):
        return []
    rows = []
    for sequence, structures in without.items():
        if isinstance(structures, dict):
            cells = [(name, values["dice"], values["dice_drop"]) for name, values in structures.items()
                     if isinstance(values, dict) and is_number(values.get("dice")) and is_number(values.get("dice_drop"))]
            if cells:
                rows.append((sequence, cells))
    return sorted(rows, key=lambda row: -max(drop for _, _, drop in row[1]))


def importance_text(importance) -> str:
    """Which sequence each structure rests on: the test Dice with each sequence replaced by zeros, or ""."""
    rows = importance_rows(importance)
    if not rows:
        return ""
    text = (f"sequence importance (test Dice with the sequence replaced by zeros, change; {importance.get('cases', '?')} "
            "cases): " + "; ".join(f"without {sequence}: " + ", ".join(
                f"{name} {dice:.3f} ({-drop:+.3f})" for name, dice, drop in cells) for sequence, cells in rows))
    reading = importance_note(importance)
    return f"{text}. Read as {reading}" if reading else text


def importance_note(importance) -> str:
    """summary.json's ``sequence_importance`` ``reading`` (information or reliance, and why), or ""."""
    reading = importance.get("reading") if isinstance(importance, dict) else None
    return reading if isinstance(reading, str) else ""


def lesion_text(lesion_wise) -> str:
    """The test split's BraTS lesion-wise figures per structure, or "" (none recorded)."""
    if not isinstance(lesion_wise, dict) or not lesion_wise:
        return ""
    parts = []
    for name, figures in lesion_wise.items():
        if isinstance(figures, dict) and all(is_number(figures.get(key)) for key in ("dice", "hd95")):
            parts.append(f"{name} Dice {figures['dice']:.3f} HD95 {figures['hd95']:.1f} mm "
                         f"({figures.get('lesions', '?')} lesions, {figures.get('false_positives', '?')} false positives)")
    return "lesion-wise test: " + "; ".join(parts) if parts else ""


def postprocessing_text(postprocessing) -> str:
    """What postprocessing the run chose per structure and what it bought on validation, or ""."""
    if not isinstance(postprocessing, dict) or not postprocessing:
        return ""
    parts = []
    for name, choice in postprocessing.items():
        if not (isinstance(choice, dict) and is_number(choice.get("val_lesion_dice_before"))
                and is_number(choice.get("val_lesion_dice_after"))):
            continue
        withheld = choice.get("not_offered") if isinstance(choice.get("not_offered"), dict) else {}
        parts.append(f"{name} {choice.get('description', '?')} ({choice['val_lesion_dice_before']:.3f} -> "
                     f"{choice['val_lesion_dice_after']:.3f})"
                     + "".join(f", not offered: {rule} ({reason})" for rule, reason in withheld.items()))
    return "postprocessing (validation lesion-wise Dice): " + "; ".join(parts) if parts else ""


def fold_text(summary: dict) -> str:
    """``cross-validation fold K of N`` for a fold's run, or ""."""
    fold, folds = summary.get("fold"), summary.get("folds")
    return f"cross-validation fold {fold} of {folds} (0-based)" if isinstance(fold, int) and isinstance(folds, int) else ""


def reads_text(metrics: list[dict]) -> str:
    """What a run's epochs read from S3 and what the requests cost, or "" (runs from before these
    figures)."""
    lines = [line for line in metrics if isinstance(line.get("gets"), (int, float))]
    if not lines:
        return ""
    text = (f"S3 reads: {sum(line['gets'] for line in lines):,} GETs, request fee "
            f"${sum(line.get('request_cost_usd', 0.0) for line in lines):.4f}; GETs per training patch "
            f"{lines[0]['gets_per_patch']:.1f} (epoch {lines[0]['epoch']})")
    if len(lines) > 1:
        text += f" -> {lines[-1]['gets_per_patch']:.1f} (epoch {lines[-1]['epoch']})"
    if "cache_hit_fraction" in lines[-1]:
        text += f"; local cache hits {lines[-1]['cache_hit_fraction']:.0%} in the last epoch"
    return text


def plain_text(text: str) -> str:
    """``text`` drawn as written: a ``$`` (case IDs are folder names) would start matplotlib mathtext."""
    return text.replace("$", r"\$")


def _save(figure, path: Path) -> None:
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)


def curve_figures(runs: list[ReviewedRun], out: Path) -> list[dict]:
    """Loss/Dice, learning rate, throughput/data wait: one line per run."""
    panels = [("curves.png", "train loss and validation Dice per epoch",
               [("train_loss", "train loss"), ("val_dice", "validation Dice")]),
              ("learning_rate.png", "learning rate per epoch", [("lr", "learning rate")]),
              ("throughput.png", "throughput and data-wait fraction per epoch",
               [("patches_per_s", "patches/s"), ("data_wait_fraction", "data-wait fraction")]),
              ("reads.png", "S3 reads per epoch: GETs per training patch and the request fee",
               [("gets_per_patch", "GETs per training patch"), ("request_cost_usd", "request fee (USD)")])]
    figures = []
    for file, alt, series in panels:
        figure, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 3.6), squeeze=False)
        for axis, (key, label) in zip(axes[0], series):
            for run in runs:
                points = [(line["epoch"], line[key]) for line in run.metrics if line.get(key) is not None]
                if points:
                    axis.plot(*zip(*points), marker="o", markersize=3, label=plain_text(run.name))
            axis.set_xlabel("epoch")
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
            if key == "lr":
                axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if axes[0][0].get_legend_handles_labels()[0]:
            axes[0][0].legend(fontsize=8)
        _save(figure, out / file)
        figures.append({"file": file, "alt": alt})
    return figures


def lr_find_figure(runs: list[ReviewedRun], out: Path) -> dict | None:
    """Loss against learning rate (log scale) of every range test, smoothed over the raw points,
    each suggestion marked."""
    tests = [run for run in runs if run.lr_find]
    if not tests:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    for run in tests:
        curve = run.lr_find
        line, = axis.plot(curve["lrs"], curve["smoothed"], label=plain_text(run.name))
        axis.plot(curve["lrs"], curve["losses"], color=line.get_color(), alpha=0.25, linewidth=0.8)
        axis.axvline(curve["suggested_lr"], color=line.get_color(), linestyle="--", linewidth=1)
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel("training loss (smoothed; raw faint)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    _save(figure, out / "lr_find.png")
    return {"file": "lr_find.png", "alt": "training loss against learning rate, suggested rates dashed"}


STRUCTURE_COLOURS = ("#2ca02c", "#ffbf00", "#d62728", "#1f77b4", "#9467bd", "#17becf", "#e377c2", "#8c564b")


def _colour(number: int) -> str:
    """The colour of the ``number``-th structure (1-based), the same in every figure."""
    return STRUCTURE_COLOURS[(number - 1) % len(STRUCTURE_COLOURS)]


def _views(crop: dict) -> list[tuple[str, tuple, float]]:
    """``(name, index, aspect)`` of the axial, coronal and sagittal slices through the crop's tumour
    (the truth's, else the prediction's), each drawn with its voxels' aspect."""
    centre = tumour_centre(crop["mask"], crop["prediction"])
    dz, dy, dx = (float(v) for v in crop["spacing"]) if "spacing" in crop else (1.0, 1.0, 1.0)
    return [("axial", (centre[0], slice(None), slice(None)), dy / dx),
            ("coronal", (slice(None), centre[1], slice(None)), dz / dx),
            ("sagittal", (slice(None), slice(None), centre[2]), dz / dy)]


def overlay_figure(crop: dict, title: str, path: Path, structures: tuple = (), sequences: tuple = ()) -> None:
    """Axial, coronal and sagittal slices through the tumour centre, one row per sequence: the
    image in grey, each true structure outlined and each predicted one filled in its own colour.

    ``crop`` holds ``image`` ``(C, D, H, W)`` or ``(D, H, W)`` and ``mask``/``prediction`` structure
    maps ``(D, H, W)`` (value k = the k-th of ``structures``; 0 = none).
    """
    images = crop["image"].astype(np.float32)
    images = images[None] if images.ndim == 3 else images
    mask, prediction = crop["mask"].astype(np.int16), crop["prediction"].astype(np.int16)
    views = _views(crop)
    count = int(max(mask.max(), prediction.max(), len(structures), 1))
    names = [structures[k] if k < len(structures) else f"structure {k + 1}" for k in range(count)]
    fill = ListedColormap([_colour(k) for k in range(1, count + 1)])
    figure, axes = plt.subplots(len(images), 3, figsize=(11, 3.4 * len(images) + 0.8), squeeze=False,
                                layout="compressed")
    for row, image in enumerate(images):
        low, high = np.percentile(image, [1, 99])
        for axis, (view, index, aspect) in zip(axes[row], views):
            axis.imshow(image[index], cmap="gray", vmin=low, vmax=high, interpolation="nearest", aspect=aspect)
            axis.imshow(np.ma.masked_equal(prediction[index], 0), cmap=fill, vmin=0.5, vmax=count + 0.5, alpha=0.45,
                        interpolation="nearest", aspect=aspect)
            for number in range(1, count + 1):
                if (mask[index] >= number).any():  # nested regions: a structure covers its inner ones
                    axis.contour(mask[index] >= number, levels=[0.5], colors=_colour(number), linewidths=1.0)
            sequence = sequences[row] if row < len(sequences) else f"channel {row}"
            axis.set_title(f"{plain_text(sequence)} {view}", fontsize=9)
            axis.axis("off")
    handles = [Patch(color=_colour(k + 1), label=plain_text(name)) for k, name in enumerate(names)]
    figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    figure.suptitle(plain_text(title) + "\noutline = truth, fill = prediction", fontsize=10)
    _save(figure, path)


def _overlay_picks(run: ReviewedRun) -> list[tuple[str, dict]]:
    """The cases to draw: among the studies with tumour, the worst and best by mean Dice and, with
    several structures, the worst by each structure's Dice; then the tumour-free study with the
    largest false alarm, if any; each case once, with every reason it was picked."""
    listed = run.cases_worst_first()
    free = [row for row in listed if row.get("truth_voxels") == "0"]
    ordered = [row for row in listed if row.get("truth_voxels") != "0"]
    alarms = [row for row in free if row.get("predicted_voxels") not in ("0", None)]
    alarm = [("tumour-free, largest false alarm", max(alarms, key=lambda row: int(row["predicted_voxels"])))] \
        if alarms else []
    if not ordered:
        return alarm
    picks = {ordered[0]["case_id"]: ["worst mean Dice"]}
    rows = {row["case_id"]: row for row in ordered}
    if len(ordered) > 1:
        picks.setdefault(ordered[-1]["case_id"], []).append("best mean Dice")
    for name in run.structures:
        scored = [row for row in ordered if is_number(row.get(f"dice_{name}"))]
        if scored:
            worst = min(scored, key=lambda row: (dice_rank(row[f"dice_{name}"]), row["case_id"]))
            picks.setdefault(worst["case_id"], []).append(f"worst {name} Dice")
    return [(", ".join(reasons), rows[case_id]) for case_id, reasons in picks.items()] + alarm


def explain_figure(crop: dict, occlusion: np.ndarray, saliency: np.ndarray, title: str, path: Path,
                   sequences: tuple) -> None:
    """Axial, coronal and sagittal slices through the tumour: occlusion over the first sequence,
    then each sequence's saliency over it, the true tumour outlined."""
    images = crop["image"].astype(np.float32)
    images = images[None] if images.ndim == 3 else images
    mask = crop["mask"].astype(np.int16) > 0
    views = _views(crop)
    scale = float(saliency.max()) or 1.0
    reach = float(np.abs(occlusion).max()) or 1.0
    rows = [("occlusion (every sequence hidden)", images[0], occlusion, "RdBu_r", -reach, reach)]
    rows += [(f"saliency {sequences[c] if c < len(sequences) else c}", images[c], saliency[c], "inferno", 0.0, scale)
             for c in range(len(images))]
    figure, axes = plt.subplots(len(rows), 3, figsize=(11, 3.3 * len(rows) + 1.0), squeeze=False, layout="compressed")
    for axes_row, (label, image, heat, colours, low_heat, high_heat) in zip(axes, rows):
        low, high = np.percentile(image, [1, 99])
        for axis, (view, index, aspect) in zip(axes_row, views):
            axis.imshow(image[index], cmap="gray", vmin=low, vmax=high, interpolation="nearest", aspect=aspect)
            shown = axis.imshow(heat[index], cmap=colours, vmin=low_heat, vmax=high_heat, alpha=0.55,
                                interpolation="nearest", aspect=aspect)
            if mask[index].any():
                axis.contour(mask[index], levels=[0.5], colors=_colour(1), linewidths=1.0)
            axis.set_title(f"{plain_text(label)}, {view}", fontsize=9)
            axis.axis("off")
        figure.colorbar(shown, ax=axes_row.tolist(), shrink=0.8)
    figure.suptitle(plain_text(title) + "\noutline = true tumour. " + EXPLAIN_READING, fontsize=9, wrap=True)
    _save(figure, path)


EXPLAIN_READING = ("How to read it: occlusion, the share of the predicted tumour lost when that place is hidden "
                   "(red: the model's evidence); saliency, how strongly each sequence's voxels move the prediction "
                   "(bright: read by the model), on one scale for every sequence.")


def explanation_figures(runs: list[ReviewedRun], out: Path) -> dict:
    """``{run name: [figure, ...]}``: occlusion and saliency (:mod:`infra.review.explain`, which
    imports torch) of each run's worst and best test case by mean Dice; a run whose model cannot be
    read gets a note in its problems instead."""
    from brainseg.model.artifact import ModelError
    from infra.review.explain import explain_crop, load_explainer

    figures: dict[str, list[dict]] = {}
    for run in runs:
        chosen = [(reason, row) for reason, row in _overlay_picks(run) if "mean Dice" in reason]
        if not chosen:
            continue
        try:
            loaded = load_explainer(run.uri)
        except (ModelError, s3.S3Error) as err:
            run.notes.append(f"--explain: {err}")
            continue
        for number, (reason, row) in enumerate(chosen):
            crop = run.load_crop(row["case_id"])
            if crop is None:
                continue
            occlusion, saliency = explain_crop(loaded, crop)
            file = f"explain_{run.name}_{number}.png"
            explain_figure(crop, occlusion, saliency, f"{run.name}: what the model looked at in test case "
                                                      f"{row['case_id']} ({reason})", out / file,
                           tuple(loaded.description.sequences))
            figures.setdefault(run.name, []).append(
                {"file": file, "alt": f"occlusion sensitivity and gradient saliency of case {row['case_id']} ({reason})"})
    return figures


def overlay_figures(runs: list[ReviewedRun], out: Path) -> dict:
    overlays = {}
    for run in runs:
        structures = tuple((run.summary or {}).get("structures") or ())
        sequences = tuple(str(run.hyperparameters.get("sequences") or "image").split(","))
        for number, (reason, row) in enumerate(_overlay_picks(run)):
            crop = run.load_crop(row["case_id"])
            if crop is None:
                continue
            scores = " ".join(f"{name} {float(row[f'dice_{name}']):.3f}" for name in run.structures
                              if is_number(row.get(f"dice_{name}")))
            file = f"overlay_{run.name}_{number}.png"
            overlay_figure(crop, f"{run.name}: test case {row['case_id']} ({reason}): Dice {float(row['dice']):.3f}"
                                 + (f" ({scores})" if scores else ""), out / file, structures, sequences)
            overlays.setdefault(run.name, []).append({"file": file, "alt": f"{reason}: case {row['case_id']}"})
    return overlays


def structure_curve_figure(runs: list[ReviewedRun], out: Path) -> dict | None:
    """Validation Dice of each structure per epoch (one panel per structure, a line per run)."""
    names = list(dict.fromkeys(name for run in runs for name in run.structures))
    if not names:
        return None
    figure, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False, sharey=True)
    for axis, name in zip(axes[0], names):
        for run in runs:
            points = [(line["epoch"], line[f"val_dice_{name}"]) for line in run.metrics
                      if isinstance(line.get(f"val_dice_{name}"), (int, float))]
            if points:
                axis.plot(*zip(*points), marker="o", markersize=3, label=plain_text(run.name))
        axis.set_title(f"validation Dice: {plain_text(name)}", fontsize=9)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=8)
    _save(figure, out / "structure_curves.png")
    return {"file": "structure_curves.png", "alt": "validation Dice per structure per epoch"}


def volume_figure(run: ReviewedRun, out: Path) -> dict | None:
    """Predicted against true volume (ml) of each test case, one panel per structure (or the tumour
    as one), with the line of perfect agreement."""
    if not run.per_case:
        return None
    panels = [(name, f"truth_ml_{name}", f"predicted_ml_{name}") for name in run.structures] or \
             [("tumour", "truth_ml", "predicted_ml")]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    for number, (axis, (name, truth, predicted)) in enumerate(zip(axes[0], panels), start=1):
        points = [(float(row[truth]), float(row[predicted])) for row in run.per_case
                  if is_number(row.get(truth)) and is_number(row.get(predicted))]
        if points:
            axis.scatter(*zip(*points), s=14, color=_colour(number))
        top = max([1.0, *(value for point in points for value in point)]) * 1.05
        axis.plot([0, top], [0, top], color="#888", linewidth=0.8, linestyle="--")
        axis.set_xlim(0, top)
        axis.set_ylim(0, top)
        axis.set_aspect("equal")
        axis.set_title(plain_text(name), fontsize=9)
        axis.set_xlabel("true volume (ml)")
        axis.set_ylabel("predicted volume (ml)")
        axis.grid(alpha=0.3)
    figure.suptitle(f"{plain_text(run.name)}: predicted vs true volume per test case", fontsize=10)
    file = f"volumes_{run.name}.png"
    _save(figure, out / file)
    return {"file": file, "alt": f"predicted against true volume of {run.name}'s test cases"}


def roc_figure(run: ReviewedRun, out: Path) -> dict | None:
    """The test split's ROC curve of study-level detection, the run's operating point marked."""
    detection = (run.summary or {}).get("detection")
    curve = detection.get("roc") if isinstance(detection, dict) else None
    if not (isinstance(curve, list) and curve and detection_text(detection)):
        return None
    figure, axis = plt.subplots(figsize=(4.2, 4.2))
    axis.plot(*zip(*curve), marker="o", markersize=3, color=_colour(1), label=f"ROC AUC {detection['roc_auc']:.3f}")
    axis.plot([0, 1], [0, 1], color="#888", linewidth=0.8, linestyle="--", label="chance")
    point = (detection["false_positives"] / max(detection["tumour_free"], 1),
             detection["true_positives"] / max(detection["with_tumour"], 1))
    axis.plot(*point, marker="s", markersize=8, color=_colour(3), linestyle="none", label="the run's threshold")
    axis.set_xlim(-0.02, 1.02)
    axis.set_ylim(-0.02, 1.02)
    axis.set_aspect("equal")
    axis.set_xlabel("false-positive rate (1 - specificity)")
    axis.set_ylabel("true-positive rate (sensitivity)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    axis.set_title(f"{plain_text(run.name)}: is there a tumour? (test studies)", fontsize=9)
    file = f"roc_{run.name}.png"
    _save(figure, out / file)
    return {"file": file, "alt": f"ROC curve of {run.name}'s study-level detection: each point a threshold on the "
                                 "largest predicted component; up and left is better, the diagonal is chance"}


def write_report(runs: list[ReviewedRun], out: Path, explain: bool = False) -> Path:
    """``out/index.html`` and its PNG figures, with ``explain`` the explanation figures
    (:func:`explanation_figures`); returns the HTML path."""
    out.mkdir(parents=True, exist_ok=True)
    curves = curve_figures(runs, out)
    structure_curves = structure_curve_figure(runs, out)
    curves = curves[:1] + ([structure_curves] if structure_curves else []) + curves[1:]
    overlays = overlay_figures(runs, out)
    for run in runs:
        figures = [figure for figure in (volume_figure(run, out), roc_figure(run, out)) if figure]
        overlays[run.name] = [*figures, *overlays.get(run.name, [])]
    if explain:
        for name, figures in explanation_figures(runs, out).items():
            overlays[name] += figures
    page = TEMPLATE.render(runs=runs, names=", ".join(run.name for run in runs), curves=curves,
                           lr_find=lr_find_figure(runs, out), notes={run.name: run_notes(run, importance=False) for run in runs},
                           importance={run.name: importance_rows((run.summary or {}).get("sequence_importance"))
                                       for run in runs},
                           importance_note={run.name: importance_note((run.summary or {}).get("sequence_importance"))
                                               for run in runs},
                           overlays=overlays, differing=differing_hyperparameters(runs), fmt=_fmt)
    path = out / "index.html"
    path.write_text(page)
    return path
