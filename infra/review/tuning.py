"""A tuning job's runs side by side: each run's tuned hyperparameters and objective, best first.

The tuning job's folder (``<output_uri>/<tuning job>/``) holds ``tuning.json``, written by
``brainseg-launch tune`` (strategy, objective, ranges; in process mode also each job's values); its
runs are the run folders beside it named ``<tuning job>-NNN-xxxxxxxx`` (as SageMaker names a tuning
job's training jobs), read like any run. The objective is read from each run's own epoch lines.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from brainseg.layout import TuningLayout
from infra.launcher.tuning import last_value, objective_field
from infra.review import source
from infra.review.runs import ReviewedRun, list_runs


def is_tuning_output(uri: str) -> bool:
    return source.read(f"{uri.rstrip('/')}/{TuningLayout.MANIFEST}") is not None


@dataclass
class ReviewedTuning:
    manifest: dict
    runs: list  # ReviewedRun, as found under the output URI

    @property
    def name(self) -> str:
        return self.manifest["tuning_job"]

    @property
    def tuned(self) -> list[str]:
        return list(self.manifest.get("ranges", {}))

    def objective(self, run: ReviewedRun) -> float | None:
        """The last value of the objective's field in the run's epoch lines."""
        return last_value(run.metrics, objective_field(self.manifest["objective"]["metric"]))

    def ranked(self) -> list[ReviewedRun]:
        """The runs best first by the objective; runs without a value last."""
        sign = -1 if self.manifest["objective"]["type"] == "Maximize" else 1

        def key(run):
            value = self.objective(run)
            return (value is None or math.isnan(value), sign * (value or 0.0), run.name)
        return sorted(self.runs, key=key)


def load_tuning(uri: str) -> ReviewedTuning:
    """The tuning job recorded at ``uri`` and its runs."""
    data = source.read(f"{uri.rstrip('/')}/{TuningLayout.MANIFEST}")
    try:
        manifest = json.loads(data)
        name, output_uri = manifest["tuning_job"], manifest["output_uri"]
        manifest["objective"]["metric"], manifest["objective"]["type"]
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{uri.rstrip('/')}/{TuningLayout.MANIFEST}: not a tuning record ({err!r})") from None
    return ReviewedTuning(manifest, list_runs(output_uri, f"{name}-"))


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "–" if value is None else str(value)


def text_summary(tuning: ReviewedTuning) -> str:
    manifest = tuning.manifest
    objective = manifest["objective"]
    planned = manifest.get("max_jobs")
    lines = [f"tuning job {tuning.name} ({manifest.get('mode', '?')}, {manifest['strategy']}, {objective['type']} "
             f"{objective['metric']}): {len(tuning.runs)} run(s) found" + (f" of {planned}" if planned else "")]
    header = f"  {'run':44} {'status':12} {objective['metric']:>22}  " + "  ".join(f"{n:>12}" for n in tuning.tuned)
    lines.append(header)
    for run in tuning.ranked():
        lines.append(f"  {run.name:44} {run.status_text:12} {_value(tuning.objective(run)):>22}  "
                     + "  ".join(f"{_value(run.hyperparameters.get(n)):>12}" for n in tuning.tuned))
    if not tuning.runs:
        lines.append("  no runs yet (the tuning job's training jobs write <output>/<tuning job>-NNN-…/)")
    return "\n".join(lines)
