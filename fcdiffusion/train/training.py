"""The Lightning run shared by teacher training, distillation and train_sd.py: the `train:` section, Trainer, data,
fit and resume (the scripts' flags for it: `fcdiffusion.cli.RUN_FLAGS`).

Nothing a run has done is lost: SIGINT or SIGTERM (a cluster preempting the job) finishes the current step,
saves `last.ckpt` and raises `TrainingStopped`, with which a script exits with 128 + the signal number, so a
scheduler sees the run did not finish and the same command resumes it. Resume takes the loadable checkpoint
holding the most optimizer steps (`last.ckpt`, which every save replaces whatever the interval, or the newest intact
`step-*.ckpt` when `last.ckpt` is damaged), and refuses a `max_steps` below them. A log folder in use by another run
is refused, a non-finite loss stops the run with an error, and a learning rate changed between runs is applied (and
said).

What a long run adds, all through Lightning: validation every `val_every` optimizer steps on `val_data` with the
best `keep_best` checkpoints kept by `val/loss` (`best-*.ckpt`, beside `step-*.ckpt` and `last.ckpt`); an EMA of
the trained weights (`fcdiffusion.train.ema`); a learning-rate warm-up and schedule (`fcdiffusion.train.lr_schedule`),
gradient clipping and accumulation (Trainer arguments); metrics and image grids in TensorBoard event files
beside the CSV ones; and tar shards as training data (`fcdiffusion.train.shards`). A checkpoint holds the step count,
the optimizer, the scheduler, the EMA and the best-k bookkeeping, so a resumed run continues all of them.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import signal
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.model_helpers import is_overridden
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from fcdiffusion.core.errors import RunError
from fcdiffusion.core.memory import ENCODER_DTYPES, cast_frozen_encoders, check_optimizer, set_gradient_checkpointing
from fcdiffusion.core.paths import LAST_CHECKPOINT
from fcdiffusion.core.precision import lightning_precision, precision_dtype
from fcdiffusion.train.data_module import RunData, train_switch
from fcdiffusion.train.dataset import LATENT_GRID, Augment
from fcdiffusion.train.ema import EMACallback, shards_parameters
from fcdiffusion.train.image_logger import ImageLogger
from fcdiffusion.train.lr_schedule import LRSchedule
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import atomic_path

log = logging.getLogger(__name__)

# `train:` entries a config may leave out, with the values that keep a run as it was before they existed.
RUN_DEFAULTS = {"val_data": None, "val_every": 1000, "val_batches": 0, "keep_best": 5, "ema_decay": 0.0,
                "lr_schedule": "constant", "warmup_steps": 0, "gradient_clip_val": 0.0, "accumulate_grad_batches": 1,
                "gradient_checkpointing": None, "encoder_dtype": "fp32", "optimizer": "adamw"}
# What a checkpoint records of the optimizer that wrote its state (absent: AdamW, the only one before).
OPTIMIZER_KEY = "fcdiffusion_optimizer"


def devices_arg(value: Any) -> Any:
    """Lightning accepts 'auto', an int, or a list/string of ids."""
    text = str(value)
    return int(text) if text.isdigit() else text


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their final path and renamed into place (`ldm.util.atomic_path`): a kill or a full
    disk mid-write leaves the previous file (or none), never a truncated one. Lightning's own writer stages a
    checkpoint in the system temp folder and moves it, which is a plain copy when that folder is on another disk."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def build_trainer(train: DictConfig, ckpt_dir: str, run_name: str, callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    """A Trainer that checkpoints to `ckpt_dir` every N steps (and `last.ckpt`, atomically: `AtomicCheckpointIO`),
    logs metrics (CSV and TensorBoard) and image grids, guards the run (`RunGuard`) and, as `train` asks, validates
    and keeps the best checkpoints, keeps an EMA of the weights, clips and accumulates gradients."""
    validating = bool(train.val_data)
    batches_per_step = int(train.accumulate_grad_batches)
    callbacks = [
        *([EMACallback(float(train.ema_decay))] if train.ema_decay else []),  # first: checkpoints see the update
        RunGuard(os.path.join(ckpt_dir, LAST_CHECKPOINT)),
        # No version counter: `last.ckpt` is replaced at every save whatever the interval was in earlier runs (a
        # changed --checkpoint_every gives the callback another state key, and with the counter it wrote
        # `last-v1.ckpt` beside a stale `last.ckpt`), and a step saved again replaces its file.
        ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step:06d}", every_n_train_steps=train.checkpoint_every,
                        save_top_k=-1, save_last=True, auto_insert_metric_name=False, enable_version_counter=False),
        ImageLogger(every_n_steps=train.log_images_every, max_images=min(4, train.batch_size),
                    out_dir=os.path.join(ckpt_dir, "image_log")),
        LearningRateMonitor(logging_interval="step"),
        *callbacks,
    ]
    if validating:  # last.ckpt stays with the periodic callback above: a second one would write last-v1.ckpt
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best-{step:06d}", monitor="val/loss", mode="min",
                                         save_top_k=int(train.keep_best), auto_insert_metric_name=False,
                                         enable_version_counter=False))
    csv = CSVLogger(train.logdir, name=run_name)
    tensorboard = TensorBoardLogger(train.logdir, name=run_name, version=csv.version, default_hp_metric=False)
    return pl.Trainer(
        max_steps=train.max_steps, accelerator=train.accelerator, devices=devices_arg(train.devices),
        strategy=train.strategy, num_nodes=train.num_nodes, precision=lightning_precision(train.precision),
        callbacks=callbacks, logger=[csv, tensorboard], default_root_dir=train.logdir, plugins=[AtomicCheckpointIO()],
        log_every_n_steps=train.get("log_every", 50), enable_model_summary=False,
        gradient_clip_val=float(train.gradient_clip_val) or None, accumulate_grad_batches=batches_per_step,
        # Validation counts training batches: N optimizer steps are N x accumulate batches, across epochs.
        val_check_interval=int(train.val_every) * batches_per_step if validating else None,
        check_val_every_n_epoch=None if validating else 1,
        limit_val_batches=(int(train.val_batches) or 1.0) if validating else 0,
        num_sanity_val_steps=1 if validating else 0,
    )


def check_train_section(train: DictConfig) -> None:
    """Fill in the entries of `RUN_DEFAULTS` a config leaves out, then raise a ValueError naming the first `train:`
    entry that would fail later (or train forever)."""
    for name, value in RUN_DEFAULTS.items():
        if name not in train:
            train[name] = value
    positive = ("max_steps", "batch_size", "checkpoint_every", "resolution", "num_nodes", "val_every", "keep_best",
                "accumulate_grad_batches")
    for name in positive:
        if int(train[name]) < 1:
            raise ValueError(f"--{name} must be at least 1, got {train[name]}")
    for name in ("num_workers", "log_images_every", "val_batches", "warmup_steps"):
        if int(train[name]) < 0:
            raise ValueError(f"--{name} must be at least 0, got {train[name]}")
    if train.resolution % LATENT_GRID:
        raise ValueError(f"--resolution must be a multiple of {LATENT_GRID} (the latent grid), got {train.resolution}")
    if not float(train.learning_rate) > 0:
        raise ValueError(f"--learning_rate must be positive, got {train.learning_rate}")
    if not 0.0 <= float(train.ema_decay) < 1.0:
        raise ValueError(f"--ema_decay must be in [0, 1) (0: no EMA), got {train.ema_decay}")
    if float(train.gradient_clip_val) < 0:
        raise ValueError(f"--gradient_clip_val must be at least 0 (0: no clipping), got {train.gradient_clip_val}")
    lightning_precision(train.precision)
    if train.encoder_dtype not in ENCODER_DTYPES:
        raise ValueError(f"--encoder_dtype must be one of {', '.join(ENCODER_DTYPES)}, got {train.encoder_dtype!r}")
    if train.gradient_checkpointing not in (None, True, False):
        raise ValueError(f"--gradient_checkpointing must be true or false, got {train.gradient_checkpointing!r}")
    check_optimizer(train.optimizer)
    LRSchedule.from_train(train)
    Augment.from_config(train.get("augment"))
    train_switch(train, "cache_images")
    if train_switch(train, "cache_latents") and train.get("augment"):
        raise ValueError("train.cache_latents keeps one latent per image, so it needs the same image at every step: "
                         "leave out train.augment (its random crops change the image) or train.cache_latents")


class RunFolderError(RunError):
    """The checkpoint folder cannot take this run: another run is using it, or it cannot be written."""


@contextmanager
def locked_run(train: DictConfig, folder: str | os.PathLike) -> Iterator[RunData]:
    """What a run does before any model is built: open its data (`RunData`, yielded) and lock its checkpoint
    `folder` for the run's duration; raises when either cannot be used."""
    data = RunData.from_train(train)
    with run_folder_lock(folder):
        yield data


