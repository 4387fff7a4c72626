"""One training run: build everything from the hyperparameters, resume, train, validate, test.

The loop counts optimiser steps; an epoch is ``steps_per_epoch`` of them (patch sampling has no
natural epoch). After each epoch every rank validates its share of the validation cases, rank 0
writes the metrics line, the kept weights and a checkpoint. A checkpoint holds everything the
next step depends on: weights, optimiser, schedule, gradient scaler, loop counters, early-stopping
state, every RNG state and the patch-stream position, so a resumed run continues bit for bit
(on CPU with deterministic settings) where the checkpoint was taken.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import time

import torch
from torch.utils.data import DataLoader

from brainseg.bill import Bill, bill_text
from brainseg.config import Hyperparameters
from brainseg.data.augment import augment_batch
from brainseg.data.fingerprint import LesionCounts
from brainseg.data.splits import SPLITS
from brainseg.data.stream import slab_cost_bytes
from brainseg.detection import Threshold
from brainseg.environment import Environment
from brainseg.io import cache, s3
from brainseg.io.store import Store
from brainseg.layout import RunLayout
from brainseg.metric_lines import EPOCH, TEST
from brainseg.model.artifact import artifact_bytes
from brainseg.model.description import ModelDescription
from brainseg.model.inferer import autocast
from brainseg.model.optim import build_optimizer, build_scheduler
from brainseg.postprocess import offer, validation_record
from brainseg.progress import Progress
from brainseg.run import distributed
from brainseg.run.cases import (
    case_splits,
    check_patch_fits,
    load_catalog,
    patch_loader,
    resolve_target_spacing,
    select_cases,
)
from brainseg.run.checkpoint import CheckpointStore
from brainseg.run.errors import Interrupted, TrainingError
from brainseg.run.evaluate import (
    aggregate,
    choose_detection,
    choose_postprocessing,
    detection,
    evaluate,
    sequence_importance,
    validation_matches,
)
from brainseg.run.forecast import actual_bill, forecast_bill, this_job
from brainseg.run.model_output import describe, write_model_output
from brainseg.run.ownership import RunLock, resolve_run_name
from brainseg.run.plan import plan_run
from brainseg.run.requests import cache_fit, cache_fit_text, request_fields, request_totals
from brainseg.run.resume import check_resumable, restore
from brainseg.run.starting_model import encoder_bytes, starting_model
from brainseg.run.state import (
    LoopState,
    checkpoint_bytes,
    code_version,
    configure_determinism,
    load_checkpoint,
    rng_states,
)
from brainseg.run.tracking import Tracker
from brainseg.stream_config import MiB, check_budget
from brainseg.tasks import task_of

logger = logging.getLogger("brainseg.train")


def missing_compiler(device: torch.device) -> str:
    """The compiler ``torch.compile`` needs on ``device`` when this machine has none, else "":
    a C++ compiler for inductor's CPU kernels, a C compiler for Triton's launcher on a GPU."""
    variable, *programs = ("CC", "cc", "gcc", "clang") if device.type == "cuda" else ("CXX", "c++", "g++", "clang++")
    if os.environ.get(variable) or any(shutil.which(program) for program in programs):
        return ""
    return f"a {'C' if device.type == 'cuda' else 'C++'} compiler (${variable}, or {', '.join(programs)} on PATH)"


class Trainer:
    """A training run; ``execute()`` trains, evaluates and returns the summary (``None`` on ranks > 0).

    Constructing one does no I/O; :meth:`connect` joins the process group and opens the run's
    storage, :meth:`build` reads the data set and makes the model, :meth:`train` is the loop.
    """

    def __init__(self, hp: Hyperparameters, env: Environment, given: frozenset = frozenset()):
        self.hp, self.given = hp, given  # given: the flags the user set (a plan fills in the others)
        self.task, self.env, self.state, self.started = task_of(hp), env, LoopState(), time.time()
        self.lock: RunLock | None = None
        self.tracker = Tracker("", hp.mlflow_experiment)  # inert until connect()
        self.interrupted = self.output_ready = False
        self.kept_matches: dict | None = None  # the kept weights' validation lesion matches by case (postprocessing)
        self.postprocessing: dict = {}  # {structure: brainseg.postprocess.Choice}, chosen before the test
        self.detection: Threshold | None = None  # the tumour-present threshold, chosen with the postprocessing
        self.cache_fit: dict = {}  # the training cases against the local cache (requests.cache_fit), at build
        self.forecast: Bill | None = None  # the run's bill forecast at build (rank 0)
        # the last validation's reads: a stream in this process (no workers) counts them again in
        # its next sample, as it counts every read of the process since its last sample
        self.counted_twice = [0] * len(cache.IO_FIELDS)

    # ----------------------------------------------------------------- setup
    def connect(self) -> None:
        """Join the process group, name the run and open its storage (nothing is written yet)."""
        hp, env = self.hp, self.env
        self.rank, self.world, self.device = distributed.setup()
        self.main = self.rank == 0
        if hp.precision == "fp16" and self.device.type != "cuda":
            raise TrainingError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
        if hp.compile and (missing := missing_compiler(self.device)):
            raise TrainingError(f"--compile true needs {missing} to build torch.compile's kernels on "
                                f"{self.device.type}, and this machine has none (the brainseg images hold no "
                                "compiler); install one (apt-get install g++) or train with --compile false")
        configure_determinism(hp)
        self.run_name = resolve_run_name(hp, env)
        self.lock = RunLock(hp.output_uri, self.run_name, env.job_name) if self.main else None
        self.store = Store(hp.output_uri, self.run_name, before_write=self.lock.check if self.lock else None)
        self.checkpoints = CheckpointStore(self.store, env.checkpoint_dir)
        self.tracker = Tracker(hp.mlflow_tracking_uri if self.main else "", hp.mlflow_experiment)
        cache.configure(hp.cache_dir or env.cache_dir, hp.cache_gb)

    def build(self) -> None:
        """Take the run's lock, read the catalog, choose the cases and grid, make the model and
        optimiser, and resume from the newest checkpoint if there is one."""
        hp = self.hp
        s3.check_bucket(hp.output_uri)
        if self.lock is not None:
            self.lock.acquire()  # before anything is written to the run folder
            self.output_ready = True
        s3.check_bucket(hp.data_uri)
        self.catalog = load_catalog(hp)
        self.case_splits = case_splits(hp, self.catalog)
        self.train_cases, self.val_cases, self.test_cases = select_cases(hp, self.catalog, self.case_splits)
        if hp.plan == "auto":
            self.hp = hp = plan_run(hp, self.given, self.train_cases, self.task.out_channels, self.device,
                                    self.store if self.main else None)
        self.target_spacing = resolve_target_spacing(hp, self.train_cases)
        self.cache_fit = cache_fit(self.train_cases, hp.cache_gb if cache.active() is not None else 0.0)
        if self.main:
            fits = self.cache_fit["expected_hit_fraction"] >= 1.0 or not self.cache_fit["cache_gb"]
            (logger.info if fits else logger.warning)(cache_fit_text(self.cache_fit))
        check_patch_fits(hp, self.train_cases, self.target_spacing)
        if self.device.type == "cpu":
            distributed.use_cpu_threads()
            logger.info("training on the CPU: %d intra-op thread(s) beside %d DataLoader worker(s)",
                        torch.get_num_threads(), hp.num_workers)
        try:
            check_budget(hp.memory_budget_mb * MiB, hp.num_workers,
                         max(slab_cost_bytes(case, hp.stream_config(), self.target_spacing) for case in self.train_cases))
        except ValueError as err:
            raise TrainingError(str(err)) from err
        if self.main:
            active = cache.active()
            self.forecast = forecast_bill(hp, self.train_cases, self.val_cases, self.target_spacing,
                                          cache_bytes=active.max_bytes if active is not None else 0,
                                          start=active,
                                          **this_job(self.env, self.world))
            logger.info("%s", bill_text(self.forecast))
        self.model = starting_model(hp, self.task.out_channels, self.device)
        self.total_steps = hp.epochs * hp.steps_per_epoch
        if hp.warmup_steps >= self.total_steps and hp.schedule != "onecycle":
            logger.warning("warmup_steps %d is not shorter than the run (%d steps): the learning rate never reaches "
                           "--lr %g; lower --warmup-steps", hp.warmup_steps, self.total_steps, hp.lr)
        self.optimizer = build_optimizer(self.model.parameters(), hp.optimizer, hp.lr, hp.weight_decay, hp.momentum)
        self.scheduler = build_scheduler(self.optimizer, hp.schedule, hp.lr, hp.warmup_steps, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=hp.precision == "fp16")
        self.loss_fn = self.task.loss(hp)
        self.kept_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.resume()
        self.network = self.model
        if self.world > 1:
            self.network = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if hp.compile:
            self.network = torch.compile(self.network)

    def resume(self) -> None:
        """Continue from the newest complete checkpoint of this run, if there is one."""
        found = self.checkpoints.newest(load_checkpoint)
        if found is None:
            logger.info("run %s: new run, artifacts under %s", self.run_name, self.store.uri)
            return
        checkpoint, pointer = found
        try:
            check_resumable(checkpoint, self.hp, self.catalog.fingerprint, self.splits(), self.run_name,
                            pointer["checkpoint"])
        except TrainingError:
            self.output_ready = False  # refused: the run stays its checkpoint's, and nothing is written into it
            raise
        self.kept_weights, self.state = restore(checkpoint, self.rank, self.world, self.hp.num_workers, self.model,
                                                self.optimizer, self.scheduler, self.scaler)
        logger.info("run %s: resumed from %s (%s) at epoch %d, step %d", self.run_name, pointer["checkpoint"],
                    pointer["source"], self.state.epoch, self.state.step)

    def splits(self) -> dict:
        """The case IDs of each split of the run (what a checkpoint records)."""
        return {name: sorted(case for case, split in self.case_splits.items() if split == name) for name in SPLITS}

    def loader(self) -> DataLoader:
        return patch_loader(self.hp, self.train_cases, self.target_spacing, self.state.step, self.rank, self.world,
                            self.device)

    # ----------------------------------------------------------------- checkpoints
    def checkpoint(self) -> bytes:
        """This rank's part of a checkpoint (the RNG gather is a collective: every rank takes part)."""
        return checkpoint_bytes(
            hyperparameters=self.hp.to_dict(), model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(), best_model=self.kept_weights,
            state=dataclasses.asdict(self.state), rng=distributed.gather(rng_states()),
            sampler={"start_batch": self.state.step, "batch_size": self.hp.batch_size,
                     "num_workers": self.hp.num_workers, "world_size": self.world},
            dataset_fingerprint=self.catalog.fingerprint, splits=self.splits(), code_version=code_version())

    def save_checkpoint(self) -> None:
        data = self.checkpoint()  # a collective: every rank takes part
        if self.main:
            name = self.checkpoints.save(data, self.state.step, self.state.epoch, self.hp.keep_checkpoints)
            logger.info("checkpoint %s (%.1f MiB) at epoch %d step %d", name, len(data) / 2**20,
                        self.state.epoch, self.state.step)
        distributed.barrier()

    def write_status(self, status: str, **extra) -> None:
        if self.main:
            self.store.put_json(RunLayout.STATUS, {
                "run_name": self.run_name, "status": status, "started": self.started, "updated": time.time(),
                "hyperparameters": self.hp.to_dict(), "world_size": self.world, "device": self.device.type,
                "code_version": code_version(), **extra})

    # ----------------------------------------------------------------- the loop
    def train_step(self, batch: dict) -> float:
        hp = self.hp
        image, label = (batch[name].to(self.device, non_blocking=True) for name in ("image", "label"))
        if "augment" in batch:  # each patch's draws, applied here on the training device
            image, label = augment_batch(image, label, batch["augment"], minmax=hp.normalization == "minmax")
        inputs, target = self.task.inputs_and_target({"image": image, "label": label}, hp.seed, self.state.step)
        with autocast(self.device, hp.precision):
            output = self.network(inputs)
        loss = self.loss_fn(output.float(), target)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if hp.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), hp.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach())

    def train(self) -> None:
        """Epochs of ``steps_per_epoch`` steps, each ended by a validation and a checkpoint, until the
        last epoch, an early stop or SIGTERM (which saves a checkpoint where it stopped)."""
        hp, state = self.hp, self.state
        batches = iter(self.loader())
        progress = Progress(self.total_steps, state.step, log_every=hp.log_every, enabled=self.main)
        try:
            while state.epoch < hp.epochs and not state.stopped_early and not self.interrupted:
                while state.epoch_steps < hp.steps_per_epoch and not self.interrupted:
                    self.timed_step(batches, progress)
                    if hp.checkpoint_steps and state.step % hp.checkpoint_steps == 0 \
                            and state.epoch_steps < hp.steps_per_epoch:
                        self.save_checkpoint()
                if self.interrupted:
                    break
                self.end_epoch()
                self.save_checkpoint()
        finally:
            progress.close()
        if self.interrupted:
            self.save_checkpoint()

    def timed_step(self, batches, progress: Progress) -> None:
        """Wait for the next batch, take one step, and count the step, its loss and its times."""
        hp, state = self.hp, self.state
        started = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - started
        loss = self.train_step(batch)
        if not math.isfinite(loss):
            raise TrainingError(f"training loss is {loss} at step {state.step + 1}; lower --lr or enable --grad-clip")
        state.step += 1
        state.epoch_steps += 1
        state.epoch_loss += loss
        state.epoch_wait += waited
        state.epoch_seconds += time.perf_counter() - started
        state.epoch_io = [total + int(value) - twice for total, value, twice in
                          zip(state.epoch_io, batch["io"].sum(0), self.counted_twice)]
        self.counted_twice = [0] * len(cache.IO_FIELDS)
        if self.world > 1:  # every rank stops at the same step
            self.interrupted = distributed.total(float(self.interrupted), self.device) > 0
        rate = state.epoch_steps * hp.batch_size * self.world / max(state.epoch_seconds, 1e-9)
        progress.update(state.step, epoch=state.epoch + 1, loss=loss, lr=self.scheduler.get_last_lr()[0],
                        patches_per_s=rate, data_wait_fraction=state.epoch_wait / max(state.epoch_seconds, 1e-9))

    def end_epoch(self) -> None:
        hp, state = self.hp, self.state
        seconds = distributed.mean(state.epoch_seconds, self.device)
        line = {
            "epoch": state.epoch + 1, "step": state.step, "lr": self.scheduler.get_last_lr()[0],
            "train_loss": distributed.mean(state.epoch_loss / state.epoch_steps, self.device),
            "patches_per_s": distributed.total(state.epoch_steps * hp.batch_size / state.epoch_seconds, self.device),
            "data_wait_fraction": distributed.mean(state.epoch_wait / state.epoch_seconds, self.device),
            "seconds": seconds,
        }
        if self.device.type == "cuda":  # this rank's peak since the start: what --plan auto estimated
            line["gpu_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        started, reads = time.perf_counter(), cache.io_counters()
        evaluated = evaluate(self.model, self.val_cases, hp, self.task, self.device, self.target_spacing, phase="val")
        results = aggregate(evaluated)
        if not results.get("cases"):
            raise TrainingError(f"none of the {len(self.val_cases)} validation cases could be read (see the warnings "
                                "above); exclude the damaged cases or list others as 'val' in manifest.csv")
        fields, metric = self.task.validation(results)
        line.update(fields)
        line["val_seconds"] = time.perf_counter() - started
        validation_reads = [after - before for before, after in zip(reads, cache.io_counters())]
        line.update(request_fields(state.epoch_io, validation_reads, state.epoch_steps * hp.batch_size,
                                   hp.get_price_per_1000, self.device))
        if not hp.num_workers:
            self.counted_twice = validation_reads
        state.epoch += 1
        improved = metric > state.best_metric
        if improved:
            state.best_metric, state.best_epoch, state.stale = metric, state.epoch, 0
        else:
            state.stale += 1
            if hp.patience and state.stale >= hp.patience:
                state.stopped_early = True
        if improved or hp.keep_weights == "last":
            state.kept_epoch = state.epoch
            self.kept_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.kept_matches = {result.case_id: result.lesion_matches for result in evaluated if result.lesion_matches}
            if self.main:
                self.save_model()
        line.update(self.task.best_field(state.best_metric))
        state.history.append(line)
        state.epoch_loss = state.epoch_wait = state.epoch_seconds = 0.0
        state.epoch_steps = 0
        state.epoch_io = [0] * len(cache.IO_FIELDS)
        if self.main:
            self.store.put_jsonl(RunLayout.METRICS, state.history)
            logger.info("%s", EPOCH.format(line, "best" if improved else ""))
            self.tracker.epoch(line)
            if state.stopped_early:
                logger.info("early stop: no improvement for %d validations; best epoch %d", state.stale,
                            state.best_epoch)

    def description(self) -> ModelDescription:
        """What the kept weights need to be run on new studies (written beside them)."""
        return describe(self.hp, self.task.out_channels, self.target_spacing, self.run_name, self.catalog.fingerprint,
                        self.state, self.postprocessing, self.detection)

    def save_model(self) -> None:
        description = self.description()
        self.store.put(RunLayout.MODEL, artifact_bytes(description, self.kept_weights))
        self.store.put_json(RunLayout.MODEL_DESCRIPTION, description.to_dict())
        if self.task.transfers_encoder:
            self.store.put(RunLayout.ENCODER, encoder_bytes(self.model, self.hp))

    # ----------------------------------------------------------------- the end
    def choose_postprocessing(self) -> None:
        """Each structure's postprocessing, chosen on the validation cases with the kept weights
        among the rules the training labels support, and then the detection threshold; the matches
        and offers are written for a cross-validation to pool."""
        if not self.task.needs_masks:
            return
        again = lambda: evaluate(self.model, self.val_cases, self.hp, self.task, self.device, self.target_spacing,
                                 phase="val (postprocessing)")
        matches = validation_matches(self.kept_matches, again)
        offers = {structure.name: offer(LesionCounts.of(self.train_cases, structure.values))
                  for structure in self.task.scheme.structures}
        self.postprocessing = choose_postprocessing(matches, offers)
        truths = {case.case_id: case.summary.tumour_voxels > 0 for case in self.val_cases}
        self.detection = choose_detection(matches, {name: choice.rule for name, choice in self.postprocessing.items()},
                                          truths)
        if self.main:
            self.store.put_json(RunLayout.VALIDATION_MATCHES, validation_record(matches, offers, truths))
            self.save_model()  # the model artifact carries the choices

    def test(self) -> dict:
        hp = self.hp
        self.model.load_state_dict(self.kept_weights)
        self.choose_postprocessing()
        rules = {name: choice.rule for name, choice in self.postprocessing.items()}
        results = (evaluate(self.model, self.test_cases, hp, self.task, self.device, self.target_spacing,
                            crops=hp.save_predictions, phase="test", postprocessing=rules)
                   if self.test_cases else [])
        scores = aggregate(results)
        state = self.state
        summary = {"run_name": self.run_name, "status": "finished", "best_epoch": state.best_epoch,
                   "kept_epoch": state.kept_epoch, "keep_weights": hp.keep_weights,
                   "epochs_run": state.epoch, "steps": state.step, "stopped_early": state.stopped_early,
                   "test_cases": len(results), "unreadable_test_cases": scores.get("unreadable", 0),
                   "hyperparameters": hp.to_dict(), "dataset_fingerprint": self.catalog.fingerprint,
                   "code_version": code_version(), "world_size": self.world, "device": self.device.type,
                   "seconds": time.time() - self.started, "fold": hp.fold if hp.fold >= 0 else None,
                   "folds": hp.folds if hp.fold >= 0 else None, "splits": self.case_splits}
        summary.update(self.task.summary(self.state.best_metric, scores))
        if self.postprocessing:
            summary["postprocessing"] = {name: choice.to_dict() for name, choice in self.postprocessing.items()}
        if self.detection is not None and results:
            summary["detection"] = detection(results, self.detection)
        if results and hp.sequence_importance and len(hp.sequence_names) > 1 and self.task.needs_masks:
            summary["sequence_importance"] = sequence_importance(self.model, self.test_cases, hp, self.task, self.device,
                                                                 self.target_spacing, rules, results)
        summary["s3_requests"] = {**self.cache_fit, **request_totals(self.state.history)}
        if self.main:
            actual = actual_bill(hp, self.state.history, state.step, **this_job(self.env, self.world))
            summary["bill"] = {"forecast": self.forecast.to_json(), "actual": actual.to_json()}
            self.store.put_csv(RunLayout.TEST_CASES, [result.row(self.detection) for result in results])
            for result in results:
                if result.crop is not None:
                    self.store.put_npz(RunLayout.prediction(result.case_id), result.crop)
            self.store.put_json(RunLayout.SUMMARY, summary)
            self.tracker.summary(summary)
            write_model_output(self.env.model_dir, description := self.description(), self.kept_weights, hp)
            self.tracker.model(self.env.model_dir, description)
            logger.info("%s", TEST.format({**self.task.test_values(scores), "cases": len(results),
                                           "best_epoch": self.state.best_epoch, "kept_epoch": self.state.kept_epoch}))
        return summary

    def execute(self) -> dict | None:
        """Train and test; the summary on rank 0.

        Raises:
            TrainingError: bad configuration or data (nothing trained).
            s3.S3Error: S3 unreachable or an artifact upload failed after retries.
        """
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        status = "failed"
        try:
            self.connect()
            self.build()
            self.write_status("running", epoch=self.state.epoch, step=self.state.step)
            self.tracker.start(self.run_name, self.hp.to_dict())
            self.train()
            if self.interrupted:
                status = "interrupted"
                self.write_status(status, epoch=self.state.epoch, step=self.state.step)
                raise Interrupted(f"stopped by SIGTERM at step {self.state.step}; the checkpoint is saved and "
                                    "the same command resumes")
            summary = self.test()
            self.write_status("finished", epoch=self.state.epoch, step=self.state.step)
            status = "finished"
            return summary if self.main else None
        except BaseException as err:
            if not self.interrupted and self.output_ready and not self.lock.lost:
                try:
                    self.write_status("failed", error=f"{type(err).__name__}: {err}"[:2000])
                except s3.S3Error:
                    logger.warning("could not record the failure in %srun.json", self.store.uri)
            raise
        finally:
            self.tracker.end({"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))
            if self.lock is not None:
                self.lock.release(status)
            cache.disable()
            signal.signal(signal.SIGTERM, previous)
            distributed.teardown()

    def _on_sigterm(self, signum, frame) -> None:
        logger.warning("SIGTERM: finishing the current step, saving a checkpoint and stopping")
        self.interrupted = True
