"""Launch a brainseg training job: on SageMaker, in SageMaker local mode, or as local processes.

    python infra/launch.py                  # the demo: process mode, embedded S3, synthetic data, a report
    python infra/launch.py [train] --mode process|local|aws --data-uri s3://… --output-uri s3://… [--hp key=value ...]
    python infra/launch.py --mode aws --role arn:aws:iam::…:role/… --data-uri … --output-uri … --dry-run
    python infra/launch.py predict --mode process|local|aws --model s3://…/<run>/ --data-uri s3://… --output-uri s3://… [--hp mirror=true]
    python infra/launch.py tune --mode process|aws --data-uri … --output-uri … --range lr=1e-4:1e-2:log [--strategy Random]
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
import contextlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from brainseg.io import s3
from brainseg.layout import PredictionLayout, RunLayout, TuningLayout
from infra.launcher import iam
from infra.launcher.jobspec import JobSpec, build_spec, load_config, parse_overrides
from infra.launcher.tuning import STRATEGIES, TuningSpec, load_tuning, parse_range, tuning_job_name
from infra.review.predictions import is_prediction_output, load_prediction

logger = logging.getLogger("launch")
DEMO_BUCKET = "brainseg-demo"
DEMO_CASES, DEMO_SHAPE = 24, (48, 96, 96)
DEMO_SEQUENCES = ("t1c", "t1", "t2", "flair")
# Four co-registered sequences, BraTS labels, trained as the three overlapping BraTS regions. Small
# enough for a 2-core CPU in a few minutes.
DEMO_HYPERPARAMETERS = {"sequences": ",".join(DEMO_SEQUENCES), "labels": "ncr=1,ed=2,et=4", "regions": "brats",
                        "channels": [8, 16, 32, 64], "patch_size": [32, 64, 64], "epochs": 6,
                        "steps_per_epoch": 40, "lr": 0.003, "warmup_steps": 20, "foreground_fraction": 0.5,
                        "batch_size": 2, "num_workers": 2, "log_every": 20}
DEMO_OUTPUT = Path("demo-output")  # where the demo's artifacts are copied (relative to the working directory)
DOCKER_HOST_ADDRESS = "172.17.0.1"  # the host as seen from a container on the default bridge


COMMANDS = ("train", "predict", "tune", "iam-policy", "status", "logs", "stop", "attach", "jobs")
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
    add("--kms-key", action="append", default=[], help="a KMS key ARN the job uses (repeatable)")
    add("--vpc", action="store_true", help="the job runs in VPC subnets")
    add("--init-weights", default="", help="an s3:// weights file the job starts from")
    add("--model", action="append", default=[], help="a prediction job: a model it reads (run folder, model.pt or "
                                                     "model.tar.gz; repeatable)")
    add("--mlflow-server", action="append", default=[], help="a SageMaker MLflow tracking server ARN the runs "
                                                               "log to (--hp mlflow_tracking_uri=…; repeatable)")
    add("--region", default="*", help="the region of the jobs (default: any)")
    add("--document", choices=POLICY_DOCUMENTS, help="print only this document, as aws iam create-role "
                                                     "--assume-role-policy-document / put-role-policy take it")

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
    return parser


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
    add("--volume-size-gb", type=int, help="aws: the instance's EBS volume")
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
                                            tuple(args.model), tuple(args.mlflow_server)),
        "role_trust": iam.trust_policy(account, args.region),
        "caller_permissions": iam.caller_policy(args.role, args.output_uri, args.job_name, args.region),
    }


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    """Config file, then flags, then --hp overrides; checked (raises ValueError with the reason)."""
    settings = load_config(args.config)
    for name, value in vars(args).items():
        if name in ("command", "config", "hp", "tag", "model", *TUNING_FLAGS) or value is None:
            continue
        settings[name] = value
    if args.tag:
        settings["tags"] = {**settings.get("tags", {}), **parse_overrides(args.tag)}
    settings.setdefault("mode", "process")
    if settings["mode"] != "process":
        settings = with_sagemaker_defaults(settings)
    overrides = parse_overrides(args.hp)
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


def _boto_session(region: str | None):
    import boto3
    session = boto3.Session(region_name=region) if region else boto3.Session()
    if not session.region_name:
        raise ValueError("no AWS region: pass --region or set AWS_DEFAULT_REGION")
    return session


def _start_demo(spec: JobSpec, stack):
    """An embedded S3 with a synthetic dataset; returns the spec pointed at it and the container endpoint."""
    from infra.data.synth import SynthSpec, write_dataset
    from infra.s3server import EmbeddedS3

    local = spec.mode == "local"
    server = stack.enter_context(EmbeddedS3(host="0.0.0.0" if local else "127.0.0.1"))
    os.environ.update(server.environment())
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    s3.reset_client()
    s3.client().create_bucket(Bucket=DEMO_BUCKET)
    data_uri = f"s3://{DEMO_BUCKET}/dataset/"
    logger.info("embedded S3 at %s; writing %d synthetic cases of %s to %s", server.endpoint_url, DEMO_CASES,
                "x".join(map(str, DEMO_SHAPE)), data_uri)
    write_dataset(DEMO_CASES, data_uri, SynthSpec(shape=DEMO_SHAPE, sequences=DEMO_SEQUENCES), jobs=2)
    hyperparameters = {**DEMO_HYPERPARAMETERS, **spec.hyperparameters}
    demo = replace(spec, data_uri=data_uri, output_uri=spec.output_uri or f"s3://{DEMO_BUCKET}/runs/",
                   hyperparameters=hyperparameters)
    container_env = {"AWS_ENDPOINT_URL": f"http://{DOCKER_HOST_ADDRESS}:{server.port}"} if local else {}
    return demo, container_env


def latest_run(output_uri: str, base: str) -> str | None:
    """The newest run under ``output_uri`` whose name starts with ``base`` (by its run.json start time)."""
    bucket, prefix = s3.parse_uri(output_uri.rstrip("/") + "/")
    folders, _ = s3.list_folders(bucket, prefix)
    best = None
    for folder in folders:
        name = folder[len(prefix):].rstrip("/")
        data = s3.read_uri(f"s3://{bucket}/{folder}{RunLayout.STATUS}") if name.startswith(base) else None
        if data is not None:
            started = json.loads(data).get("started", 0)
            if best is None or started > best[0]:
                best = (started, name)
    return best[1] if best else None


def save_locally(output_uri: str, job_name: str, folder: Path) -> Path:
    """Copy a run's artifacts (all but checkpoints) out of the embedded S3 before it stops."""
    bucket, prefix = s3.parse_uri(f"{output_uri.rstrip('/')}/{job_name}/")
    target = folder / job_name
    for info in s3.list_objects(bucket, prefix):
        relative = info.key[len(prefix):]
        if relative.startswith(RunLayout.CHECKPOINTS):
            continue
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(s3.get_object(bucket, info.key))
    return target


