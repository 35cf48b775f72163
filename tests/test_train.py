"""fcdiffusion_train.py: a tiny teacher trains, logs images, resumes, fails clearly, and runs under DDP (from tar
shards, with EMA)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import fcdiffusion_train
from fcdiffusion.core.weights import load_teacher
from ldm.checkpoint import load_state_dict
from tests.helpers import train_args, write_shards


def metrics(logdir):
    rows = []
    for path in Path(logdir).glob("fcdiffusion_high_pass/version_*/metrics.csv"):
        rows += list(csv.DictReader(open(path)))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_teacher_trains_logs_images_skips_corrupt_image_and_resumes(tiny_files, tmp_path):
    data = tiny_files.root / "with_corrupt.json"  # beside the index: its paths are relative to it
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"not an image at all")
    lines = tiny_files.data.read_text().splitlines()
    lines.insert(1, json.dumps({"img_path": str(bad), "prompt": "a corrupt file"}))
    data.write_text("\n".join(lines) + "\n")
    logdir = tmp_path / "logs"
    assert fcdiffusion_train.main(train_args(tiny_files, logdir, "--max_steps", "4", "--data", str(data))) == 0

    ckpt_dir = logdir / "fcdiffusion_high_pass_checkpoint"
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4
    init, trained = load_state_dict(tiny_files.init), last["state_dict"]
    assert set(init) == set(trained)
    changed = [k for k in init if k.startswith("control_model.") and not torch.equal(init[k], trained[k])]
    assert changed, "the control net did not change"
    frozen = [k for k in init if not k.startswith("control_model.")]
    assert all(torch.equal(init[k], trained[k]) for k in frozen), "the frozen SD weights changed"
    assert (ckpt_dir / "image_log" / "step-000002.png").is_file()
    assert last["metadata"]["fcdiffusion.modes"] == '["high_pass"]'  # the checkpoint records its mode
    assert load_teacher(ckpt_dir / "last.ckpt").control_mode == "high_pass"  # and rebuilds with no config
    losses = metrics(logdir)
    assert losses and np.isfinite(losses).all()

    assert fcdiffusion_train.main(train_args(tiny_files, logdir, "--max_steps", "6", "--data", str(data))) == 0
    resumed = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 6


def test_missing_weights_say_what_to_download(tiny_files, tmp_path, capsys):
    args = train_args(tiny_files, tmp_path, "--max_steps", "1")
    assert fcdiffusion_train.main([*args, "--resume_path", str(tmp_path / "fcdiffusion_init.ckpt")]) == 1
    err = capsys.readouterr().err
    assert "fcdiffusion_init.ckpt" in err and "models/v2-1_512-ema-pruned.ckpt" in err and "tiny" in err
    missing_clip = f"model.params.cond_stage_config.params.version={tmp_path}/open_clip_pytorch_model.bin"
    assert fcdiffusion_train.main([*args, missing_clip]) == 1
    err = capsys.readouterr().err
    assert "CLIP-ViT-H-14/open_clip_pytorch_model.bin" in err and "make quickstart" in err


def test_wrong_control_mode_flag_lists_modes(tiny_files, tmp_path, capsys):
    assert fcdiffusion_train.main([*train_args(tiny_files, tmp_path), "--control_mode", "band_pass"]) == 1
    err = capsys.readouterr().err
    assert all(m in err for m in ("mini_pass", "low_pass", "mid_pass", "high_pass"))


def test_two_process_ddp_on_cpu_ends_with_identical_weights_and_ema_from_disjoint_shards(tiny_files, tmp_path):
    out = tmp_path / "ranks"
    out.mkdir()
    shards = write_shards(tiny_files.photos, tmp_path / "shards", per_shard=2)
    cmd = [sys.executable, "tests/ddp_worker.py", str(out),
           *train_args(tiny_files, tmp_path / "logs", "--max_steps", "3", "--accelerator", "cpu", "--devices", "2",
                       "--strategy", "ddp", "--log_images_every", "0", "--data", shards, "--ema_decay", "0.9")]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["step"] == 3 for r in ranks)
    init = load_state_dict(tiny_files.init)
    assert any(not torch.equal(v, init["control_model." + k]) for k, v in ranks[0]["state"].items())
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    # Each rank updated its own EMA identically, and it is not the raw weights.
    assert ranks[0]["ema"].keys() == ranks[1]["ema"].keys() and ranks[0]["ema"]
    assert all(torch.equal(value, ranks[1]["ema"][key]) for key, value in ranks[0]["ema"].items())
    assert any(not torch.equal(value, ranks[0]["state"][key.removeprefix("control_model.")])
               for key, value in ranks[0]["ema"].items())
    # webdataset gave each rank its own shard: the ranks read disjoint samples, each from one shard.
    seen = [{path.split(":")[0] for path in r["paths"]} for r in ranks]
    assert len(ranks[0]["paths"]) == len(ranks[1]["paths"]) == 6
    assert seen[0].isdisjoint(seen[1]) and all(len(s) == 1 for s in seen)


def test_two_process_ddp_distillation_ends_identical_with_frozen_tensors_held_once(workdir, model_config,
                                                                                  distill_config, tmp_path):
    """The distiller under a 2-process DDP strategy on CPU: both ranks end with the same student, which learnt, and
    each still holds every frozen tensor once (the student's frozen tensors are its teachers')."""
    from fcdiffusion.train.distiller import FrequencyDistiller
    from tests.helpers import distill_args, teacher_paths

    out = tmp_path / "ranks"
    out.mkdir()
    cmd = [sys.executable, "tests/ddp_worker.py", "--distill", str(out),
           *distill_args(workdir, tmp_path / "logs", 2, "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                         "--log_images_every", "0", "--batch_size", "1", "--checkpoint_every", "2")]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["step"] == 2 for r in ranks)
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys() and ranks[0]["state"]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert ranks[0]["state"]["control_model.label_emb.weight"].any()  # it trained (the mode embedding starts at 0)
    paths = teacher_paths(workdir / "logs")
    alone = FrequencyDistiller(model_config, paths, paths["mid_pass"],
                               {"trainable": ["control_net"], "step_embedding": distill_config.student.step_embedding},
                               dict(distill_config.distill)).parameter_counts()
    for rank in ranks:
        assert rank["frozen_shared"] == 1.0
        assert rank["counts"]["resident"] == alone["resident"] < rank["counts"]["independent"]
