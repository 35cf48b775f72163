"""Runs a researcher can leave for days: validation with the best checkpoints kept, EMA, learning-rate schedules,
TensorBoard, tar shards, and all of them surviving a kill and a resume."""
from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
import shutil
import signal
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fcdiffusion_distill
import fcdiffusion_train
from fcdiffusion.core.paths import LAST_CHECKPOINT, distill_checkpoint_dir, student_file, teacher_checkpoint_dir
from fcdiffusion.core.precision import LIGHTNING_PRECISIONS, lightning_precision
from fcdiffusion.train.ema import EMACallback, ExponentialMovingAverage, averaged_weights
from fcdiffusion.train.lr_schedule import LRSchedule
from fcdiffusion.train.shards import ShardStream
from fcdiffusion.train.training import RUN_DEFAULTS, RunGuard, build_trainer, check_train_section
from ldm.checkpoint import load_checkpoint
from tests.helpers import TINY_CONFIG, distill_args, train_args, write_shards


def rows(logdir, run: str) -> list[dict[str, str]]:
    """Every row of the run's metrics.csv files, oldest version first."""
    found = []
    for path in sorted(glob.glob(str(logdir / run / "version_*" / "metrics.csv"))):
        found += list(csv.DictReader(open(path)))
    return found


def column(table: list[dict[str, str]], name: str) -> dict[int, float]:
    """step -> value of a metrics.csv column (the rows that have it)."""
    return {int(r["step"]): float(r[name]) for r in table if r.get(name)}


def tensorboard_tags(logdir, run: str) -> dict[str, list[str]]:
    """The scalar and image tags written to the run's TensorBoard event files."""
    tags: dict[str, list[str]] = {"scalars": [], "images": []}
    for path in glob.glob(str(logdir / run / "version_*" / "events.out.tfevents.*")):
        events = EventAccumulator(path, size_guidance={"images": 0, "scalars": 0})
        events.Reload()
        for kind in tags:
            tags[kind] += events.Tags()[kind]
    return tags


def ckpt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def shards(tiny_files, tmp_path_factory) -> str:
    """The four demo photos as two tar shards in img2dataset's layout; the second also holds a corrupt member."""
    return write_shards(tiny_files.photos, tmp_path_factory.mktemp("shards"), per_shard=2, corrupt_in=1)


@pytest.fixture(scope="module")
def val_index(tiny_files) -> str:
    """A two-photo validation index beside the training one (its paths are relative to it)."""
    path = tiny_files.root / "val.json"
    path.write_text("\n".join(tiny_files.data.read_text().splitlines()[:2]) + "\n")
    return str(path)


# ---- the pieces ---------------------------------------------------------------------------------------------------
def test_ema_averages_with_a_warm_up_swaps_cleanly_and_round_trips():
    layer = nn.Linear(3, 2)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    model = nn.Sequential(layer, frozen)
    ema = ExponentialMovingAverage({n: p for n, p in model.named_parameters() if p.requires_grad}, decay=0.9)
    assert set(ema.shadow) == {"0.weight", "0.bias"}  # the frozen layer is not copied
    start = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update()  # first update: decay min(0.9, 1/10)
    assert torch.allclose(ema.shadow["0.weight"], 0.1 * start + 0.9 * layer.weight)
    raw = layer.weight.detach().clone()
    model.ema = ema
    with averaged_weights(model), averaged_weights(model):  # nested: one swap
        assert torch.equal(layer.weight, ema.shadow["0.weight"])
    assert torch.equal(layer.weight, raw)
    with pytest.raises(RuntimeError), ema.swapped():
        raise RuntimeError("the trained weights come back on errors too")
    assert torch.equal(layer.weight, raw)

    # The callback updates once per optimizer step, not once per gradient-accumulation batch.
    callback, trainer = EMACallback(0.9), SimpleNamespace(global_step=4)
    callback.on_train_start(trainer, model)
    for step in (4, 5, 5, 6):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, model, None, None, 0)
    assert ema.num_updates == 3

    copy = ExponentialMovingAverage(dict(layer.named_parameters()), decay=0.5)
    copy.load_state_dict({**ema.state_dict(), "shadow": {k[2:]: v for k, v in ema.shadow.items()}})
    assert copy.num_updates == 3 and torch.equal(copy.shadow["weight"], ema.shadow["0.weight"])
    with pytest.raises(ValueError, match="does not match"):
        copy.load_state_dict(ema.state_dict())


