"""Hyperparameter tuning: the ranges, strategy and objective of a tuning job, checked, and the
process-mode search that runs one on this machine. No torch, no SageMaker SDK here.

``brainseg-launch tune`` builds a :class:`TuningSpec` from a YAML file (``--tuning``) and flags
(``--range lr=1e-4:1e-2:log``, ``--range 'loss=[dice_ce, dice]'``); ``aws`` hands it to SageMaker's
``HyperparameterTuner`` (:mod:`infra.launcher.sagemaker_job`), ``process`` samples the jobs itself
(Random or Grid; Bayesian and Hyperband need SageMaker's tuner) and runs them as process-mode jobs.

Both write ``<output_uri>/<tuning job>/tuning.json`` (:class:`TuningLayout`): the strategy, objective
and ranges, and in process mode every job's hyperparameters and objective value. The runs
themselves are ``<output_uri>/<tuning job>-NNN-xxxxxxxx/``, named as SageMaker names a tuning job's
training jobs, so the review finds them either way.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import yaml

from brainseg.config import Hyperparameters
from brainseg.flags import validate_overrides
from brainseg.io import s3
from brainseg.layout import RunLayout, TuningLayout
from brainseg.metric_lines import EPOCH, METRIC_DEFINITIONS
from infra.launcher import process_job
from infra.launcher.jobspec import JobSpec, read_yaml

STRATEGIES = ("Bayesian", "Random", "Hyperband", "Grid")
PROCESS_STRATEGIES = ("Random", "Grid")
SCALINGS = {"auto": "Auto", "linear": "Linear", "log": "Logarithmic", "logarithmic": "Logarithmic",
            "reverse-log": "ReverseLogarithmic", "reverselogarithmic": "ReverseLogarithmic"}
EARLY_STOPPING = ("Off", "Auto")
MAX_NAME = 32  # SageMaker's limit for a tuning job's name
# The running best validation figure of each task, published on every epoch line: its last value is
# the run's best, which is what a tuning job should compare (the last val_dice is not the best).
OBJECTIVES = {"segmentation": ("validation:best_dice", "Maximize"), "autoencoder": ("validation:best_loss", "Minimize")}
RESERVED = ("data_uri", "output_uri", "run_name")


@dataclass(frozen=True)
class Range:
    """One tuned hyperparameter: ``continuous`` or ``integer`` between ``low`` and ``high`` on a
    ``scaling``, or ``categorical`` over ``values``."""

    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    scaling: str = "Auto"
    values: tuple = ()

    def __post_init__(self) -> None:
        if self.kind == "categorical":
            if len(self.values) < 1:
                raise ValueError(f"range {self.name}: expected at least one value")
            return
        if not self.low < self.high:
            raise ValueError(f"range {self.name}: expected min < max, got {self.low} and {self.high}")
        if self.scaling in ("Logarithmic", "ReverseLogarithmic") and self.low <= 0:
            raise ValueError(f"range {self.name}: {self.scaling} scaling needs min > 0, got {self.low}")
        if self.scaling == "ReverseLogarithmic" and self.high >= 1:
            raise ValueError(f"range {self.name}: ReverseLogarithmic scaling needs max < 1, got {self.high}")

    def sample(self, rng: random.Random):
        """One value drawn as SageMaker's random search draws it (Auto: log for a positive range
        spanning over a decade, else linear)."""
        if self.kind == "categorical":
            return rng.choice(self.values)
        scaling = self.scaling
        if scaling == "Auto":
            scaling = "Logarithmic" if self.low > 0 and self.high / self.low >= 10 else "Linear"
        u = rng.random()
        if scaling == "Logarithmic":
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        elif scaling == "ReverseLogarithmic":
            value = 1 - math.exp(math.log(1 - self.high) + u * (math.log(1 - self.low) - math.log(1 - self.high)))
        else:
            value = self.low + u * (self.high - self.low)
        return min(max(round(value), int(self.low)), int(self.high)) if self.kind == "integer" else value

    def to_dict(self) -> dict:
        if self.kind == "categorical":
            return {"type": "categorical", "values": list(self.values)}
        return {"type": self.kind, "min": self.low, "max": self.high, "scaling": self.scaling}


def _number(text, name: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ValueError(f"range {name}: {text!r} is not a number") from None


def make_range(name: str, value) -> Range:
    """A range from its YAML form: a list (categorical) or ``{min, max, scaling, type}``."""
    name = str(name).replace("-", "_")
    if isinstance(value, (list, tuple)):
        return Range(name, "categorical", values=tuple(value))
    if not isinstance(value, dict) or not {"min", "max"} <= set(value):
        raise ValueError(f"range {name}: expected a list of values or a mapping with min and max, got {value!r}")
    unknown = set(value) - {"min", "max", "scaling", "type"}
    if unknown:
        raise ValueError(f"range {name}: unknown key(s) {', '.join(sorted(unknown))} (min, max, scaling, type)")
    scaling = SCALINGS.get(str(value.get("scaling", "auto")).lower().replace("_", "-"))
    if scaling is None:
        raise ValueError(f"range {name}: scaling {value.get('scaling')!r}: expected one of "
                         "auto, linear, log, reverse-log")
    low, high = _number(value["min"], name), _number(value["max"], name)
    kind = value.get("type") or ("integer" if all(isinstance(value[k], int) and not isinstance(value[k], bool)
                                                   for k in ("min", "max")) else "continuous")
    if kind not in ("integer", "continuous"):
        raise ValueError(f"range {name}: type {kind!r}: expected integer or continuous")
    return Range(name, kind, low, high, scaling)


def parse_range(text: str) -> Range:
    """``--range`` flags: ``lr=1e-4:1e-2[:log]`` (integers if both ends are), or a YAML list for a
    categorical range, ``'loss=[dice_ce, dice]'``."""
    name, sep, spec = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--range {text!r}: expected name=min:max[:scaling] or name=[a, b, ...]")
    spec = spec.strip()
    if spec.startswith("["):
        try:
            values = yaml.safe_load(spec)
        except yaml.YAMLError:
            values = None
        if not isinstance(values, list):
            raise ValueError(f"--range {text!r}: expected a YAML list of values, e.g. [dice_ce, dice]")
        return make_range(name.strip(), values)
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"--range {text!r}: expected name=min:max[:scaling] or name=[a, b, ...]")
    ends = [yaml.safe_load(part) for part in parts[:2]]
    return make_range(name.strip(), {"min": ends[0], "max": ends[1], **({"scaling": parts[2]} if len(parts) == 3 else {})})


@dataclass(frozen=True)
class TuningSpec:
    """A tuning job: what is searched (``ranges``), how (``strategy``), for what (``objective``), how much."""

    ranges: tuple = ()
    strategy: str = "Bayesian"
    objective: str = ""  # a published metric; empty: the task's running best validation figure
    objective_type: str = ""  # Maximize or Minimize; empty: the objective's own
    max_jobs: int = 0  # 0: 10, or every combination for Grid
    max_parallel_jobs: int = 1
    early_stopping: str = "Off"
    random_seed: int = 0  # 0: a fresh seed each search (process mode records the one it drew)
    min_epochs: int = 1  # Hyperband: epochs every job is given before it may be stopped

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if not self.ranges:
            raise ValueError("a tuning job needs at least one --range (or ranges: in the --tuning file)")
        names = [r.name for r in self.ranges]
        if len(set(names)) != len(names):
            raise ValueError(f"ranges: {sorted({n for n in names if names.count(n) > 1})} given twice")
        if self.strategy == "Grid" and any(r.kind != "categorical" for r in self.ranges):
            raise ValueError("Grid search takes categorical ranges only (lists of values); "
                             f"{', '.join(r.name for r in self.ranges if r.kind != 'categorical')} are not")
        if self.early_stopping not in EARLY_STOPPING:
            raise ValueError(f"early_stopping {self.early_stopping!r}: expected Off or Auto")
        if self.strategy == "Hyperband" and self.early_stopping != "Off":
            raise ValueError("Hyperband stops jobs itself; early_stopping must be Off")
        if self.max_jobs < 0 or self.max_parallel_jobs < 1 or self.min_epochs < 1:
            raise ValueError(f"max_jobs {self.max_jobs}, max_parallel_jobs {self.max_parallel_jobs}, min_epochs "
                             f"{self.min_epochs}: expected max_jobs >= 0 (0: default) and the others >= 1")
        published = {d["Name"] for d in METRIC_DEFINITIONS}
        if self.objective and self.objective not in published:
            raise ValueError(f"objective {self.objective!r}: expected a published metric: {', '.join(sorted(published))}")
        if self.objective_type not in ("", "Maximize", "Minimize"):
            raise ValueError(f"objective_type {self.objective_type!r}: expected Maximize or Minimize")

    @property
    def grid_size(self) -> int:
        return math.prod(len(r.values) for r in self.ranges)

    @property
    def jobs(self) -> int:
        """How many training jobs the search starts at most."""
        if self.strategy == "Grid":
            return min(self.max_jobs, self.grid_size) if self.max_jobs else self.grid_size
        return self.max_jobs or 10

    def objective_for(self, task: str) -> tuple[str, str]:
        metric, kind = OBJECTIVES[task] if task in OBJECTIVES else OBJECTIVES["segmentation"]
        metric = self.objective or metric
        if not self.objective_type:
            kind = "Minimize" if "loss" in metric or "hd95" in metric else "Maximize"
        return metric, self.objective_type or kind

    def check(self, spec: JobSpec) -> None:
        """Every range names a train.py hyperparameter that the job does not fix, and both its ends
        (or each of its values) are valid values of it.

        Raises:
            ValueError: the first that is not, with the reason.
        """
        if not spec.training:
            raise ValueError("tuning runs train.py jobs")
        for r in self.ranges:
            if r.name in RESERVED:
                raise ValueError(f"range {r.name}: set by the launcher, not tunable")
            if r.name in spec.hyperparameters:
                raise ValueError(f"{r.name} is both fixed (--hp) and tuned (--range); drop one")
            for value in (r.values if r.kind == "categorical" else (r.low, r.high)):
                value = int(value) if r.kind == "integer" else value
                validate_overrides({**spec.training_hyperparameters(), r.name: value})
        task = spec.hyperparameters.get("task", Hyperparameters.task)
        if task == "lr_find":
            raise ValueError("task lr_find has no validation figure to tune for")

    def sample(self, seed: int | None = None) -> list[dict]:
        """The jobs' tuned values, for the strategies process mode runs: Random draws ``jobs``
        settings from ``seed`` (default ``random_seed``), Grid walks every combination in order."""
        if self.strategy not in PROCESS_STRATEGIES:
            raise ValueError(f"strategy {self.strategy} needs SageMaker's tuner (--mode aws); process mode runs "
                             f"{' or '.join(PROCESS_STRATEGIES)}")
        if self.strategy == "Grid":
            grid = itertools.product(*(r.values for r in self.ranges))
            return [dict(zip((r.name for r in self.ranges), values)) for values in itertools.islice(grid, self.jobs)]
        rng = random.Random(self.random_seed if seed is None else seed)
        return [{r.name: r.sample(rng) for r in self.ranges} for _ in range(self.jobs)]

    def manifest(self, name: str, spec: JobSpec, mode: str) -> dict:
        metric, kind = self.objective_for(spec.hyperparameters.get("task", Hyperparameters.task))
        return {"tuning_job": name, "mode": mode, "strategy": self.strategy,
                "objective": {"metric": metric, "type": kind}, "max_jobs": self.jobs,
                "max_parallel_jobs": self.max_parallel_jobs, "early_stopping": self.early_stopping,
                "ranges": {r.name: r.to_dict() for r in self.ranges}, "static": spec.hyperparameters,
                "output_uri": spec.output_uri, "jobs": []}


def load_tuning(path: str | None) -> dict:
    """The ``--tuning`` YAML file as :class:`TuningSpec` settings (``ranges:`` a mapping)."""
    if not path:
        return {}
    data = read_yaml(path, "--tuning")
    known = set(TuningSpec.__dataclass_fields__)
    if set(data) - known:
        raise ValueError(f"--tuning {path}: unknown setting(s) {', '.join(sorted(set(data) - known))}; known: "
                         f"{', '.join(sorted(known))}")
    ranges = data.get("ranges") or {}
    if not isinstance(ranges, dict):
        raise ValueError(f"--tuning {path}: ranges: expected a mapping of hyperparameter to range")
    return {**data, "ranges": tuple(make_range(name, value) for name, value in ranges.items())}


def tuning_job_name(base: str) -> str:
    """``<base>-YYMMDD-HHMM``, at most 32 characters, as the SDK names tuning jobs."""
    stamp = datetime.now().strftime("%y%m%d-%H%M")
    return f"{base.replace('_', '-')[:MAX_NAME - len(stamp) - 1]}-{stamp}"


def training_job_name(tuning_name: str, index: int, values: dict) -> str:
    """``<tuning job>-NNN-xxxxxxxx``: a tuning job's training job, named as SageMaker names them."""
    digest = hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{tuning_name}-{index:03d}-{digest}"


