"""Every path the product writes, in one place: a training run's folder (:class:`RunLayout`), a
prediction output (:class:`PredictionLayout`) and a tuning job's record (:class:`TuningLayout`).
The jobs write by these names and the launcher and the review read by them; no torch.
"""

from __future__ import annotations


class RunLayout:
    """Every path of a run, relative to ``<output_uri>/<run_name>/``."""

    STATUS = "run.json"  # running/finished/failed/interrupted, start time, hyperparameters
    OWNER = "owner.json"  # which job writes this run (brainseg.run.ownership)
    CHECKPOINTS = "checkpoints/"  # training states and their records (brainseg.run.checkpoint)
    METRICS = "metrics/metrics.jsonl"  # one JSON line per epoch
    TEST_CASES = "metrics/test_per_case.csv"  # final test evaluation, one row per case
    MODEL = "model/model.pt"  # the kept weights (--keep-weights) and their description (brainseg.model.artifact)
    MODEL_DESCRIPTION = "model/model.json"  # the description alone, readable without torch
    ENCODER = "model/encoder.pt"  # the encoder of an autoencoder run's kept weights
    SUMMARY = "summary.json"  # headline results
    PLAN = "plan.json"  # the plan of --plan auto: fingerprint, choices and why (brainseg.run.plan)
    VALIDATION_MATCHES = "metrics/validation_lesions.json"  # the kept weights' validation lesion matches and the
    # postprocessing offered (what a cross-validation pools to choose the folds' postprocessing)
    LR_FIND = "lr_find.json"  # a learning-rate range test's curve and suggestion (task lr_find)

    @staticmethod
    def checkpoint(name: str) -> str:
        return RunLayout.CHECKPOINTS + name

    @staticmethod
    def prediction(case_id: str) -> str:
        """Image, mask and prediction around the tumour of a test case (a bounded crop)."""
        return f"predictions/{case_id}.npz"


class PredictionLayout:
    """Every path of a prediction output, relative to ``<output_uri>/``."""

    SETTINGS = "prediction.json"
    MERGED = "predictions.csv"
    COMPLETE = "complete.json"

    @staticmethod
    def segmentation(case_id: str) -> str:
        return f"{case_id}/segmentation.dcm"

    @staticmethod
    def nifti(case_id: str) -> str:
        return f"{case_id}/{case_id}.nii.gz"

    @staticmethod
    def volumes(case_id: str) -> str:
        return f"{case_id}/volumes.csv"

    @staticmethod
    def shard(index: int, count: int) -> str:
        return f"shards/{index}-of-{count}.csv"


class TuningLayout:
    """Where a tuning job's record lives: ``<output_uri>/<tuning job>/tuning.json``."""

    MANIFEST = "tuning.json"

    @staticmethod
    def uri(output_uri: str, name: str) -> str:
        return f"{output_uri.rstrip('/')}/{name}/{TuningLayout.MANIFEST}"