def test_warm_up_and_cosine_schedule_and_a_changed_rate_keeps_its_factor():
    cosine = LRSchedule("cosine", warmup_steps=2, total_steps=6)
    assert [round(cosine.factor(s), 4) for s in range(7)] == [0.5, 1.0, 1.0, 0.8536, 0.5, 0.1464, 0.0]
    assert LRSchedule("constant", 3, 10).factor(1) == pytest.approx(2 / 3) and LRSchedule().factor(10**6) == 1.0
    with pytest.raises(ValueError, match="--lr_schedule"):
        LRSchedule("linear")

    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=1e-4)
    scheduler = cosine.attach(optimizer)["lr_scheduler"]["scheduler"]
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * cosine.factor(3))
    trainer = type("Trainer", (), {"optimizers": [optimizer],
                                   "lr_scheduler_configs": [type("Config", (), {"scheduler": scheduler})]})
    RunGuard.apply_learning_rate(trainer, 5e-4)  # a resumed run with another --learning_rate
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * cosine.factor(3))
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * cosine.factor(4))


def test_clipping_accumulation_validation_and_tensorboard_go_to_lightning(tmp_path):
    train = OmegaConf.load(TINY_CONFIG).train
    for key in RUN_DEFAULTS:
        train.pop(key, None)  # a config from before these entries existed gets the defaults
    check_train_section(train)
    assert {k: train[k] for k in RUN_DEFAULTS} == RUN_DEFAULTS
    train.logdir = str(tmp_path)
    plain = build_trainer(train, str(tmp_path / "ckpt"), "run")
    assert plain.gradient_clip_val is None and plain.accumulate_grad_batches == 1 and plain.limit_val_batches == 0

    train.update(gradient_clip_val=0.5, accumulate_grad_batches=3, val_data="val.json", val_every=4, val_batches=2,
                 keep_best=2)
    trainer = build_trainer(train, str(tmp_path / "ckpt"), "run")
    assert trainer.gradient_clip_val == 0.5 and trainer.accumulate_grad_batches == 3
    assert trainer.val_check_interval == 12 and trainer.check_val_every_n_epoch is None  # 4 steps of 3 batches
    assert trainer.limit_val_batches == 2
    best = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
    assert [(c.monitor, c.save_top_k, c.mode) for c in best] == [("val/loss", 2, "min")]
    csv_logger, tensorboard = trainer.loggers
    assert isinstance(tensorboard, TensorBoardLogger) and tensorboard.log_dir == csv_logger.log_dir
    for name, value in [("ema_decay", 1.0), ("warmup_steps", -1), ("lr_schedule", "step"), ("keep_best", 0)]:
        bad = train.copy()
        bad[name] = value
        with pytest.raises(ValueError, match=name):
            check_train_section(bad)


def test_shards_skip_and_count_a_corrupt_member_and_split_over_ranks_and_workers(shards, caplog):
    streams = [ShardStream(shards, resolution=64, rank=rank, world_size=2) for rank in (0, 1)]
    with caplog.at_level(logging.WARNING, logger="fcdiffusion.train.dataset"):
        samples = [[item for item, _ in zip(stream, range(6))] for stream in streams]  # three passes each
    paths = [{item["path"] for item in ranks} for ranks in samples]
    assert paths[0].isdisjoint(paths[1]) and all(len(p) == 2 for p in paths)  # all four photos, each on one rank
    assert all(item["jpg"].shape == (64, 64, 3) and item["txt"] for ranks in samples for item in ranks)
    assert streams[0].skipped == 0 and streams[1].skipped >= 2  # the corrupt member, once per pass
    (bad,) = streams[1].failures
    assert bad.endswith("00001.tar:000019999") and "skipping unreadable image" in caplog.text and bad in caplog.text

    # One rank, two data-loader workers: each reads one shard, so the first four samples are the four photos.
    loader = torch.utils.data.DataLoader(ShardStream(shards, resolution=64, rank=0, world_size=1), num_workers=2)
    first = [batch["path"][0] for batch, _ in zip(loader, range(4))]
    shard = [path.split(":")[0] for path in first]
    assert len(set(first)) == 4 and set(shard[0::2]).isdisjoint(shard[1::2])  # workers take turns, a shard each

    with pytest.raises(ValueError, match="2 shards cannot feed 3 rank"):
        next(iter(ShardStream(shards, resolution=64, rank=2, world_size=3)))


