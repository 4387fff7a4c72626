"""A training run: the ``engine`` (Trainer and its fit loop), the run's cases, splits and target
spacing (``cases``), its ``starting_model``, what it publishes as its model (``model_output``), checkpoints and their state, one writer per run
(``ownership``), evaluation, distributed helpers, the LR range test, and MLflow tracking."""
