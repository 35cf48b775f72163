"""Distil the four FCDiffusion teachers (one per control mode) into one few-step, guidance-free student.

    python fcdiffusion_distill.py                                       # configs/distill_config.yaml (SD 2.1-base)
    python fcdiffusion_distill.py --config configs/distill_config_tiny.yaml --max_steps 50
    python fcdiffusion_distill.py --devices 8 --strategy ddp --num_nodes 2 --precision bf16
    python fcdiffusion_distill.py --trainable control_net lora --student_steps 1 2 4 --guidance_scale 7.5
    python fcdiffusion_distill.py --teacher_dtype bf16 --precision bf16   # teachers in half the memory
    python fcdiffusion_distill.py --val_data datasets/training_data_val.json --val_every 500 --ema_decay 0.999
    python fcdiffusion_distill.py --guidance_range 2 14 --teacher_sampler dpmpp_2m   # w chosen at inference

Settings come from the config; flags override it, and `key.sub=value` arguments override any entry (e.g.
`distill.band_weights.high_pass.f50_up=4`, `model.params.guidance_scale=7.5`). Checkpoints (the student and its
optimizer state, never the teachers) go to `<logdir>/fcdiffusion_distill_checkpoint/`, with the student-only
weights `student.safetensors` beside them; running the same command again resumes from `last.ckpt`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from fcdiffusion import cli
from fcdiffusion.core.frequency import CONTROL_MODES
from fcdiffusion.core.paths import (
    DOWNLOAD_HELP,
    LAST_CHECKPOINT,
    distill_checkpoint_dir,
    student_file,
    teacher_checkpoint,
)
from fcdiffusion.core.student import TRAINABLE_PARTS
from fcdiffusion.core.weights import distilled_student_config, teacher_model_config
from fcdiffusion.train.data_module import RunData
from fcdiffusion.train.distiller import FrequencyDistiller, StudentExport
from fcdiffusion.train.training import (
    build_trainer,
    check_train_section,
    fit,
    locked_run,
    resume_checkpoint,
    resume_conflicts,
)
from ldm.util import load_config

log = logging.getLogger("fcdiffusion_distill")

# What a resumed distillation must share with its checkpoint (the optimizer state and the sampler depend on them).
RESUME_FIXED = ("trainable", "lora_rank", "lora_alpha", "student_steps", "guidance_range")
DISTILL_FLAGS = {
    "objective": (str, "trajectory (learn the teacher's full guided solve) or progressive (its short sub-step "
                       "solves from noised data); docs/distillation.md"),
    "teacher_steps": (int, "trajectory: steps of the teacher's guided DDIM solve the student learns"),
    "trajectory_pool": (int, "trajectory: solved examples kept to train on"),
    "trajectory_refresh": (int, "trajectory: solve the batch's trajectories every N steps (others reuse the pool)"),
    "trajectory_prefill": (int, "trajectory: solve N trajectories before the first step (trains on a full pool "
                                "from the start), then a batch's every trajectory_refresh steps"),
    "trajectory_prefill_batch": (int, "trajectory: photos per teacher solve while prefilling (0: the batch size; "
                                      "more uses a GPU better, at the memory of a larger no-grad batch)"),
    "trajectory_file": (str, "trajectory: train on the pool saved in this file if it exists (no teacher solves), "
                             "else write the run's pool there at the end (for an ablation on the same trajectories)"),
    "teacher_substeps": (int, "progressive: guided teacher DDIM steps per student step"),
    "guidance_scale": (float, "teachers' classifier-free guidance (default: each teacher's)"),
    "modes_per_step": (int, "modes trained per step (4: all)"),
    "distill_weight": (float, "weight of the frequency-weighted distillation loss"),
    "denoise_weight": (float, "weight of the plain x0 loss against the true latent"),
    "control_weight": (float, "weight of the control-net output matching loss"),
    "teacher_dtype": (str, "dtype of the teachers' tensors and the shared frozen base: fp32, bf16 or fp16 (the "
                           "student's trained tensors stay float32)"),
    "teacher_sampler": (str, "the teachers' sub-step solver: ddim or dpmpp_2m (DPM-Solver++(2M))"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--config", default="configs/distill_config.yaml", help="distillation config (YAML)")
    parser.add_argument("--model_config", help="the teachers' model config (default: the config's model_config)")
    for mode in CONTROL_MODES:
        parser.add_argument(f"--teacher_{mode}", help=f"{mode} teacher checkpoint (default: config teachers.{mode})")
    parser.add_argument("--student_init", help="student initialisation: a teacher or tool_add_control checkpoint")
    parser.add_argument("--trainable", nargs="+", choices=TRAINABLE_PARTS, help="what the student trains")
    parser.add_argument("--lora_rank", type=int, help="LoRA rank (with --trainable lora)")
    parser.add_argument("--student_steps", type=int, nargs="+", metavar="K",
                        help="the step counts the student is trained for and will sample with (trailing schedules)")
    parser.add_argument("--guidance_range", type=float, nargs=2, metavar=("LO", "HI"),
                        help="distil a guidance-conditioned student: w drawn per example from [LO, HI]")
    cli.add_flags(parser, {**DISTILL_FLAGS, **cli.RUN_FLAGS})
    return parser


def resolve_config(args: argparse.Namespace, overrides: list[str]) -> DictConfig:
    """The config with flags applied: flags win over dotlist overrides, which win over the file."""
    config = load_config(args.config, overrides)
    cli.apply_flags(config.train, args, cli.RUN_FLAGS)
    cli.apply_flags(config.distill, args, DISTILL_FLAGS)
    if args.guidance_range is not None:
        config.distill.guidance_range = args.guidance_range
    if args.student_steps is not None:  # one count stays a number, as configs and older checkpoints write it
        config.distill.student_steps = args.student_steps[0] if len(args.student_steps) == 1 else args.student_steps
    for mode in CONTROL_MODES:
        if getattr(args, f"teacher_{mode}") is not None:
            config.teachers[mode] = getattr(args, f"teacher_{mode}")
    for flag, key in (("student_init", "init"), ("trainable", "trainable"), ("lora_rank", "lora_rank")):
        if getattr(args, flag) is not None:
            config.student[key] = getattr(args, flag)
    if args.model_config is not None:
        config.model_config = args.model_config
    check_train_section(config.train)
    return config


def missing_teacher_message(config: DictConfig, mode: str, path: str) -> str:
    """Names the missing file and the command that trains it (where fcdiffusion_train.py would write it)."""
    command = f"python fcdiffusion_train.py --config {config.model_config} --control_mode {mode}"
    logdir = Path(path).parent.parent
    if Path(path) == teacher_checkpoint(logdir, mode):
        command += f" --logdir {logdir}"
    return (f"teacher checkpoint for {mode} not found: {path}\nTrain it with:\n  {command}\n"
            f"or point teachers.{mode} (--teacher_{mode}) at an existing {mode} teacher checkpoint.")


def check_inputs(config: DictConfig, resume: bool) -> None:
    """Raise a FileNotFoundError naming every missing teacher / student-initialisation file (the student init is
    not needed to resume)."""
    errors = [missing_teacher_message(config, mode, path) for mode, path in config.teachers.items()
              if not os.path.isfile(path)]
    if not resume and not os.path.isfile(config.student.init):
        errors.append(f"student initialisation not found: {config.student.init}\nUse a teacher checkpoint, or "
                      f"build the FCDiffusion init with tool_add_control_sd21.py:\n{DOWNLOAD_HELP}")
    if errors:
        raise FileNotFoundError("\n\nerror: ".join(errors))


def build_distiller(config: DictConfig, student_init: str) -> FrequencyDistiller:
    student = OmegaConf.to_container(config.student, resolve=True)
    student.pop("init")
    return FrequencyDistiller(
        teacher_model_config(config), teachers=dict(config.teachers), student_init=student_init, student=student,
        distill=OmegaConf.to_container(config.distill, resolve=True), learning_rate=config.train.learning_rate)


def checkpoint_folder(config: DictConfig) -> str:
    """Where this distillation's checkpoints go."""
    return os.fspath(distill_checkpoint_dir(config.train.logdir))