def save_demo(output_uri: str, job_name: str) -> None:
    """The demo's run copied to ``demo-output/<run>/`` before the embedded S3 stops, and its review
    report written beside it."""
    from infra.review.report import write_report
    from infra.review.runs import load_run

    folder = save_locally(output_uri, job_name, DEMO_OUTPUT)
    print(f"  copied to {folder}/ (the embedded S3 stops now)")
    page = write_report([load_run(str(folder))], folder / "report")
    print(f"  report: open {page.resolve()} in a browser (brainseg-review {folder} prints the same in text)")


def report(output_uri: str, job_name: str) -> None:
    run = f"{output_uri.rstrip('/')}/{job_name}/"
    summary = s3.read_uri(run + RunLayout.SUMMARY)
    print(f"artifacts: {run}")
    if summary is None:
        status = json.loads(s3.read_uri(run + RunLayout.STATUS) or b"{}")
        if status.get("error"):
            print(f"  the run {status.get('status', 'failed')}: {status['error']}")
        else:
            print(f"  no summary.json (the run did not finish; its run.json says {status.get('status', 'nothing')})")
        return
    summary = json.loads(summary)
    structures = [f"test_{figure}_{name}" for name in summary.get("structures", []) if len(summary["structures"]) > 1
                  for figure in ("dice", "hd95")]
    for key in ("suggested_lr", "min_loss_lr", "best_epoch", "best_val_dice", "test_dice_mean", "test_dice_median", "test_iou_mean",
                "test_hd95_mean", *structures, "best_val_loss", "test_loss", "test_cases", "seconds"):
        if summary.get(key) is not None:
            value = summary[key]
            print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")


