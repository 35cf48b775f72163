"""fcdiffusion_distill.py: checkpoints hold the student alone, its export describes itself, runs resume."""
from __future__ import annotations

import csv
import json
import shutil

import torch

import fcdiffusion_distill
from fcdiffusion.core.frequency import CONTROL_MODES
from fcdiffusion.core.paths import LAST_CHECKPOINT, distill_checkpoint_dir, student_file
from fcdiffusion.core.weights import load_student, recorded
from ldm.checkpoint import load_checkpoint, load_state_dict
from tests.helpers import distill_args


def test_checkpoints_hold_only_the_student_and_the_export_describes_itself(distilled):
    folder = distill_checkpoint_dir(distilled)
    checkpoint = torch.load(folder / LAST_CHECKPOINT, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2 and checkpoint["optimizer_states"]
    assert all(k.startswith("student.") for k in checkpoint["state_dict"])
    assert (folder / "step-000001.ckpt").is_file() and (folder / "image_log" / "step-000002.png").is_file()
    exported, metadata = load_checkpoint(student_file(distilled))
    assert set(exported) == {k[len("student."):] for k in checkpoint["state_dict"]}

    # The metadata says what to rebuild and how to run it: no config needed.
    assert metadata["fcdiffusion.kind"] == "student" and recorded(metadata, "modes") == list(CONTROL_MODES)
    params = recorded(metadata, "config")["params"]
    assert params["student_steps"] == [1, 2, 3] and params["trainable"] == ["control_net"]
    assert params["lora_rank"] == 4 and params["frequency_thresholds"]["high_threshold"] == 25
    assert params["cond_stage_config"]["params"]["version"] is None  # the text encoder's tensors are in the file
    assert recorded(metadata, "distill")["objective"] == "trajectory"
    student = load_student(student_file(distilled))
    assert student.student_steps == 3 and student.modes == CONTROL_MODES
    label = checkpoint["state_dict"]["student.control_model.label_emb.weight"]
    assert torch.equal(student.control_model.label_emb.weight, label) and label.any()  # it trained
    assert load_student(folder / LAST_CHECKPOINT).student_steps == 3  # the distiller's checkpoint describes itself too
    rows = list(csv.DictReader(open(next(distilled.glob("fcdiffusion_distill/version_*/metrics.csv")))))
    assert any(row.get("train/band_f25_up") for row in rows)


def test_interrupted_run_resumes_its_step_count(distilled, workdir):
    logdir = workdir / "resumed"
    shutil.copytree(distilled, logdir)
    assert fcdiffusion_distill.main(distill_args(workdir, logdir, 4, "--student_steps", "1", "2", "3")) == 0
    folder = distill_checkpoint_dir(logdir)
    assert torch.load(folder / LAST_CHECKPOINT, map_location="cpu", weights_only=False)["global_step"] == 4
    assert (folder / "step-000003.ckpt").is_file() and not (folder / "step-000005.ckpt").exists()
    first = load_state_dict(folder / "step-000002.ckpt")
    last = load_state_dict(folder / LAST_CHECKPOINT)
    key = "student.control_model.label_emb.weight"
    assert not torch.equal(first[key], last[key])


def test_missing_teacher_names_the_file_and_the_command(workdir, capsys):
    missing = workdir / "nowhere" / "fcdiffusion_high_pass_checkpoint" / "last.ckpt"
    args = distill_args(workdir, workdir / "never", 1, "--teacher_high_pass", str(missing))
    assert fcdiffusion_distill.main(args) == 1
    error = capsys.readouterr().err
    assert str(missing) in error
    assert "python fcdiffusion_train.py" in error and "--control_mode high_pass" in error
    assert f"--logdir {workdir / 'nowhere'}" in error


def test_teacher_checkpoint_for_another_mode_is_an_error(workdir, capsys):
    logs = workdir / "logs"
    args = distill_args(workdir, workdir / "swapped", 1, "--teacher_mini_pass",
                        str(logs / "fcdiffusion_low_pass_checkpoint" / "last.ckpt"))
    assert fcdiffusion_distill.main(args) == 1
    error = capsys.readouterr().err
    assert "low_pass teacher" in error and "'mini_pass'" in error
    assert json.loads(load_checkpoint(logs / "fcdiffusion_low_pass_checkpoint" / "last.ckpt")[1]
                      ["fcdiffusion.modes"]) == ["low_pass"]
