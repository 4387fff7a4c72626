"""Launch a brainseg training job: on SageMaker, in SageMaker local mode, or as local processes.

    python infra/launch.py                  # the demo: process mode, embedded S3, synthetic data, a report
    python infra/launch.py [train] --mode process|local|aws --data-uri s3://… --output-uri s3://… [--hp key=value ...]
    python infra/launch.py --mode aws --role arn:aws:iam::…:role/… --data-uri … --output-uri … --dry-run
    python infra/launch.py predict --mode process|local|aws --model s3://…/<run>/ --data-uri s3://… --output-uri s3://… [--hp mirror=true]
    python infra/launch.py cv --mode process|local|aws --data-uri … --output-uri … [--folds 5]   # one job per fold
    python infra/launch.py tune --mode process|aws --data-uri … --output-uri … --range lr=1e-4:1e-2:log [--strategy Random]
    python infra/launch.py export --model s3://…/<run>/ --output exported/   # TorchScript, ONNX, a MONAI bundle
    python infra/launch.py iam-policy --role arn:aws:iam::…:role/… --data-uri s3://… --output-uri s3://… [--kms-key …] [--vpc]
    python infra/launch.py status|logs|stop|attach JOB       # a SageMaker job after submission
    python infra/launch.py jobs [--name-contains brainseg]   # the recent jobs and their status

`brainseg-launch` is the same program. --mode defaults to process.

Modes:
  process  train.py in subprocesses with SageMaker's container contract (SM_* variables, /opt/ml-style
           directories, hyperparameters as SageMaker passes them); --instance-count N runs N "hosts"
           under torchrun. No Docker, no AWS.
  local    SageMaker local mode (SDK v3 ModelTrainer, Mode.LOCAL_CONTAINER) with the image from docker/.
  aws      a real training job (ModelTrainer). --dry-run prints the CreateTrainingJob request instead.

`predict` runs predict.py the same three ways, as a training-style job on the same image (SDK v3's
ModelTrainer: the path local mode already exercises, and several instances split the cases by
host); --hp sets predict.py's options (mirror, sw_batch_size, memory_budget_mb, ...).

Without --data-uri, process and local modes start an embedded S3 (moto), write a synthetic dataset
into it, train briefly and print where the artifacts are. Settings may come from --config job.yaml
(launcher settings at the top level, train.py's under `hyperparameters:`); flags win. Every
hyperparameter is checked against train.py's fields before anything runs or is submitted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from brainseg.io import s3
from infra.launcher import iam, lifecycle
from infra.launcher.crossval import cross_validate
from infra.launcher.demo import DEMO_HYPERPARAMETERS
from infra.launcher.jobspec import JobSpec, build_spec, load_config, parse_overrides
from infra.launcher.launching import launch, launch_tuning
from infra.launcher.tuning import STRATEGIES, TuningSpec, load_tuning, parse_range

COMMANDS = ("train", "predict", "cv", "tune", "export", "iam-policy", "status", "logs", "stop", "attach", "jobs")
LIFECYCLE = ("status", "logs", "stop", "attach", "jobs")
POLICY_DOCUMENTS = ("role_permissions", "role_trust", "caller_permissions")
TUNING_FLAGS = ("tuning", "range", "strategy", "objective", "objective_type", "max_jobs", "max_parallel_jobs",
                "early_stopping", "random_seed", "min_epochs")


def _program_name() -> str:
    """How the user started the launcher: ``python infra/launch.py`` or ``brainseg-launch``."""
    started = Path(sys.argv[0]).name
    return "python infra/launch.py" if started == "launch.py" else "brainseg-launch"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_program_name(), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    train = commands.add_parser("train", help="launch a training job (the default command: `brainseg-launch "
                                "--mode ...` means `brainseg-launch train --mode ...`)",
                                description="Launch a training job (without --data-uri: the demo).")
    _add_job_flags(train, "train.py")
    train.add_argument("--processes-per-host", type=int, help="torchrun processes per instance (default: one per GPU)")
    predict = commands.add_parser("predict", help="launch a prediction job: DICOM SEG for every case of a prefix",
                                  description="Launch predict.py on SageMaker, in local mode or as local processes; "
                                              "several instances split the cases.")
    _add_job_flags(predict, "predict.py")
    predict.add_argument("--model", action="append", required=True,
                         help="s3://…/<run>/, s3://…/model.tar.gz or s3://…/model.pt (repeat for an ensemble)")

    cv = commands.add_parser(
        "cv", help="k-fold cross-validation: one training job per fold, then the folds' mean and spread",
        description="Launch train.py once per fold (--fold K --folds N, patient-level, the same test cases held out), "
                    "each job its own run <job name>-fold<K>-…; process and local mode then print the folds and "
                    "write <output-uri>/<job name>-cv.json; aws: run it again with --summary-only once they finish.")
    _add_job_flags(cv, "train.py")
    cv.add_argument("--folds", type=int, default=5, help="folds (default 5)")
    cv.add_argument("--summary-only", action="store_true", help="launch nothing: summarise the folds' finished runs")
    cv.add_argument("--processes-per-host", type=int, help="torchrun processes per instance (default: one per GPU)")

    _add_tune(commands)
    commands.add_parser("export", add_help=False, help="a model as TorchScript, ONNX and a MONAI bundle (brainseg-export)")
    _add_iam_policy(commands)
    _add_lifecycle(commands)
    return parser


def _add_tune(commands) -> None:
    """tune: the job flags, the search's ranges, strategy and objective."""
    tune = commands.add_parser(
        "tune", help="a hyperparameter tuning job: SageMaker's tuner (aws) or a Random/Grid search (process)",
        description="Search train.py's hyperparameters: --mode aws creates a SageMaker hyperparameter tuning job "
                    "(Bayesian, Random, Hyperband, Grid); --mode process runs a Random or Grid search here. "
                    "Ranges come from --tuning FILE (ranges: {lr: {min: 1e-4, max: 1e-2, scaling: log}, "
                    "loss: [dice_ce, dice]}) and --range flags, which win.")
    _add_job_flags(tune, "train.py")
    add = tune.add_argument
    add("--processes-per-host", type=int, help="torchrun processes per instance (default: one per GPU)")
    add("--tuning", help="YAML: strategy, objective, objective_type, max_jobs, max_parallel_jobs, early_stopping, "
                         "random_seed, min_epochs, ranges")
    add("--range", action="append", default=[], metavar="NAME=MIN:MAX[:SCALING] | NAME=[A, B]",
        help="a tuned hyperparameter, e.g. lr=1e-4:1e-2:log, batch_size=2:8 or 'loss=[dice_ce, dice]' (repeatable)")
    add("--strategy", choices=STRATEGIES, help="search strategy (default Bayesian)")
    add("--objective", help="the metric to optimise (default validation:best_dice, the running best validation "
                            "Dice: its last value is the run's best)")
    add("--objective-type", choices=("Maximize", "Minimize"), help="default: the objective's own")
    add("--max-jobs", type=int, help="training jobs in all (default 10; Grid: every combination)")
    add("--max-parallel-jobs", type=int, help="training jobs at once (default 1)")
    add("--early-stopping", choices=("Off", "Auto"), help="SageMaker stops unpromising jobs (Auto; not with Hyperband)")
    add("--random-seed", type=int, help="seeds the search (process mode: the draws)")
    add("--min-epochs", type=int, help="Hyperband: epochs every job gets before it may be stopped (default 1)")


