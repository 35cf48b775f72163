"""Nothing lost on resume, nothing written over its input (docs/reliability.md): the resume picks the newest state
whatever the files are called, `last.ckpt` follows every save, outputs are checked before the work and a failed
write says where the results went, and every command line that cannot work is refused before any model is built."""
from __future__ import annotations

import logging
import os
import shutil

import pytest
import pytorch_lightning as pl
import torch

import fcdiffusion_train
from fcdiffusion.core.paths import LAST_CHECKPOINT, teacher_checkpoint_dir
from fcdiffusion.train.training import resume_checkpoint
from tests.helpers import train_args, write_shards


def write_checkpoint(path, step: int) -> None:
    """A minimal Lightning training checkpoint holding `step` optimizer steps."""
    torch.save({"state_dict": {}, "global_step": step, "metadata": {"step": str(step)}}, path)


def truncated(path) -> None:
    """`path` cut in half, as a full disk or a killed copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def global_step(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


# ---- 1. which checkpoint a run resumes from -------------------------------------------------------------------
def test_a_versioned_step_file_does_not_outrank_a_newer_step(tmp_path, caplog):
    write_checkpoint(tmp_path / "step-000200.ckpt", 200)
    write_checkpoint(tmp_path / "step-000150-v1.ckpt", 150)  # all its digits read 1501
    write_checkpoint(tmp_path / LAST_CHECKPOINT, 250)
    truncated(tmp_path / LAST_CHECKPOINT)
    with caplog.at_level(logging.INFO):
        resume = resume_checkpoint(tmp_path)
    assert resume.path == os.fspath(tmp_path / "step-000200.ckpt") and resume.step == 200
    assert f"skipping unreadable checkpoint {tmp_path / LAST_CHECKPOINT}" in caplog.text
    assert "(step 200): last.ckpt is missing or unreadable" in caplog.text


def test_the_newest_loadable_state_wins_whatever_its_name(tmp_path, caplog):
    write_checkpoint(tmp_path / LAST_CHECKPOINT, 100)  # stale: an earlier release saved step 150 as last-v1.ckpt
    write_checkpoint(tmp_path / "last-v1.ckpt", 150)
    write_checkpoint(tmp_path / "step-000140.ckpt", 140)
    (tmp_path / "step-000999-notes.ckpt").write_text("not a step file: the name is not step-N[-vN].ckpt")
    with caplog.at_level(logging.INFO):
        assert resume_checkpoint(tmp_path).path == os.fspath(tmp_path / "last-v1.ckpt")
    assert "last.ckpt holds an older step" in caplog.text
    write_checkpoint(tmp_path / "step-000160.ckpt", 160)
    write_checkpoint(tmp_path / "step-000170.ckpt", 170)
    (tmp_path / "step-000170.ckpt").write_text("damaged")
    assert resume_checkpoint(tmp_path).step == 160  # the damaged newest falls back to the newest loadable
    write_checkpoint(tmp_path / LAST_CHECKPOINT, 160)
    assert resume_checkpoint(tmp_path).path == os.fspath(tmp_path / LAST_CHECKPOINT)  # last.ckpt wins a tie
    assert resume_checkpoint(tmp_path / "empty") is None


def test_max_steps_below_the_steps_done_is_refused_before_any_model_is_built(tiny_files, tmp_path, capsys,
                                                                             monkeypatch):
    folder = teacher_checkpoint_dir(tmp_path, "high_pass")
    folder.mkdir(parents=True)
    write_checkpoint(folder / LAST_CHECKPOINT, 10)
    monkeypatch.setattr(fcdiffusion_train, "instantiate_from_config", lambda *a: pytest.fail("model built"))
    assert fcdiffusion_train.main(train_args(tiny_files, tmp_path, "--max_steps", "4")) == 1
    error = capsys.readouterr().err
    assert f"--max_steps 4 is below the 10 steps {folder / LAST_CHECKPOINT} already holds" in error
    assert "--max_steps 10 or more" in error


# ---- 2. last.ckpt follows every save, whatever the interval ---------------------------------------------------
class CrashAt(pl.Callback):
    """Ends the process's training abruptly at optimizer step `step` (after that step's checkpoints), as kill -9
    would: no final save, no signal handler."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise SystemExit("killed")


def test_a_changed_checkpoint_interval_keeps_last_ckpt_the_newest_state(tiny_files, tmp_path):
    logdir = tmp_path / "logs"
    folder = teacher_checkpoint_dir(logdir, "high_pass")
    args = train_args(tiny_files, logdir, "--log_images_every", "0")
    assert fcdiffusion_train.main([*args, "--max_steps", "2", "--checkpoint_every", "2"]) == 0
    with pytest.raises(SystemExit, match="killed"):
        fcdiffusion_train.main([*args, "--max_steps", "8", "--checkpoint_every", "3"], extra_callbacks=[CrashAt(4)])
    assert global_step(folder / LAST_CHECKPOINT) == 3  # the save at step 3 replaced it
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt", "step-000002.ckpt", "step-000003.ckpt"]
    shutil.copy(folder / "step-000002.ckpt", folder / "last-v1.ckpt")  # a stray an earlier release left
    assert fcdiffusion_train.main([*args, "--max_steps", "4", "--checkpoint_every", "3"]) == 0
    assert global_step(folder / LAST_CHECKPOINT) == 4
    assert not list(folder.glob("last-v*.ckpt"))


# ---- 5. shards against data-loader workers --------------------------------------------------------------------
def test_more_workers_than_shards_is_refused_before_any_model_is_built(tiny_files, tmp_path, capsys, monkeypatch):
    shards = write_shards(tiny_files.photos, tmp_path / "shards", per_shard=2)  # 2 shards
    monkeypatch.setattr(fcdiffusion_train, "instantiate_from_config", lambda *a: pytest.fail("model built"))
    args = train_args(tiny_files, tmp_path / "logs", "--data", shards, "--max_steps", "1")
    assert fcdiffusion_train.main([*args, "--num_workers", "4"]) == 1
    error = capsys.readouterr().err
    assert "2 shards cannot feed 1 rank(s) x 4 data-loader worker(s)" in error and "--num_workers 2 at most" in error
    assert fcdiffusion_train.main([*args, "--num_workers", "1", "--accelerator", "cpu", "--devices", "4"]) == 1
    assert "2 shards cannot feed 4 rank(s) x 1" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()