def objective_field(metric: str) -> str:
    """The epoch-line field a published epoch metric reads."""
    for name, published in EPOCH.metrics:
        if published == metric:
            return name
    raise ValueError(f"objective {metric}: process mode reads epoch metrics only "
                     f"({', '.join(published for _, published in EPOCH.metrics)})")


@dataclass
class TuningResult:
    """A finished process-mode search: its record, as written to ``tuning.json``."""

    manifest: dict
    codes: list = field(default_factory=list)

    @property
    def best(self) -> dict | None:
        scored = [job for job in self.manifest["jobs"] if job.get("objective") is not None]
        if not scored:
            return None
        sign = 1 if self.manifest["objective"]["type"] == "Maximize" else -1
        return max(scored, key=lambda job: sign * job["objective"])


class _Tagged:
    """A sink that starts every line with its job's tag (several jobs write at once)."""

    def __init__(self, sink, tag: str):
        self.sink, self.tag = sink, tag

    def write(self, text: str) -> None:
        self.sink.write(self.tag + text)

    def flush(self) -> None:
        self.sink.flush()


def last_value(lines: list[dict], metric_field: str) -> float | None:
    """The last value of ``metric_field`` in a run's epoch lines (what SageMaker would read last
    from its log), or ``None`` when none holds it."""
    values = [line[metric_field] for line in lines if isinstance(line.get(metric_field), (int, float))]
    return values[-1] if values else None