def _add_iam_policy(commands) -> None:
    """iam-policy: what the documents are for (the data, output, keys, models, servers)."""
    policy = commands.add_parser(
        "iam-policy", help="print the IAM documents a job's role and its caller need",
        description="Print, as one JSON object, the job role's least-privilege permissions (role_permissions), "
                    "its trust policy (role_trust) and what the caller needs to launch and review jobs "
                    "(caller_permissions).")
    add = policy.add_argument
    add("--role", required=True, help="the job role's ARN (its account pins the buckets)")
    add("--data-uri", required=True, help="s3:// prefix the job reads cases from")
    add("--output-uri", required=True, help="s3:// prefix the job writes runs under")
    add("--job-name", default="brainseg", help="the base job name (scopes checkpoint deletes and jobs)")
    add("--index-uri", default="", help="the header index, when not under <data-uri>/.brainseg/")
    add("--identity-key-uri", default="", help="the identity key, when kept apart from the index (s3://...; "
                                                "env:NAME needs no grant)")
    add("--kms-key", action="append", default=[], help="a KMS key ARN the job uses (repeatable)")
    add("--vpc", action="store_true", help="the job runs in VPC subnets")
    add("--init-weights", default="", help="an s3:// weights file the job starts from")
    add("--model", action="append", default=[], help="a prediction job: a model it reads (run folder, model.pt or "
                                                     "model.tar.gz; repeatable), or the -cv.json its --hp "
                                                     "postprocessing names")
    add("--mlflow-server", action="append", default=[], help="a SageMaker MLflow tracking server ARN the runs "
                                                               "log to (--hp mlflow_tracking_uri=…; repeatable)")
    add("--region", default="*", help="the region of the jobs (default: any)")
    add("--document", choices=POLICY_DOCUMENTS, help="print only this document, as aws iam create-role "
                                                     "--assume-role-policy-document / put-role-policy take it")


