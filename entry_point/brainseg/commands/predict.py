"""Prediction entry point: segment new studies in S3 with trained model(s), write DICOM SEG back.

    python entry_point/predict.py --model s3://bucket/runs/<run>/ --data-uri s3://bucket/new/ \\
        --output-uri s3://bucket/predictions/ [--mirror true] [--model s3://bucket/runs/<other>/ ...]

Every flag is a field of ``brainseg.prediction.options.PredictOptions`` (``--help`` lists them).
The same container contract as train.py: a SageMaker job with several instances splits the cases
between them. Exit status: 0 every case predicted, 1 some cases skipped or excluded (each named
with the reason in the log and in predictions.csv), 2 bad options, models or data prefix
(nothing predicted), 3 S3 failure.
"""

from __future__ import annotations

import logging
import os
import sys

from brainseg.environment import drop_privileges, read_environment
from brainseg.io import s3
from brainseg.prediction.options import parse_options

logger = logging.getLogger("brainseg.predict")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    for noisy in ("botocore", "boto3", "smart_open"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        options = parse_options(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        print(f"predict.py: error: {err}", file=sys.stderr)
        return 2
    import torch  # only once the flags are valid

    from brainseg.prediction.job import PredictionError, PredictionJob

    env = read_environment()
    user = drop_privileges(env)
    if user:
        logger.info("running as %s, not root", user)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        counts = PredictionJob(options, env, device).run()
    except PredictionError as err:
        logger.error("%s", err)
        return 2
    except s3.S3Error as err:
        logger.error("S3: %s", err)
        return 3
    return 0 if set(counts) <= {"predicted"} else 1


if __name__ == "__main__":
    sys.exit(main())
