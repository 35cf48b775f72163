"""Training runs lose nothing: signals save progress, bad checkpoints fall back, busy folders and changed settings
are refused, a non-finite loss stops the run, bad flags fail before any model is built."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import fcdiffusion_distill
import fcdiffusion_train
from fcdiffusion.core.paths import LAST_CHECKPOINT, distill_checkpoint_dir, teacher_checkpoint_dir
from fcdiffusion.train.training import run_folder_lock
from tests.helpers import ROOT, distill_args, train_args


def global_step(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_progress_and_exits_nonzero_then_the_run_resumes(tiny_files, tmp_path, signum):
    logdir = tmp_path / "logs"
    folder = teacher_checkpoint_dir(logdir, "high_pass")
    args = train_args(tiny_files, logdir, "--max_steps", "100000", "--log_images_every", "0")
    process = subprocess.Popen([sys.executable, "fcdiffusion_train.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while not (folder / "step-000004.ckpt").exists():  # well into training
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-3000:]
        time.sleep(0.2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert f"stopped by {signal.Signals(signum).name}" in stderr and "progress saved" in stderr
    stopped_at = global_step(folder / LAST_CHECKPOINT)
    assert stopped_at >= 4
    assert fcdiffusion_train.main(train_args(tiny_files, logdir, "--max_steps", str(stopped_at + 2))) == 0
    assert global_step(folder / LAST_CHECKPOINT) == stopped_at + 2


@pytest.fixture
def four_steps(tiny_files, tmp_path):
    """A teacher run of 4 steps (checkpoints at steps 2 and 4, and last.ckpt); its log folder."""
    logdir = tmp_path / "logs"
    assert fcdiffusion_train.main(train_args(tiny_files, logdir, "--max_steps", "4", "--log_images_every", "0")) == 0
    return logdir


def test_resume_skips_unreadable_checkpoints_for_the_newest_intact_one(tiny_files, four_steps, caplog):
    folder = teacher_checkpoint_dir(four_steps, "high_pass")
    last = (folder / LAST_CHECKPOINT).read_bytes()
    (folder / LAST_CHECKPOINT).write_bytes(last[: len(last) // 2])  # truncated, as by a full disk
    (folder / "step-000004.ckpt").write_text("not a checkpoint")
    with caplog.at_level(logging.WARNING):
        assert fcdiffusion_train.main(train_args(tiny_files, four_steps, "--max_steps", "5")) == 0
    assert "skipping unreadable checkpoint" in caplog.text and "step-000002.ckpt" in caplog.text
    assert global_step(folder / LAST_CHECKPOINT) == 5  # from step 2, not from 0 and not a crash


def test_missing_last_checkpoint_resumes_from_the_newest_step(tiny_files, four_steps, caplog):
    folder = teacher_checkpoint_dir(four_steps, "high_pass")
    (folder / LAST_CHECKPOINT).unlink()
    with caplog.at_level(logging.INFO):
        assert fcdiffusion_train.main(train_args(tiny_files, four_steps, "--max_steps", "5")) == 0
    assert f"resuming from {folder / 'step-000004.ckpt'}" in caplog.text
    assert global_step(folder / LAST_CHECKPOINT) == 5


def test_a_folder_in_use_or_unwritable_is_refused(tiny_files, tmp_path, capsys):
    folder = teacher_checkpoint_dir(tmp_path / "logs", "high_pass")
    with run_folder_lock(folder):
        assert fcdiffusion_train.main(train_args(tiny_files, tmp_path / "logs", "--max_steps", "1")) == 1
    assert f"in use by a run still going (pid {os.getpid()})" in capsys.readouterr().err
    assert not (folder / LAST_CHECKPOINT).exists()
    assert fcdiffusion_train.main(train_args(tiny_files, tmp_path / "logs", "--max_steps", "1")) == 0  # released
    (tmp_path / "a_file").write_text("not a folder")
    assert fcdiffusion_train.main(train_args(tiny_files, tmp_path / "a_file", "--max_steps", "1")) == 1
    assert f"cannot write checkpoints to {teacher_checkpoint_dir(tmp_path / 'a_file', 'high_pass')}" in \
        capsys.readouterr().err


def test_a_changed_learning_rate_is_applied_on_resume(tiny_files, four_steps, caplog):
    folder = teacher_checkpoint_dir(four_steps, "high_pass")
    with caplog.at_level(logging.INFO):
        args = train_args(tiny_files, four_steps, "--max_steps", "5", "--learning_rate", "5e-4")
        assert fcdiffusion_train.main(args) == 0
    assert "learning rate 0.0001 from the checkpoint replaced by 0.0005" in caplog.text
    checkpoint = torch.load(folder / LAST_CHECKPOINT, map_location="cpu", weights_only=False)
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == 5e-4


def test_resuming_with_other_trained_parts_or_steps_is_refused(tiny_files, four_steps, distilled, workdir, tmp_path,
                                                               capsys):
    assert fcdiffusion_train.main(train_args(tiny_files, four_steps, "--max_steps", "5", "--sd_locked", "false")) == 1
    assert "sd_locked: checkpoint True, now False" in capsys.readouterr().err
    logdir = tmp_path / "distill"
    shutil.copytree(distilled, logdir)
    before = (distill_checkpoint_dir(logdir) / LAST_CHECKPOINT).read_bytes()
    assert fcdiffusion_distill.main(distill_args(workdir, logdir, 4, "--student_steps", "2")) == 1
    assert "student_steps: checkpoint [1, 2, 3], now 2" in capsys.readouterr().err
    assert fcdiffusion_distill.main(distill_args(workdir, logdir, 4, "--trainable", "control_net", "lora",
                                                 "--student_steps", "1", "2", "3")) == 1
    assert "trainable: checkpoint ['control_net'], now ['control_net', 'lora']" in capsys.readouterr().err
    assert (distill_checkpoint_dir(logdir) / LAST_CHECKPOINT).read_bytes() == before


def test_a_non_finite_loss_stops_the_run_with_an_error(tiny_files, tmp_path, capsys):
    args = train_args(tiny_files, tmp_path / "logs", "--max_steps", "20", "--learning_rate", "1e30",
                      "--checkpoint_every", "100", "--log_images_every", "0")
    assert fcdiffusion_train.main(args) == 1
    assert "error: the loss is nan" in capsys.readouterr().err
    assert not (teacher_checkpoint_dir(tmp_path / "logs", "high_pass") / LAST_CHECKPOINT).exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--batch_size", "0", "--batch_size must be at least 1"),
    ("--max_steps", "-1", "--max_steps must be at least 1"),
    ("--resolution", "100", "multiple of 64"),
    ("--num_workers", "-2", "--num_workers must be at least 0"),
])
def test_bad_flags_fail_before_any_model_is_built(tiny_files, tmp_path, capsys, flag, value, message):
    assert fcdiffusion_train.main([*train_args(tiny_files, tmp_path), flag, value]) == 1
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_missing_or_broken_data_index_fails_before_any_model_is_built(tiny_files, tmp_path, capsys, workdir):
    missing = tmp_path / "nowhere.json"
    assert fcdiffusion_train.main([*train_args(tiny_files, tmp_path / "a"), "--data", str(missing)]) == 1
    assert f"training data index not found: {missing}" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("this is not json\n")
    assert fcdiffusion_distill.main(distill_args(workdir, tmp_path / "b", 1, "--data", str(broken))) == 1
    assert "broken.json:1: not an img_path/prompt record" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