@contextmanager
def run_folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold `folder` for this run (global rank zero only), or raise `RunFolderError` naming the holder or the
    reason it cannot be written.

    An advisory `flock` on `<folder>/.run.lock`: released on exit, and by the kernel when the process dies,
    however it dies, so a killed run never leaves a stale lock behind.
    """
    if rank_zero_only.rank != 0:
        yield
        return
    try:
        os.makedirs(folder, exist_ok=True)
        handle = open(os.path.join(folder, ".run.lock"), "a+")
    except OSError as error:
        raise RunFolderError(f"cannot write checkpoints to {folder}: {error.strerror or error}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunFolderError(f"{folder} is in use by a run still going ({holder}); wait for it to end, or give "
                                "this run another --logdir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _training_checkpoint(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(the checkpoint, "") if `path` loads as a Lightning training checkpoint (tensors memory-mapped, not read),
    else (None, why not)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as error:  # truncated zip, text, empty file: torch raises several types
        return None, f"{type(error).__name__}: {error}"
    if not isinstance(checkpoint, Mapping) or not {"state_dict", "global_step"} <= set(checkpoint):
        return None, "not a Lightning training checkpoint"
    return checkpoint, ""


# The files a run folder's resume considers: `last.ckpt` (and the `last-vN.ckpt` older releases could leave), and
# the periodic `step-NNNNNN.ckpt` (`-vN`: a second save of one step). Anchored: no other digits count.
LAST_FILE = re.compile(r"last(?:-v(\d+))?\.ckpt")
STEP_FILE = re.compile(r"step-(\d+)(?:-v(\d+))?\.ckpt")


class Resume(NamedTuple):
    """The checkpoint a run resumes from: its path, its metadata, and the optimizer step it holds."""

    path: str
    metadata: dict[str, str]
    step: int
    optimizer: str = "adamw"


def resume_checkpoint(folder: str | os.PathLike, max_steps: int | None = None,
                      optimizer: str | None = None) -> Resume | None:
    """The newest loadable checkpoint of `folder` to resume from, or None when there is none.

    Newest by the optimizer step recorded inside each file (`global_step`), not by its name or age: `last.ckpt`
    wins ties, a `step-*.ckpt` is read only when its name's step could beat the best found so far. Unreadable
    files are skipped with a warning, and resuming from anything but `last.ckpt` is logged with the reason. With
    `max_steps`, a checkpoint already past it raises a ValueError (the run would stop at once, silently); with
    `optimizer`, a checkpoint whose optimizer state another optimizer wrote raises one too.
    """
    folder = Path(folder)
    lasts, steps = [], []
    for path in folder.glob("*.ckpt"):
        if (match := LAST_FILE.fullmatch(path.name)) is not None:
            lasts.append(((0 if match[1] is None else 1, -int(match[1] or 0)), path))
        elif (match := STEP_FILE.fullmatch(path.name)) is not None:
            steps.append(((int(match[1]), int(match[2] or 0)), path))
    best: Resume | None = None
    last_readable = False
    for _, path in sorted(lasts):  # last.ckpt first, so it wins a tie
        candidate = _loadable(path)
        last_readable |= candidate is not None and path.name == LAST_CHECKPOINT
        if candidate is not None and (best is None or candidate.step > best.step):
            best = candidate
    for (named_step, _), path in sorted(steps, reverse=True):
        if best is not None and named_step <= best.step:
            break
        candidate = _loadable(path)
        if candidate is not None and (best is None or candidate.step > best.step):
            best = candidate
            break
    if best is None:
        return None
    if Path(best.path).name == LAST_CHECKPOINT:
        log.info("resuming from %s (step %d)", best.path, best.step)
    else:
        why = "holds an older step" if last_readable else "is missing or unreadable"
        log.warning("resuming from %s (step %d): %s %s", best.path, best.step, LAST_CHECKPOINT, why)
    if max_steps is not None and best.step > max_steps:
        raise ValueError(f"--max_steps {max_steps} is below the {best.step} steps {best.path} already holds: pass "
                         f"--max_steps {best.step} or more to go on, or another --logdir to start a new run")
    if optimizer is not None and best.optimizer != optimizer:
        raise ValueError(f"{best.path} holds the state of --optimizer {best.optimizer}, not {optimizer}: resume with "
                         f"--optimizer {best.optimizer}, or give another --logdir to start a new run")
    return best


def _loadable(path: Path) -> Resume | None:
    """`path` as a `Resume` if it loads as a training checkpoint, else None (with a warning saying why)."""
    if not path.is_file():
        return None
    checkpoint, problem = _training_checkpoint(path)
    if checkpoint is None:
        log.warning("skipping unreadable checkpoint %s (%s)", path, problem)
        return None
    return Resume(os.fspath(path), dict(checkpoint.get("metadata") or {}), int(checkpoint["global_step"]),
                  str(checkpoint.get(OPTIMIZER_KEY, "adamw")))


def remove_stray_last_versions(folder: str | os.PathLike) -> list[Path]:
    """Remove the `last-vN.ckpt` files beside `last.ckpt` (left by releases whose Lightning callback versioned
    `last` instead of replacing it, older than the `last.ckpt` a finished run just wrote); the paths removed."""
    removed = []
    for path in Path(folder).glob("last-v*.ckpt"):
        if LAST_FILE.fullmatch(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %s: %s is the newest state", ", ".join(p.name for p in sorted(removed)), LAST_CHECKPOINT)
    return removed


def resume_conflicts(metadata: Mapping[str, str], current: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    """'key: checkpoint X, now Y' for each of `keys` whose value in the checkpoint's recorded config (its
    `fcdiffusion.config` params) differs from the current config's params."""
    recorded = json.loads(metadata.get("fcdiffusion.config", "{}")).get("params", {})
    return [f"{key}: checkpoint {recorded.get(key)!r}, now {current.get(key)!r}" for key in keys
            if key in recorded and recorded.get(key) != current.get(key)]


