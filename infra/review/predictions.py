"""Review what a prediction job wrote (layout in :mod:`brainseg.prediction.options`): whether it is
complete, every case's status and predicted volumes (and scores where masks existed), and overlays
of a case's DICOM SEG on its source images.

The SEG is read by the same ranged SEG reader training uses for masks, onto the source series: its
frames land where their patient positions put them, as a viewer would draw them. Nothing is
written to S3.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brainseg.data.index import read_header
from brainseg.data.quality import assemble_series
from brainseg.data.segmentation import SegmentationMask
from brainseg.io import s3
from brainseg.layout import PredictionLayout
from infra.review import source


@dataclass
class ReviewedPrediction:
    """A prediction output: its settings, completion and per-case rows."""

    uri: str
    settings: dict
    complete: dict | None
    rows: list = field(default_factory=list)

    @property
    def structures(self) -> list[str]:
        return [key.removeprefix("predicted_ml_") for key in (self.rows[0] if self.rows else {})
                if key.startswith("predicted_ml_")]

    @property
    def sequence(self) -> str:
        """The sequence the SEGs reference (the models' first)."""
        return self.settings["models"][0]["sequences"][0]

    @property
    def data_uri(self) -> str:
        return self.settings["options"]["data_uri"]

    def status_text(self) -> str:
        if self.complete is None:
            shards = self.settings.get("shards", 1)
            return f"incomplete: no {PredictionLayout.COMPLETE} yet ({shards} shard(s); running, or stopped early)"
        counts = ", ".join(f"{self.complete[name]} {name}" for name in ("predicted", "skipped", "excluded")
                           if name in self.complete)
        return f"complete: {counts}"


def _csv(data: bytes | None) -> list[dict]:
    return list(csv.DictReader(io.StringIO(data.decode()))) if data else []


def is_prediction_output(uri: str) -> bool:
    return source.read(uri.rstrip("/") + "/" + PredictionLayout.SETTINGS) is not None


def load_prediction(uri: str) -> ReviewedPrediction:
    """The output under ``uri``; an incomplete one lists the cases whose ``volumes.csv`` exist.

    Raises:
        ValueError: ``uri`` holds no ``prediction.json``.
    """
    uri = uri.rstrip("/") + "/"
    settings = source.read(uri + PredictionLayout.SETTINGS)
    if settings is None:
        raise ValueError(f"{uri} is not a prediction output (no {PredictionLayout.SETTINGS})")
    complete = source.read(uri + PredictionLayout.COMPLETE)
    rows = _csv(source.read(uri + PredictionLayout.MERGED)) if complete else []
    if not complete:
        for folder in source.list_folders(uri):
            rows += _csv(source.read(f"{folder}volumes.csv"))
    return ReviewedPrediction(uri, json.loads(settings), json.loads(complete) if complete else None, rows)


def text_summary(prediction: ReviewedPrediction) -> str:
    """The output's status and a line per case: predicted ml per structure, Dice where scored."""
    lines = [f"{prediction.uri}: {prediction.status_text()}",
             "models: " + ", ".join(model["source"] for model in prediction.settings["models"])]
    names = prediction.structures
    header = ["case", "status", *[f"{name} ml" for name in names], *[f"Dice {name}" for name in names]]
    table = [header]
    for row in prediction.rows:
        if row["status"] != "predicted":
            table.append([row["case_id"], row["status"], row.get("reason", "")])
            continue
        table.append([row["case_id"], row["status"], *[row.get(f"predicted_ml_{n}", "") for n in names],
                      *[row.get(f"dice_{n}", "") or "–" for n in names]])
    widths = [max(len(str(line[i])) for line in table if i < len(line)) for i in range(len(header))]
    for line in table:
        lines.append("  ".join(str(value).ljust(width) for value, width in zip(line, widths)).rstrip()
                     + ("  " + "  ".join(line[len(widths):]) if len(line) > len(widths) else ""))
    return "\n".join(lines)


def seg_overlay(prediction: ReviewedPrediction, case_id: str) -> dict:
    """``{"image", "mask", "prediction", "spacing"}`` of a case for :func:`infra.review.report.overlay_figure`:
    the source series and its SEG, both read by brainseg's own readers (the SEG placed on the source
    planes by patient position, as training reads a SEG mask), no truth. ``prediction`` holds the
    highest segment number covering each voxel.

    Raises:
        QualityError: the source series or the SEG cannot be read, or the SEG is off the source's planes.
    """
    bucket, prefix = s3.parse_uri(f"{prediction.data_uri.rstrip('/')}/{case_id}/{prediction.sequence}/")
    series = assemble_series(bucket, prediction.sequence,
                             [read_header(bucket, info) for info in s3.list_objects(bucket, prefix)])
    seg_bucket, seg_key = s3.parse_uri(prediction.uri + PredictionLayout.segmentation(case_id))
    [info] = [info for info in s3.list_objects(seg_bucket, seg_key) if info.key == seg_key]
    labels = SegmentationMask.on_grid(seg_bucket, read_header(seg_bucket, info), series, prediction.sequence)
    predicted = labels.read_volume().astype(np.uint8)
    return {"image": series.read_volume(), "mask": np.zeros_like(predicted), "prediction": predicted,
            "spacing": np.asarray(series.spacing, dtype=np.float32)}


def write_prediction_report(prediction: ReviewedPrediction, out: Path, cases: int = 6) -> Path:
    """``out/predictions.html``: the case table and overlays of up to ``cases`` predicted cases
    (the largest predicted volumes first; overlays need the output in S3, beside its source series)."""
    from jinja2 import Template

    from infra.review.report import overlay_figure

    out.mkdir(parents=True, exist_ok=True)
    names = prediction.structures
    predicted = [row for row in prediction.rows if row["status"] == "predicted"]
    largest = sorted(predicted, key=lambda row: -sum(float(row.get(f"predicted_ml_{n}") or 0) for n in names))
    figures = []
    for row in largest[:cases] if not source.is_local(prediction.uri) else ():
        file = f"seg_{row['case_id']}.png"
        overlay_figure(seg_overlay(prediction, row["case_id"]), f"{row['case_id']}: DICOM SEG on {prediction.sequence}",
                       out / file, tuple(names), (prediction.sequence,))
        figures.append({"file": file, "alt": f"SEG of case {row['case_id']}"})
    page = Template(PAGE, autoescape=True).render(p=prediction, names=names, figures=figures)
    path = out / "predictions.html"
    path.write_text(page)
    return path


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>brainseg predictions</title>
<style>body { font-family: sans-serif; margin: 2em; max-width: 1100px; }
table { border-collapse: collapse; } td, th { border: 1px solid #bbb; padding: 0.2em 0.6em; text-align: right; }
th { background: #eee; } td.name { text-align: left; } img { max-width: 100%; }</style></head>
<body><h1>Predictions {{ p.uri }}</h1><p>{{ p.status_text() }}</p>
<table><tr><th>case</th><th>status</th>{% for n in names %}<th>{{ n }} ml</th><th>Dice {{ n }}</th>{% endfor %}<th>note</th></tr>
{% for row in p.rows %}<tr><td class="name">{{ row.case_id }}</td><td>{{ row.status }}</td>
{% for n in names %}<td>{{ row.get("predicted_ml_" ~ n, "") }}</td><td>{{ row.get("dice_" ~ n) or "–" }}</td>{% endfor %}
<td class="name">{{ row.get("reason", "") }}</td></tr>{% endfor %}</table>
{% for figure in figures %}<p><img src="{{ figure.file }}" alt="{{ figure.alt }}"></p>{% endfor %}
</body></html>
"""