def _add_lifecycle(commands) -> None:
    """status, logs, stop, attach (one job) and jobs (the recent ones)."""
    for name, text in (("status", "a SageMaker job's status, times, instances, warm pool, run and final metrics"),
                       ("logs", "a SageMaker job's CloudWatch log, every instance's, in time order"),
                       ("stop", "stop a SageMaker job (train.py checkpoints on the way out)"),
                       ("attach", "print a SageMaker job's log and status until it ends (exit 0 if it completed)")):
        command = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        command.add_argument("job", help="the training job's name")
        command.add_argument("--region", help="its region (default: the AWS configuration's)")
        if name == "status":
            command.add_argument("--json", action="store_true", help="print the status as one JSON object")
        if name == "attach":
            command.add_argument("--interval", type=float, default=15.0, help="seconds between polls (15)")
    jobs = commands.add_parser("jobs", help="the recent SageMaker training jobs and their status",
                               description="The recent SageMaker training jobs, newest first.")
    jobs.add_argument("--name-contains", default="brainseg", help="only jobs whose name contains this "
                                                                 "(default brainseg; '' for all)")
    jobs.add_argument("--max", type=int, default=20, help="how many (20)")
    jobs.add_argument("--region", help="the region (default: the AWS configuration's)")


def _add_job_flags(command: argparse.ArgumentParser, script: str) -> None:
    """The flags every job takes, whichever its script."""
    add = command.add_argument
    add("--mode", choices=("process", "local", "aws"), help="where the job runs (default: process)")
    add("--config", help=f"YAML job file: launcher settings at the top level, {script}'s under `hyperparameters:`")
    example = "lr=3e-4, patch_size=[96,96,96] or augment=false" if script == "train.py" else \
        "mirror=true or sw_batch_size=4"
    add("--hp", action="append", default=[], metavar="KEY=VALUE",
        help=f"a {script} flag without its dashes, e.g. {example} (repeatable; {script} --help lists them)")
    add("--data-uri", help="s3:// prefix holding the cases" + (" (without it: the demo's embedded S3 and synthetic "
                                                                "data)" if script == "train.py" else ""))
    add("--output-uri", help="s3:// prefix the job writes under" + (" (<output-uri>/<job name>/)"
                                                                     if script == "train.py" else ""))
    add("--job-name", help="base job name (SageMaker appends a timestamp); also a training run's name prefix")
    add("--image-uri", help="the image built from docker/; aws default: prebuilt PyTorch image")
    add("--role", help="aws: the job's IAM role ARN (see `brainseg-launch iam-policy`)")
    add("--region", help="aws: region (default: the AWS configuration's)")
    add("--instance-type", help="e.g. ml.g5.xlarge (aws default), local in local and process modes")
    add("--instance-count", type=int, help="instances (process mode: simulated hosts), default 1")
    add("--volume-size-gb", type=int, help="aws: the instance's EBS volume (default: sized to hold the cache the "
        "data needs, at least 100 GB)")
    add("--spot", action="store_true", default=None, help="managed spot capacity")
    add("--max-run-s", type=int, help="stop the job after this many seconds")
    add("--max-wait-s", type=int, help="spot: max wait, >= max run (default 2x max run)")
    add("--keep-alive-s", type=int, help="aws: keep the instances warm this long after the job (a warm pool, up to "
                                         "3600 s; the next job with the same settings starts in seconds)")
    add("--max-retries", type=int, help="aws: restart the job after an internal SageMaker error up to N times "
                                        "(it resumes from its checkpoint)")
    add("--volume-kms-key", help="aws: KMS key for the instance's volume")
    add("--output-kms-key", help="aws: KMS key for the job's output")
    add("--subnets", help="comma-separated subnet IDs (the job runs in your VPC)")
    add("--security-group-ids", help="comma-separated security group IDs (with --subnets)")
    add("--network-isolation", action="store_true", default=None,
        help="refused in aws mode: an isolated container cannot reach S3, and the job streams its data and writes "
             "its run over S3 itself; use --subnets with an S3 gateway endpoint instead")
    add("--inter-container-encryption", action="store_true", default=None,
        help="aws: encrypt traffic between instances")
    add("--tag", action="append", default=[], metavar="KEY=VALUE", help="a tag of the job (repeatable)")
    add("--wait", action="store_true", default=None, help="aws: wait and stream the job's logs")
    add("--dry-run", action="store_true", default=None,
        help="aws: print the CreateTrainingJob request only (offline: no credentials or bucket needed)")