class TrainingStopped(RunError):
    """A run stopped before `max_steps`: failed (status 1), or interrupted by a signal with its progress saved
    (status 128 + signal, labelled `interrupted`)."""

    def __init__(self, message: str, status: int):
        super().__init__(message, status, "error" if status == 1 else "interrupted")


class RunGuard(pl.Callback):
    """Saves progress on SIGINT/SIGTERM and stops on a non-finite loss (checked at the first step and at every
    logged step, when Lightning reads the loss anyway); applies a changed learning rate on resume.

    A signal only sets a flag: the step in progress finishes, then every rank agrees to stop, `last` is written
    and `TrainingStopped` carries exit status 128 + signal. A second Ctrl-C interrupts at once.
    """

    def __init__(self, last: str | os.PathLike):
        self.last = os.fspath(last)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._first_step: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        self._first_step = trainer.global_step
        rate = getattr(pl_module, "learning_rate", None)
        if rate is not None:
            self.apply_learning_rate(trainer, float(rate))

    @staticmethod
    def apply_learning_rate(trainer: pl.Trainer, rate: float) -> None:
        """Make `rate` the base learning rate of every optimizer; a scheduled rate keeps its factor."""
        scheduled = {id(config.scheduler.optimizer): config.scheduler for config in trainer.lr_scheduler_configs}
        for optimizer in trainer.optimizers:
            scheduler = scheduled.get(id(optimizer))
            for i, group in enumerate(optimizer.param_groups):
                base = scheduler.base_lrs[i] if scheduler is not None else group["lr"]
                if math.isclose(base, rate):
                    continue
                log.info("learning rate %g from the checkpoint replaced by %g", base, rate)
                group["lr"] = group["lr"] * rate / base if scheduler is not None else rate
                if scheduler is not None:
                    scheduler.base_lrs[i] = group["initial_lr"] = rate

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == (self._first_step or 0) + 1 or step % trainer.log_every_n_steps == 0:
            loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
            if loss is not None and not torch.isfinite(loss.detach()).all():
                raise TrainingStopped(f"the loss is {loss.item()} at step {step}: check the weights, the data, "
                                      "--learning_rate and --precision; last.ckpt was not updated", 1)
        if trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
            trainer.save_checkpoint(self.last)
            name = signal.Signals(self.signum or signal.SIGTERM).name
            raise TrainingStopped(f"stopped by {name} at step {trainer.global_step}; progress saved to {self.last}; "
                                  "run the same command to resume", 128 + (self.signum or signal.SIGTERM))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Record which optimizer wrote the optimizer state (`resume_checkpoint` refuses another)."""
        checkpoint[OPTIMIZER_KEY] = getattr(pl_module, "optimizer_name", "adamw")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def apply_memory_options(module: pl.LightningModule, train: DictConfig) -> None:
    """Apply the `train:` entries that trade memory: `gradient_checkpointing` (None: as the model config says) on
    the module and, for the distiller, its teachers (whose forwards keep no graph either way); `encoder_dtype` to
    the frozen VAE and text encoder; `optimizer` (the module's `optimizer_name`). A ValueError for a module that
    cannot take one of them."""
    models = module.models() if hasattr(module, "models") else [module]
    if train.get("gradient_checkpointing") is not None:
        switched = set_gradient_checkpointing(models, train.gradient_checkpointing)
        log.info("gradient checkpointing %s (%d blocks)", "on" if train.gradient_checkpointing else "off", switched)
    encoder_dtype = train.get("encoder_dtype", "fp32")
    if encoder_dtype != "fp32":
        if not any(hasattr(m, "first_stage_model") and hasattr(m, "cond_stage_model") for m in models):
            raise ValueError(f"{type(module).__name__} has no frozen VAE and text encoder: leave out --encoder_dtype")
        cast = cast_frozen_encoders(models, precision_dtype(encoder_dtype))
        log.info("frozen VAE and text encoder held in %s (%.1fM parameters cast)", encoder_dtype, cast / 1e6)
    optimizer = train.get("optimizer", "adamw")
    if hasattr(module, "optimizer_name"):
        module.optimizer_name = optimizer
    elif optimizer != "adamw":
        raise ValueError(f"{type(module).__name__} takes no --optimizer")


def apply_latent_cache(module: pl.LightningModule, train: DictConfig) -> None:
    """`train.cache_latents`: every latent-diffusion model of `module` keeps its training images' VAE posteriors
    (`LatentDiffusion.first_stage_posterior`: the frozen encoder runs once per image); a ValueError for a module
    without one (an autoencoder trains its encoder)."""
    if not train_switch(train, "cache_latents"):
        return
    models = [m for m in (module.models() if hasattr(module, "models") else [module]) if isinstance(m, LatentDiffusion)]
    if not models:
        raise ValueError(f"{type(module).__name__} encodes with no frozen VAE: leave out train.cache_latents")
    for model in models:
        model.latent_cache = {}


def fit(module: pl.LightningModule, data: RunData, train: DictConfig, trainer: pl.Trainer,
        resume_from: str | None, last: str | os.PathLike) -> None:
    """Train `module` on `data` up to `max_steps`, resuming from `resume_from` if given, and leave `last` up to date
(and no `last-vN.ckpt` beside it).

    Raises a ValueError when the module cannot do what `train` asks (validate, follow a learning-rate schedule),
    before training starts, and `TrainingStopped` when the run failed or was interrupted (its progress saved).
    """
    schedule = LRSchedule.from_train(train)
    if hasattr(module, "lr_schedule"):
        module.lr_schedule = schedule
    elif schedule != LRSchedule(total_steps=schedule.total_steps):
        raise ValueError(f"{type(module).__name__} takes no --lr_schedule or --warmup_steps")
    apply_memory_options(module, train)
    apply_latent_cache(module, train)
    if train.ema_decay and shards_parameters(trainer.strategy):
        raise ValueError(f"--ema_decay needs whole parameters on every device, which "
                         f"{type(trainer.strategy).__name__} splits; use ddp or deepspeed_stage_2, or leave EMA off")
    if data.val_set is not None and not is_overridden("validation_step", module):
        raise ValueError(f"{type(module).__name__} does not validate; leave out --val_data")
    trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    trainer.save_checkpoint(os.fspath(last))
    if trainer.is_global_zero:
        remove_stray_last_versions(os.path.dirname(os.path.abspath(last)))