def report_predictions(output_uri: str) -> None:
    """What a prediction job wrote: complete or not, its counts, and the cases not predicted."""
    print(f"predictions: {output_uri.rstrip('/')}/")
    if not is_prediction_output(output_uri):
        print(f"  nothing written (no {PredictionLayout.SETTINGS}: the job stopped before starting; see the log)")
        return
    prediction = load_prediction(output_uri)
    print(f"  {prediction.status_text()}")
    for row in prediction.rows:
        if row["status"] != "predicted":
            print(f"  {row['case_id']} {row['status']}: {row.get('reason', '')}")


def local_endpoint_environment() -> dict:
    """For local mode: an S3 endpoint this machine uses (``AWS_ENDPOINT_URL``: MinIO, brainseg-s3server)
    as the container reaches it (the Docker host's address for 127.0.0.1 or localhost)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return {}
    parsed = urlsplit(endpoint)
    if parsed.hostname in ("127.0.0.1", "localhost"):
        endpoint = parsed._replace(netloc=f"{DOCKER_HOST_ADDRESS}:{parsed.port or 80}").geturl()
    return {"AWS_ENDPOINT_URL": endpoint}


def tuning_from_args(args: argparse.Namespace) -> TuningSpec:
    """The --tuning file, then the flags; a --range replaces the file's range of that name."""
    settings = load_tuning(args.tuning)
    for name in TUNING_FLAGS[2:]:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    ranges = {r.name: r for r in settings.get("ranges", ())}
    ranges.update({r.name: r for r in map(parse_range, args.range)})
    return TuningSpec(**{**settings, "ranges": tuple(ranges.values())})


def tuning_text(manifest: dict) -> str:
    """A finished process-mode search: each job's tuned values and objective, best first."""
    from infra.launcher.tuning import TuningResult
    objective = manifest["objective"]
    lines = [f"tuning job {manifest['tuning_job']} ({manifest['strategy']}, {objective['type']} {objective['metric']})"]
    best = TuningResult(manifest).best
    for job in manifest["jobs"]:
        value = job.get("objective")
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "–"
        values = " ".join(f"{name}={job['hyperparameters'][name]:.4g}" if isinstance(job["hyperparameters"][name], float)
                          else f"{name}={job['hyperparameters'][name]}" for name in manifest["ranges"])
        lines.append(f"  {job['job']}: {job.get('status')} {objective['metric']}={shown} {values}"
                     + ("  <- best" if job is best else ""))
    return "\n".join(lines)


def launch_tuning(spec: JobSpec, tuning: TuningSpec) -> int:
    """tune: 0 submitted (aws) or every job finished (process), 1 a process-mode job failed."""
    from infra.launcher import sagemaker_job
    from infra.launcher import tuning as search

    if not spec.data_uri or not spec.output_uri:
        raise ValueError("tune needs --data-uri and --output-uri")
    if spec.mode == "local":
        raise ValueError("SageMaker local mode has no tuning jobs; use --mode process (Random or Grid) or --mode aws")
    if spec.keep_alive_s:
        raise ValueError("keep_alive_s: SageMaker's tuner does not give its training jobs a warm pool")
    tuning.check(spec)
    name = tuning_job_name(spec.base_job_name())
    if spec.mode == "process":
        tuning.sample()  # refuses Bayesian and Hyperband before anything runs
        with tempfile.TemporaryDirectory(prefix=f"{name}-") as root:
            result = search.search(spec, tuning, name, Path(root))
        print(tuning_text(result.manifest))
        print(f"review: brainseg-review {spec.output_uri.rstrip('/')}/{name}/")
        return 0 if all(code == 0 for code in result.codes) else 1
    if spec.dry_run:
        print(json.dumps(sagemaker_job.dry_run_tuning_request(spec, tuning, name), indent=1, sort_keys=True,
                         default=str))
        return 0
    sagemaker_job.submit_tuning(spec, tuning, name, _boto_session(spec.region or None))
    s3.put_bytes(TuningLayout.uri(spec.output_uri, name),
                 json.dumps(tuning.manifest(name, spec, "aws"), indent=1, default=str).encode())
    print(f"submitted tuning job {name}: up to {tuning.jobs} training jobs, {tuning.max_parallel_jobs} at a time; "
          f"review: brainseg-review {spec.output_uri.rstrip('/')}/{name}/")
    return 0