def policies(args: argparse.Namespace) -> dict:
    """The three policy documents of ``brainseg-launch iam-policy``; ValueError for bad input."""
    account = iam.role_account(args.role)
    return {
        "role_permissions": iam.role_policy(args.data_uri, args.output_uri, account, args.job_name, args.index_uri,
                                            tuple(args.kms_key), args.vpc, args.init_weights, args.region,
                                            tuple(args.model), tuple(args.mlflow_server), args.identity_key_uri),
        "role_trust": iam.trust_policy(account, args.region),
        "caller_permissions": iam.caller_policy(args.role, args.output_uri, args.job_name, args.region),
    }


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    """Config file, then flags, then --hp overrides; checked (raises ValueError with the reason)."""
    settings = load_config(args.config)
    for name, value in vars(args).items():
        if name in ("command", "config", "hp", "tag", "model", "folds", "summary_only", *TUNING_FLAGS) or value is None:
            continue
        settings[name] = value
    if args.tag:
        settings["tags"] = {**settings.get("tags", {}), **parse_overrides(args.tag)}
    settings.setdefault("mode", "process")
    if settings["mode"] != "process":
        settings = with_sagemaker_defaults(settings)
    overrides = parse_overrides(args.hp)
    if args.command == "train" and not settings.get("data_uri"):  # the demo: --hp on top of its own settings
        overrides = {**DEMO_HYPERPARAMETERS, **overrides}
    if args.command == "predict":
        settings["script"] = "predict.py"
        overrides["model"] = ",".join(args.model)
    return build_spec(settings, overrides)


def with_sagemaker_defaults(settings: dict) -> dict:
    """``settings`` completed from the user's SageMaker config (its TrainingJob defaults: role, VPC,
    KMS keys, tags, environment) where neither a flag nor the job file set them; tags and variables
    are merged, ours winning."""
    from infra.launcher.sagemaker_job import config_settings, sagemaker_config

    defaults = config_settings(sagemaker_config())
    merged = {**defaults, **settings}
    for name in ("tags", "environment"):
        merged[name] = {**defaults.get(name, {}), **settings.get(name, {})}
    return merged


def tuning_from_args(args: argparse.Namespace) -> TuningSpec:
    """The --tuning file, then the flags; a --range replaces the file's range of that name."""
    settings = load_tuning(args.tuning)
    for name in TUNING_FLAGS[2:]:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    ranges = {r.name: r for r in settings.get("ranges", ())}
    ranges.update({r.name: r for r in map(parse_range, args.range)})
    return TuningSpec(**{**settings, "ranges": tuple(ranges.values())})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("botocore", "boto3", "smart_open", "sagemaker", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["train", *argv]
    if argv[0] == "export":  # torch, only for this command
        from brainseg.commands import export
        return export.main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "iam-policy":
        try:
            documents = policies(args)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(json.dumps(documents[args.document] if args.document else documents, indent=1))
        return 0
    if args.command in LIFECYCLE:
        return lifecycle.command(args)
    from infra.launcher.sagemaker_job import LaunchError
    try:
        spec = spec_from_args(args)
        if args.command == "tune":
            return launch_tuning(spec, tuning_from_args(args))
        if args.command == "cv":
            return cross_validate(spec, args.folds, args.summary_only, launch)
        return launch(spec)
    except (ValueError, LaunchError, s3.S3Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
