"""The ``process`` mode: train.py in subprocesses with SageMaker's container contract, no Docker.

Each simulated instance ("host" ``algo-1``, ``algo-2``, ...) gets an ``/opt/ml``-style tree in a
temporary directory and the variables SageMaker sets (``SM_MODEL_DIR``, ``SM_HOSTS``,
``SM_CURRENT_HOST``, ``SM_HPS``, ``SM_TRAINING_ENV``, ``TRAINING_JOB_NAME``, ...), and receives
the hyperparameters as SageMaker's drivers pass them (``--key value``, JSON for non-strings).
Training always runs under torchrun, as the launcher asks SageMaker to: one process per GPU
(``SM_NUM_GPUS``, from ``nvidia-smi``; one on CPU) unless ``processes_per_host`` is set, with
SageMaker's torchrun flags (``--nnodes``, ``--node_rank``, master address and port).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

from infra.launcher.jobspec import ENTRY_POINT, JobSpec, sagemaker_cli_args


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gpu_count() -> int:
    """This machine's NVIDIA GPUs (``nvidia-smi -L``), 0 without the tool or a driver."""
    if not shutil.which("nvidia-smi"):
        return 0
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines()) if listing.returncode == 0 else 0


def processes_per_host(spec: JobSpec) -> int:
    """What SageMaker's torchrun driver starts per instance: the given count, else one per GPU, else 1."""
    return spec.processes_per_host or gpu_count() or 1


def host_environment(spec: JobSpec, job_name: str, root: Path, host_rank: int, port: int) -> dict:
    """The SageMaker variables of one simulated instance, its directories created under ``root``."""
    hosts = [f"algo-{i + 1}" for i in range(spec.instance_count)]
    host = hosts[host_rank]
    opt_ml = root / host / "opt" / "ml"
    dirs = {name: opt_ml / relative for name, relative in (
        ("model", "model"), ("output", "output/data"), ("checkpoints", "checkpoints"), ("config", "input/config"))}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    hyperparameters = spec.training_hyperparameters()
    strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in hyperparameters.items()}
    (dirs["config"] / "hyperparameters.json").write_text(json.dumps(strings, indent=1))
    (dirs["config"] / "resourceconfig.json").write_text(json.dumps({"current_host": host, "hosts": hosts}))
    training_env = {"job_name": job_name, "hosts": hosts, "current_host": host, "hyperparameters": hyperparameters,
                    "model_dir": str(dirs["model"]), "output_data_dir": str(dirs["output"])}
    return {
        "TRAINING_JOB_NAME": job_name,
        "SM_MODEL_DIR": str(dirs["model"]),
        "SM_OUTPUT_DATA_DIR": str(dirs["output"]),
        "SM_CHECKPOINT_DIR": str(dirs["checkpoints"]),
        "SM_INPUT_CONFIG_DIR": str(dirs["config"]),
        "SM_HOSTS": json.dumps(hosts),
        "SM_CURRENT_HOST": host,
        "SM_HOST_COUNT": str(len(hosts)),
        "SM_CURRENT_HOST_RANK": str(host_rank),
        "SM_MASTER_ADDR": "127.0.0.1",
        "SM_MASTER_PORT": str(port),
        "SM_NUM_GPUS": str(gpu_count()),
        "SM_NUM_CPUS": str(os.cpu_count() or 1),
        "SM_HPS": json.dumps(hyperparameters),
        "SM_TRAINING_ENV": json.dumps(training_env),
        "PYTHONPATH": str(ENTRY_POINT),
    }


# torchrun, but a worker's failure ends it with the worker's exit status instead of a ChildFailedError
# traceback after the worker's own message (train.py says what went wrong; exit 2: bad input).
QUIET_TORCHRUN = """import sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
try:
    main(sys.argv[1:])
except ChildFailedError as err:
    sys.exit(err.get_first_failure()[1].exitcode or 1)
"""


def host_command(spec: JobSpec, host_rank: int, port: int) -> list[str]:
    args = sagemaker_cli_args(spec.training_hyperparameters())
    if not spec.training:  # one prediction process per host; the hosts split the cases
        return [sys.executable, spec.script, *args]
    return [sys.executable, "-c", QUIET_TORCHRUN, f"--nnodes={spec.instance_count}",
            f"--nproc_per_node={processes_per_host(spec)}", "--master_addr=127.0.0.1", f"--master_port={port}",
            f"--node_rank={host_rank}", "train.py", *args]


def _relay(stream, prefix: str, sink) -> None:
    for line in stream:
        sink.write(prefix + line)
        sink.flush()


def run(spec: JobSpec, job_name: str, root: Path, extra_env: dict | None = None, sink=None) -> int:
    """Run the job's hosts to the end, relaying their output; the worst exit status."""
    sink = sink or sys.stdout
    port = _free_port()
    processes, relays = [], []
    for rank in range(spec.instance_count):
        env = {**os.environ, **(extra_env or {}), **host_environment(spec, job_name, root, rank, port)}
        process = subprocess.Popen(host_command(spec, rank, port), cwd=ENTRY_POINT, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        prefix = f"algo-{rank + 1} | " if spec.instance_count > 1 else ""
        relay = threading.Thread(target=_relay, args=(process.stdout, prefix, sink), daemon=True)
        relay.start()
        processes.append(process)
        relays.append(relay)
    codes = [process.wait() for process in processes]
    for relay in relays:
        relay.join()
    return max(codes, key=abs)
