"""SageMaker training entry point: parse the hyperparameters, build the run, run it.

    python entry_point/train.py --data-uri s3://bucket/dataset/ --output-uri s3://bucket/runs/ [--flag value ...]
    torchrun --nproc-per-node 2 entry_point/train.py ...          (one process per GPU)
    python entry_point/train.py ... --task lr_find                 (a learning-rate range test: lr_find.json)

Every flag is a field of ``brainseg.config.Hyperparameters`` (``--help`` lists them). Exit
status: 0 finished, 2 bad configuration or data, or a run another job writes (nothing trained),
3 S3 failure, 4 stopped by SIGTERM with a checkpoint saved (run the same command to resume).
"""

from __future__ import annotations

import logging
import os
import sys

from brainseg.environment import cpu_image_warning, drop_privileges, read_environment
from brainseg.flags import given_flags, parse_hyperparameters
from brainseg.io import s3
from brainseg.run.checkpoint import CheckpointError
from brainseg.run.ownership import RunTaken

logger = logging.getLogger("brainseg.train")


def main(argv: list[str] | None = None) -> int:
    main_process = os.environ.get("RANK", "0") == "0"  # other torchrun ranks log warnings only
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    for noisy in ("botocore", "boto3", "smart_open"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        argv = sys.argv[1:] if argv is None else argv
        hp, ignored = parse_hyperparameters(argv)
    except ValueError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    if ignored:
        logger.info("ignoring SageMaker's own arguments: %s", " ".join(ignored))
    if "LOCAL_WORLD_SIZE" in os.environ:
        logger.info("under torchrun: %s process(es) on this host, %s in all", os.environ["LOCAL_WORLD_SIZE"],
                    os.environ.get("WORLD_SIZE", "1"))
    import torch  # only once the flags are valid

    from brainseg.run.engine import Trainer
    from brainseg.run.errors import Interrupted, TrainingError
    from brainseg.run.lr_find import LRFinder

    env = read_environment()
    warning = cpu_image_warning(env, torch.cuda.is_available(), torch.__version__, torch.version.cuda)
    if warning:
        for line in ("!" * 100, warning, "!" * 100):
            logger.warning("%s", line)
    user = drop_privileges(env)
    if user:
        logger.info("running as %s, not root", user)
    try:
        if hp.task == "lr_find":
            LRFinder(hp, env).execute()
        else:
            Trainer(hp, env, given_flags(argv)).execute()
    except Interrupted as err:
        logger.warning("%s", err)
        return 4
    except TrainingError as err:
        logger.error("%s", err)
        return 2
    except (CheckpointError, RunTaken) as err:
        logger.error("%s", err)
        return 2
    except s3.S3Error as err:
        logger.error("S3: %s", err)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
