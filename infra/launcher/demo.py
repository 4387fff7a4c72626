"""The demo: an embedded S3 with synthetic four-sequence studies, a short training job on them, and
the run copied to ``demo-output/<run>/`` with its review report before the embedded S3 stops."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from brainseg.io import s3
from brainseg.layout import RunLayout
from infra.launcher.jobspec import JobSpec

logger = logging.getLogger("launch")
DOCKER_HOST_ADDRESS = "172.17.0.1"  # the host as seen from a container on the default bridge
DEMO_BUCKET = "brainseg-demo"
DEMO_CASES, DEMO_SHAPE = 24, (48, 96, 96)
DEMO_SEQUENCES = ("t1c", "t1", "t2", "flair")
# Four co-registered sequences, BraTS labels, trained as the three overlapping BraTS regions. Small
# enough for a 2-core CPU in a few minutes.
DEMO_HYPERPARAMETERS = {"sequences": ",".join(DEMO_SEQUENCES), "labels": "ncr=1,ed=2,et=4", "regions": "brats",
                        "channels": [8, 16, 32, 64], "patch_size": [32, 64, 64], "epochs": 10,
                        "steps_per_epoch": 50, "lr": 0.003, "warmup_steps": 20, "foreground_fraction": 0.5,
                        "batch_size": 2, "num_workers": 2, "log_every": 20}
DEMO_OUTPUT = Path("demo-output")  # where the demo's artifacts are copied (relative to the working directory)


def start_demo(spec: JobSpec, stack):
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
    report written beside it, with what the model looked at (``--explain``)."""
    from infra.review.report import write_report
    from infra.review.runs import load_run

    folder = save_locally(output_uri, job_name, DEMO_OUTPUT)
    print(f"  copied to {folder}/ (the embedded S3 stops now)")
    page = write_report([load_run(str(folder))], folder / "report", explain=True)
    print(f"  report: open {page.resolve()} in a browser (brainseg-review {folder} prints the same in text)")
