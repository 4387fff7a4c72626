"""Optional experiment tracking in MLflow (SageMaker's managed MLflow, or any tracking server).

With ``--mlflow-tracking-uri`` (a SageMaker MLflow tracking server ARN, or an http(s) URL), rank 0
logs the hyperparameters, every epoch line, the summary and the final model (an MLflow model:
:mod:`brainseg.model.mlflow_model`) to an MLflow run named after the brainseg run; a resumed run continues the same MLflow run (found by its ``brainseg.run_name`` tag). S3 stays
the source of truth: a tracking server that cannot be reached or refuses a call costs a warning and
turns tracking off for the rest of the run, never the run itself. Only case IDs and figures are
logged, never header values.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

logger = logging.getLogger("brainseg.train")
RUN_TAG = "brainseg.run_name"
# MLflow's HTTP client retries 7 times with exponential backoff by default: minutes before an
# unreachable server is given up. Tracking is optional, so it gets little of the job's time.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class Tracker:
    """Logs to MLflow when ``uri`` is set; every method is a no-op otherwise (and after a failure)."""

    def __init__(self, uri: str, experiment: str):
        self.uri, self.experiment = uri, experiment
        self.mlflow = None
        self.run_id = ""

    def _guard(self, what: str, call) -> None:
        if self.mlflow is None:
            return
        try:
            call()
        except Exception as err:
            logger.warning("MLflow %s failed (%s: %s); tracking is off for the rest of this run (S3 has "
                           "everything)", what, type(err).__name__, str(err)[:300])
            self.mlflow = None

    def start(self, run_name: str, hyperparameters: dict) -> None:
        if not self.uri:
            return
        try:
            import mlflow
        except ImportError:
            logger.warning("--mlflow-tracking-uri is set but mlflow is not installed (pip install mlflow-skinny "
                           "sagemaker-mlflow); tracking is off")
            return
        self.mlflow = mlflow
        for name, value in CLIENT_DEFAULTS.items():
            os.environ.setdefault(name, value)

        def begin():
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_experiment(self.experiment)
            found = mlflow.search_runs(experiment_names=[self.experiment], output_format="list",
                                       filter_string=f"tags.`{RUN_TAG}` = '{run_name}'")
            if found:
                run = mlflow.start_run(run_id=found[0].info.run_id)
                logger.info("MLflow: continuing run %s in experiment %s", run.info.run_id, self.experiment)
            else:
                run = mlflow.start_run(run_name=run_name, tags={RUN_TAG: run_name})
                mlflow.log_params({name: str(value)[:6000] for name, value in hyperparameters.items()})
                logger.info("MLflow: run %s in experiment %s at %s", run.info.run_id, self.experiment,
                            self.uri.split("/")[0] if self.uri.startswith("arn:") else self.uri)
            self.run_id = run.info.run_id
        self._guard("start", begin)

    def epoch(self, line: dict) -> None:
        figures = {name: float(value) for name, value in line.items() if name != "epoch"
                   and isinstance(value, (int, float)) and math.isfinite(value)}
        self._guard("log_metrics", lambda: self.mlflow.log_metrics(figures, step=int(line["epoch"])))

    def summary(self, summary: dict) -> None:
        figures = {f"final_{name}": float(value) for name, value in summary.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}

        def log():
            self.mlflow.log_metrics(figures)
            self.mlflow.log_dict(summary, "summary.json")
        self._guard("summary", log)

    def model(self, model_dir: str, description) -> None:
        """Log the written model (``model_dir``'s ``model.pt``) as an MLflow model with its description;
        a failure is a warning that leaves the rest of the tracking on (the run is still ended)."""
        if self.mlflow is None:
            return
        try:
            from brainseg.model.mlflow_model import log_model
            from brainseg.run.state import CODE_ROOT

            logger.info("MLflow: model logged as %s", log_model(Path(model_dir), description, CODE_ROOT))
        except Exception as err:
            logger.warning("MLflow: the model could not be logged (%s: %s); S3 has it", type(err).__name__,
                           str(err)[:300])

    def end(self, status: str) -> None:
        """``status``: FINISHED, FAILED or KILLED (interrupted; a resume continues the run)."""
        self._guard("end", lambda: self.mlflow.end_run(status=status))