def launch(spec: JobSpec) -> int:
    from infra.launcher import process_job, sagemaker_job

    with contextlib.ExitStack() as stack:
        container_env = {}
        demo = not spec.data_uri
        if demo and not spec.training:
            raise ValueError("predict needs --data-uri and --output-uri")
        if demo:
            if spec.mode == "aws":
                raise ValueError("aws mode needs --data-uri")
            spec, container_env = _start_demo(spec, stack)
        elif spec.mode == "local":
            container_env = local_endpoint_environment()
        if not spec.output_uri:
            raise ValueError("--output-uri is required with --data-uri (s3://bucket/prefix/ for the runs)")
        if spec.mode == "process":
            job_name = spec.unique_job_name()
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{job_name}-")))
            logger.info("process mode: job %s, container directories under %s (removed at the end)", job_name, root)
            code = process_job.run(spec, job_name, root)
            if not spec.training:
                report_predictions(spec.output_uri)
                return code
            report(spec.output_uri, job_name)
            if demo:
                save_demo(spec.output_uri, job_name)
            return code
        if spec.dry_run:
            request = sagemaker_job.dry_run_request(spec)
            print(sagemaker_job.dry_run_text(spec, request), file=sys.stderr)
            print(json.dumps(request, indent=1, sort_keys=True, default=str))
            return 0
        session = _boto_session(spec.region or None)
        local_root = tempfile.mkdtemp(prefix="brainseg-local-") if spec.mode == "local" else None
        job_name = sagemaker_job.submit(spec, session, container_env, local_root)
        if spec.mode == "aws":
            where = spec.output_uri if not spec.training else f"{spec.output_uri.rstrip('/')}/{job_name}/"
            print(f"submitted training job {job_name} ({spec.script}); artifacts will be under {where}")
            if spec.wait and spec.training:
                report(spec.output_uri, job_name)
            elif spec.wait:
                report_predictions(spec.output_uri)
            return 0
        if not spec.training:
            print(f"local mode job finished; container files under {local_root}")
            report_predictions(spec.output_uri)
            return 0
        job_name = latest_run(spec.output_uri, spec.base_job_name())
        if job_name is None:
            print(f"error: the local job wrote no run under {spec.output_uri}", file=sys.stderr)
            return 1
        print(f"local mode job finished; container files under {local_root}")
        report(spec.output_uri, job_name)
        if demo:
            save_demo(spec.output_uri, job_name)
        return 0


def lifecycle_command(args: argparse.Namespace) -> int:
    """status, logs, stop, attach and jobs: 0 done (attach: the job completed), 1 the job failed or
    stopped (attach), 2 no such job or no access."""
    import botocore.exceptions

    from infra.launcher import lifecycle
    try:
        session = _boto_session(args.region)
        if session.get_credentials() is None:
            raise ValueError("no AWS credentials found (environment, ~/.aws, SSO or instance role)")
        if args.command == "jobs":
            for job in lifecycle.recent_jobs(session, args.name_contains, args.max):
                print(f"{job['job']:63} {job['status']:11} {job['created']}")
            return 0
        if args.command == "status":
            info = lifecycle.describe(lifecycle.get_job(args.job, session))
            print(json.dumps(info, indent=1) if args.json else lifecycle.status_text(info))
        elif args.command == "logs":
            lifecycle.get_job(args.job, session)
            lines = lifecycle.LogReader(args.job, session).new_lines()
            print("\n".join(lines) if lines else f"{args.job}: no log lines yet")
        elif args.command == "stop":
            before = lifecycle.stop(args.job, session)
            print(f"{args.job} already ended: {before}" if before in lifecycle.TERMINAL
                  else f"stopping {args.job} (was {before}); it checkpoints and ends as Stopped")
        else:
            final = lifecycle.attach(args.job, session, args.interval, out=lambda line: print(line, flush=True))
            return 0 if final == "Completed" else 1
        return 0
    except (ValueError, lifecycle.JobNotFound) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except botocore.exceptions.ClientError as err:
        print(f"error: {err.response.get('Error', {}).get('Code', '')}: "
              f"{err.response.get('Error', {}).get('Message', err)}", file=sys.stderr)
        return 2
    except botocore.exceptions.BotoCoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("botocore", "boto3", "smart_open", "sagemaker", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["train", *argv]
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
        return lifecycle_command(args)
    from infra.launcher.sagemaker_job import LaunchError
    try:
        spec = spec_from_args(args)
        if args.command == "tune":
            return launch_tuning(spec, tuning_from_args(args))
        return launch(spec)
    except (ValueError, LaunchError, s3.S3Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