def test_missing_shards_and_shards_for_validation_fail_before_any_model_is_built(tiny_files, shards, tmp_path, capsys):
    missing = shards.replace("00001}", "00003}")
    assert fcdiffusion_train.main(train_args(tiny_files, tmp_path / "a", "--data", missing)) == 1
    assert "2 of 4 shards" in capsys.readouterr().err
    assert fcdiffusion_train.main(train_args(tiny_files, tmp_path / "b", "--val_data", shards)) == 1
    assert "--val_data takes a JSON index" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- whole runs ---------------------------------------------------------------------------------------------------
class KillAt(pl.Callback):
    """Sends this process SIGTERM at the end of optimizer step `step`, as a cluster preempting the job would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_teacher_from_shards_validates_keeps_the_best_and_its_ema_and_schedule_survive_a_kill(
        tiny_files, shards, val_index, tmp_path, caplog):
    logdir = tmp_path / "logs"
    folder = teacher_checkpoint_dir(logdir, "high_pass")
    args = train_args(tiny_files, logdir, "--data", shards, "--val_data", val_index, "--val_every", "2",
                      "--keep_best", "1", "--ema_decay", "0.9", "--warmup_steps", "2", "--lr_schedule", "cosine",
                      "--gradient_clip_val", "1.0", "--max_steps", "5", "--checkpoint_every", "1",
                      "--log_images_every", "0", "model.params.ddim_steps=2")
    with caplog.at_level(logging.WARNING, logger="fcdiffusion.train.dataset"):
        assert fcdiffusion_train.main(args, extra_callbacks=[KillAt(2)]) == 128 + signal.SIGTERM
    assert "skipping unreadable image" in caplog.text and "00001.tar:000019999" in caplog.text  # skipped, counted
    killed = ckpt(folder / LAST_CHECKPOINT)
    assert killed["global_step"] == 3 and killed["ema"]["num_updates"] == 3
    ema, raw = killed["ema"]["shadow"], killed["state_dict"]
    assert set(ema) == {k for k in raw if k.startswith("control_model.")}
    assert any(not torch.equal(value, raw[key]) for key, value in ema.items())  # the average is not the weights

    assert fcdiffusion_train.main(args) == 0  # the same command resumes
    assert ckpt(folder / LAST_CHECKPOINT)["global_step"] == 5
    # The EMA was restored, not restarted: step 4's average is step 3's moved towards step 4's weights.
    step4 = ckpt(folder / "step-000004.ckpt")
    decay = min(0.9, (1 + 3) / (10 + 3))
    assert step4["ema"]["num_updates"] == 4
    for key, value in ema.items():
        assert torch.allclose(step4["ema"]["shadow"][key], torch.lerp(value, step4["state_dict"][key], 1 - decay),
                              atol=1e-7), key

    table = rows(logdir, "fcdiffusion_high_pass")
    lr = column(table, "lr-AdamW")
    expected = LRSchedule("cosine", 2, 5)
    assert lr[0] == pytest.approx(0.5e-4) and lr[1] == pytest.approx(1e-4)  # the warm-up
    assert [lr[s] for s in (3, 4)] == pytest.approx([1e-4 * expected.factor(s) for s in (3, 4)])  # resumed mid-decay
    val = column(table, "val/loss")
    assert len(val) == 2 and all(math.isfinite(v) for v in val.values()) and column(table, "val/loss_t900")
    losses = [value for _, value in sorted(val.items())]  # after steps 2 and 4
    best_step = (2, 4)[losses.index(min(losses))]
    assert [p.name for p in folder.glob("best-*.ckpt")] == [f"best-{best_step:06d}.ckpt"]  # --keep_best 1
    assert (folder / "image_log" / "val-step-000002.png").is_file()
    tags = tensorboard_tags(logdir, "fcdiffusion_high_pass")
    assert {"val/loss", "train/loss", "lr-AdamW"} <= set(tags["scalars"]) and "val/images" in tags["images"]


def test_a_distillation_validates_against_its_teachers_and_exports_the_ema_student(workdir, val_index, tmp_path):
    logdir = tmp_path / "distill"
    args = distill_args(workdir, logdir, 2, "--val_data", val_index, "--val_every", "2", "--ema_decay", "0.9",
                        "--checkpoint_every", "2", "distill.log_teacher_steps=0", "model.params.ddim_steps=2")
    assert fcdiffusion_distill.main(args) == 0
    folder = distill_checkpoint_dir(logdir)
    last = ckpt(folder / LAST_CHECKPOINT)
    exported, _ = load_checkpoint(student_file(logdir))
    ema = {key.removeprefix("student."): value for key, value in last["ema"]["shadow"].items()}
    assert ema and set(ema) <= set(exported)
    assert all(torch.equal(exported[key], value) for key, value in ema.items())  # the file holds the average
    assert any(not torch.equal(value, last["state_dict"]["student." + key]) for key, value in ema.items())

    table = rows(logdir, "fcdiffusion_distill")
    for name in ["val/loss", "val/loss_distill", "val/teacher_latent_mse", "val/teacher_latent_mse_high_pass",
                 "val/band_error_mini_pass", "val/band_freedom_low_pass"]:
        assert math.isfinite(column(table, name)[1]), name
    assert column(table, "val/teacher_latent_mse")[1] > 0
    assert (folder / "best-000002.ckpt").is_file()
    assert "val/teacher_latent_mse" in tensorboard_tags(logdir, "fcdiffusion_distill")["scalars"]
    assert json.loads(last["metadata"]["fcdiffusion.modes"])


def test_ema_turned_on_when_resuming_starts_from_the_checkpoint_weights(distilled, workdir):
    logdir = workdir / "ema_later"
    shutil.copytree(distilled, logdir)  # two steps, no EMA
    before = ckpt(distill_checkpoint_dir(logdir) / LAST_CHECKPOINT)["state_dict"]
    args = distill_args(workdir, logdir, 3, "--ema_decay", "0.9", "--log_images_every", "0",
                        "--student_steps", "1", "2", "3")
    assert fcdiffusion_distill.main(args) == 0
    after = ckpt(distill_checkpoint_dir(logdir) / LAST_CHECKPOINT)
    assert after["global_step"] == 3 and after["ema"]["num_updates"] == 1
    for key, value in after["ema"]["shadow"].items():  # one update (decay 1/10) from step 2's weights
        assert torch.allclose(value, torch.lerp(before[key], after["state_dict"][key], 0.9), atol=1e-7), key


def test_training_precision_takes_the_inference_names(tmp_path):
    assert LIGHTNING_PRECISIONS == {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
    train = OmegaConf.load(TINY_CONFIG).train
    train.update(precision="bf16", logdir=str(tmp_path))
    check_train_section(train)
    assert build_trainer(train, str(tmp_path / "ckpt"), "run").precision == "bf16-mixed"
    for lightning in ("32", "bf16-mixed", "16"):
        train.precision = lightning
        with pytest.raises(ValueError, match=r"--precision must be one of fp32 \(32-true\), bf16 \(bf16-mixed\), "
                                             r"fp16 \(16-mixed\), got"):
            check_train_section(train)
    with pytest.raises(ValueError, match="'fp64'"):
        lightning_precision("fp64")
