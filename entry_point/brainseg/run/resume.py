"""Whether a run may continue from its checkpoint (the same hyperparameters, but those allowed to
change, and the same data, or the differences named in the refusal), and restoring it."""

from __future__ import annotations

import logging

from brainseg.config import RESUMABLE_CHANGES, Hyperparameters
from brainseg.data.splits import SPLITS
from brainseg.run.errors import TrainingError
from brainseg.run.state import LoopState, restore_rng_states

logger = logging.getLogger("brainseg.train")


def check_same_hyperparameters(checkpoint: dict, hp: Hyperparameters, run_name: str, name: str) -> None:
    """Refuse a checkpoint from other hyperparameters (:data:`RESUMABLE_CHANGES` may differ).

    Raises:
        TrainingError: naming each differing field with both values.
    """
    saved, current = checkpoint["hyperparameters"], hp.to_dict()
    differing = sorted(field for field in current if field not in RESUMABLE_CHANGES
                       and saved.get(field) != current[field])
    if differing:
        changes = ", ".join(f"{field}: {saved.get(field)!r} -> {current[field]!r}" for field in differing)
        raise TrainingError(f"run {run_name} has a checkpoint ({name}) from different hyperparameters ({changes}); "
                            "use the same values to resume, or another --run-name to start a new run")


def check_same_dataset(checkpoint: dict, fingerprint: str, splits: dict, hp: Hyperparameters, run_name: str,
                       name: str) -> None:
    """Resume only on the data the checkpoint was trained on, unless ``allow_dataset_change``.

    Raises:
        TrainingError: the dataset's objects or splits changed; the message says how.
    """
    saved = checkpoint["dataset_fingerprint"]
    if saved == fingerprint:
        return
    before, now = checkpoint.get("splits", {}), splits
    changes = []
    for split in SPLITS:
        for sign, ids in (("+", set(now[split]) - set(before.get(split, []))),
                          ("-", set(before.get(split, [])) - set(now[split]))):
            if ids:
                shown = ", ".join(sorted(ids)[:3]) + (", ..." if len(ids) > 3 else "")
                changes.append(f"{split} {sign}{len(ids)} ({shown})")
    what = "; ".join(changes) if changes else "same cases in every split, but objects or the manifest changed"
    message = (f"run {run_name}: the dataset under {hp.data_uri} changed since checkpoint {name} "
               f"(fingerprint {saved} -> {fingerprint}: {what})")
    if not hp.allow_dataset_change:
        raise TrainingError(f"{message}; resume on the same data, pass --allow-dataset-change true to continue "
                            "on the new data, or use another --run-name to start a new run")
    logger.warning("%s: continuing on the new data (--allow-dataset-change)", message)


def check_resumable(checkpoint: dict, hp: Hyperparameters, fingerprint: str, splits: dict, run_name: str,
                    name: str) -> None:
    """Both checks: the same hyperparameters, and the same data unless allowed (``TrainingError``)."""
    check_same_hyperparameters(checkpoint, hp, run_name, name)
    check_same_dataset(checkpoint, fingerprint, splits, hp, run_name, name)


def restore(checkpoint: dict, rank: int, world: int, num_workers: int, model, optimizer, scheduler,
            scaler) -> tuple[dict, LoopState]:
    """Load a checkpoint's weights, optimiser, schedule, scaler and this rank's RNG states; return
    the weights the model keeps and its loop state. A different worker or rank layout is a warning: training
    continues, in another patch order."""
    sampler = checkpoint["sampler"]
    if (sampler["num_workers"], sampler["world_size"]) != (num_workers, world):
        logger.warning("resuming with %d workers x %d ranks instead of %d x %d: training continues, but "
                       "the patch order differs from an uninterrupted run", num_workers, world,
                       sampler["num_workers"], sampler["world_size"])
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_states(checkpoint["rng"][rank] if rank < len(checkpoint["rng"]) else checkpoint["rng"][0])
    return checkpoint["best_model"], LoopState(**checkpoint["state"])