def run(args: argparse.Namespace, overrides: list[str], extra_callbacks: Sequence[pl.Callback] = ()) -> None:
    """Distil in a locked checkpoint folder; the config, the data and the teachers' files are checked first."""
    config = resolve_config(args, overrides)
    with locked_run(config.train, checkpoint_folder(config)) as data:
        distill(config, data, extra_callbacks)


def distill(config: DictConfig, data: RunData, extra_callbacks: Sequence[pl.Callback]) -> None:
    """The run itself, in a locked checkpoint folder: resume or initialise, then fit."""
    train, folder = config.train, Path(checkpoint_folder(config))
    resume = resume_checkpoint(folder, train.max_steps, train.optimizer)
    check_inputs(config, resume is not None)
    if resume:
        conflicts = resume_conflicts(resume[1], distilled_student_config(config)["params"], RESUME_FIXED)
        if conflicts:
            raise ValueError(f"{resume[0]} was distilled with other student options ({'; '.join(conflicts)}); "
                             "resume with the same options, or distil into another --logdir")
    pl.seed_everything(train.seed, workers=True)
    # On resume the student (with the values it is sharing) comes from the checkpoint; fit() restores the rest.
    distiller = build_distiller(config, resume[0] if resume else config.student.init)
    trainer = build_trainer(train, os.fspath(folder), "fcdiffusion_distill",
                            [StudentExport(student_file(train.logdir)), *extra_callbacks])
    fit(distiller, data, train, trainer, resume[0] if resume else None, folder / LAST_CHECKPOINT)


def main(argv: Sequence[str] | None = None, extra_callbacks: Sequence[pl.Callback] = ()) -> int:
    return cli.main(build_parser(), lambda args, overrides: run(args, overrides, extra_callbacks), argv,
                    unknown="overrides")


if __name__ == "__main__":
    sys.exit(main())