def _objective(output_uri: str, job: str, metric_field: str) -> float | None:
    data = s3.read_uri(f"{output_uri.rstrip('/')}/{job}/{RunLayout.METRICS}")
    return last_value([json.loads(line) for line in data.splitlines()] if data else [], metric_field)


def search(spec: JobSpec, tuning: TuningSpec, name: str, root: Path, sink=None) -> TuningResult:
    """Run ``tuning`` as process-mode jobs under ``root`` (``max_parallel_jobs`` at a time), keeping
    ``tuning.json`` up to date: written before the first job and after each one ends."""
    sink = sink or sys.stdout
    manifest = tuning.manifest(name, spec, "process")
    metric_field = objective_field(manifest["objective"]["metric"])
    manifest["random_seed"] = tuning.random_seed or random.SystemRandom().randrange(1, 2**31)
    planned = [(training_job_name(name, index, values), values)
               for index, values in enumerate(tuning.sample(manifest["random_seed"]), 1)]
    manifest["jobs"] = [{"job": job, "hyperparameters": values, "status": "pending"} for job, values in planned]
    where = TuningLayout.uri(spec.output_uri, name)
    lock = threading.Lock()

    def record(position: int | None = None, **update) -> None:
        with lock:
            if position is not None:
                manifest["jobs"][position].update(update)
            s3.put_bytes(where, json.dumps(manifest, indent=1, default=str).encode())

    def run_one(position: int) -> int:
        job, values = planned[position]
        record(position, status="running")
        code = process_job.run(replace(spec, hyperparameters={**spec.hyperparameters, **values}), job, root / job,
                               sink=_Tagged(sink, f"{job[len(name) + 1:len(name) + 4]} | "))
        record(position, status="completed" if code == 0 else "failed", exit_code=code,
               objective=_objective(spec.output_uri, job, metric_field))
        return code

    record()

    with ThreadPoolExecutor(tuning.max_parallel_jobs) as pool:
        codes = list(pool.map(run_one, range(len(planned))))
    return TuningResult(manifest, codes)
