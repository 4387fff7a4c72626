"""The launcher: job settings (``jobspec``), SageMaker, local-mode and process-mode jobs, tuning,
IAM policies and a submitted job's lifecycle. ``cli.main`` is ``python infra/launch.py``."""
