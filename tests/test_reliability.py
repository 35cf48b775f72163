"""Nothing lost on resume, nothing written over its input (docs/reliability.md): the resume picks the newest state
whatever the files are called, `last.ckpt` follows every save, outputs are checked before the work and a failed
write says where the results went, and every command line that cannot work is refused before any model is built."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import fcdiffusion_train
from fcdiffusion.core.paths import LAST_CHECKPOINT, student_file, teacher_checkpoint_dir
from fcdiffusion.train.training import resume_checkpoint
from tests.helpers import teacher_paths, train_args, write_shards


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


# ---- 3. no command writes over its input ----------------------------------------------------------------------
def test_export_delta_refuses_to_write_over_the_full_file_or_the_base(tmp_path, capsys):
    import export_delta

    full, base = tmp_path / "student.safetensors", tmp_path / "base.ckpt"
    full.write_bytes(b"the full student")
    base.write_bytes(b"the base")
    (tmp_path / "sub").mkdir()
    for out in (full, tmp_path / "sub" / ".." / "student.safetensors"):
        assert export_delta.main([str(full), str(out), "--base", str(base)]) == 1
        assert "is also the full weights file" in capsys.readouterr().err
    os.symlink(full, tmp_path / "link.safetensors")
    assert export_delta.main([str(full), str(tmp_path / "link.safetensors"), "--base", str(base)]) == 1
    assert "the output would replace what the command reads" in capsys.readouterr().err
    assert full.read_bytes() == b"the full student" and base.read_bytes() == b"the base"


# ---- 6, 7. the translation script: flags refused before any model is loaded, a full disk reported -------------
@pytest.fixture(scope="module")
def script():
    from tests.test_inference import load_script

    return load_script()


def script_args(distilled, workdir, out, *extra: str) -> list[str]:
    return ["--input_dir", str(workdir / "photos"), "--student", str(student_file(distilled)), "--mode", "low_pass",
            "--resolution", "128", "--out_dir", str(out), *extra]


@pytest.mark.parametrize("flags, message", [
    (["--steps", "2000"], "--steps 2000 is more than {student} can sample with: at most 1000"),
    (["--prompt", ""], "--prompt: the prompt is empty"),
    (["--prompt", " \t "], "--prompt: the prompt is empty"),
    (["--out_dir", "{photos}"], "--out_dir {photos} is also --input_dir"),
])
def test_translation_flags_that_cannot_work_are_refused_before_any_model_is_loaded(
        script, distilled, workdir, tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(script, "load_model", lambda *a: pytest.fail("model loaded"))
    names = {"student": student_file(distilled), "photos": workdir / "photos"}
    args = script_args(distilled, workdir, tmp_path / "out", *[f.format(**names) for f in flags])
    assert script.main(args) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and message.format(**names) in error[0]
    assert not (tmp_path / "out").exists()


def test_a_teacher_is_held_to_its_own_spacing_s_step_range(script, workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(script, "load_model", lambda *a: pytest.fail("model loaded"))
    teacher = teacher_paths(workdir / "logs")["low_pass"]
    args = ["--input_dir", str(workdir / "photos"), "--teacher", str(teacher), "--out_dir", str(tmp_path / "out")]
    assert script.main([*args, "--steps", "1000"]) == 1  # SD's uniform spacing fits T - 1 steps
    assert "on the uniform timestep spacing: at most 999" in capsys.readouterr().err


def test_outputs_that_cannot_be_written_are_refused_first_and_a_full_disk_says_what_was_kept(
        script, distilled, workdir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    loaded = []
    original_load = script.load_model
    monkeypatch.setattr(script, "load_model", lambda *a: loaded.append(1) or original_load(*a))
    with monkeypatch.context() as patch:  # a disk with 100 kB left
        patch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 20, 10 << 20, 100_000))
        assert script.main(script_args(distilled, workdir, out)) == 1
    assert "MiB free on its disk, the outputs need about" in capsys.readouterr().err and not loaded

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "mkstemp", read_only)
        assert script.main(script_args(distilled, workdir, out)) == 1
    assert "cannot write outputs to --out_dir" in capsys.readouterr().err and not loaded

    replace, written = os.replace, []

    def fill_up(source, target):  # the disk fills up after the first image's three PNGs
        if len(written) == 1 + 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), source, None, target)
        written.append(target)
        replace(source, target)

    monkeypatch.setattr(os, "replace", fill_up)
    assert script.main(script_args(distilled, workdir, out, "--batch_size", "1", "--steps", "1")) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: could not write ") and "No space left on device" in error
    assert f"the 1 image(s) translated before it are in {out}" in error
    assert len(list(out.glob("*_low_pass.png"))) == 1 and not list(out.glob(".*.tmp"))


def test_a_long_prompt_is_cut_with_a_warning_once(script, distilled, workdir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fcdiffusion.core.inference"):
        assert script.main(script_args(distilled, workdir, tmp_path / "out", "--steps", "1", "--batch_size", "1",
                                       "--prompt", "a cat " * 5000)) == 0
    warnings = [r.getMessage() for r in caplog.records if "longer than the text encoder reads" in r.getMessage()]
    assert len(warnings) == 1 and "9925 token(s)" in warnings[0] and "context of 77" in warnings[0]


# ---- 4, 6. evaluate.py: metrics without their inputs refused, --out checked first, a failed write kept --------
def evaluate_args(distilled, workdir, results, *extra: str) -> list[str]:
    return ["--results", str(results), "--input_dir", str(workdir / "photos"), "--model",
            str(student_file(distilled)), *extra]


def test_metrics_without_their_inputs_and_unwritable_outputs_are_refused_before_any_model_is_loaded(
        distilled, workdir, tmp_path, monkeypatch, capsys):
    import evaluate
    from tests.test_evaluate import make_self_results

    results = make_self_results(workdir, tmp_path)
    monkeypatch.setattr(evaluate, "load_model", lambda *a: pytest.fail("model loaded"))
    assert evaluate.main(evaluate_args(distilled, workdir, results, "--metrics", "teacher_agreement")) == 1
    assert "teacher_agreement compares the results with another run's (--reference" in capsys.readouterr().err
    assert evaluate.main(evaluate_args(distilled, workdir, results, "--metrics", "band", "--prompt", " ")) == 1
    assert "--prompt: the prompt is empty" in capsys.readouterr().err

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert evaluate.main(evaluate_args(distilled, workdir, results, "--metrics", "band")) == 1
    assert f"cannot write outputs to --out {results}: Read-only file system" in capsys.readouterr().err
    assert not (results / "metrics.json").exists()


def test_a_write_failing_after_the_metrics_keeps_them_in_a_temporary_folder(distilled, workdir, tmp_path, capsys,
                                                                           monkeypatch):
    import evaluate
    from tests.test_evaluate import make_self_results

    results = make_self_results(workdir, tmp_path)
    replace = os.replace

    def read_only_results(source, target):  # the results' file system turns read-only while the metrics run
        if str(target).startswith(str(results)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), source, None, target)
        replace(source, target)

    monkeypatch.setattr(os, "replace", read_only_results)
    assert evaluate.main(evaluate_args(distilled, workdir, results, "--metrics", "band")) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: could not write {results / 'metrics.json'}: Read-only file system")
    kept = error.split("the results were written to ")[1].split(" instead")[0]
    assert json.loads(open(kept).read())["per_mode"] and os.path.isfile(kept.replace(".json", ".md"))
    assert not (results / "metrics.json").exists() and not list(results.glob(".*.tmp"))
    shutil.rmtree(os.path.dirname(kept))


# ---- 8. the smaller ones ---------------------------------------------------------------------------------------
def test_the_demo_names_its_own_flags_for_a_file_of_the_other_kind(workdir, capsys):
    import app

    teacher = teacher_paths(workdir / "logs")["low_pass"]
    assert app.main(["--student", str(teacher)]) == 1
    error = capsys.readouterr().err
    assert "holds an FCDiffusion teacher, not a student (pass it with --teacher_<mode> (or --teacher_dir))" in error
    assert "with --teacher)" not in error


def test_a_delta_file_without_its_base_says_it_needs_base(distilled, workdir, tmp_path, script, capsys):
    import export_delta
    from fcdiffusion.core.weights import CONTROL_PREFIX
    from ldm.checkpoint import load_checkpoint, save_state_dict

    state, _ = load_checkpoint(teacher_paths(workdir / "logs")["mid_pass"])
    base, delta = tmp_path / "v2-1_tiny_base.ckpt", tmp_path / "student_delta.safetensors"
    save_state_dict({k: v for k, v in state.items() if not k.startswith(CONTROL_PREFIX)}, base)
    assert export_delta.main([str(student_file(distilled)), str(delta), "--base", str(base)]) == 0
    assert script.main(["--input_dir", str(workdir / "photos"), "--student", str(delta), "--out_dir",
                        str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"{delta} is a delta file over v2-1_tiny_base.ckpt" in error[0]
    assert "pass it with --base PATH (models/v2-1_512-ema-pruned.ckpt is not there)" in error[0]


def test_one_guidance_rule_for_a_fixed_w_student_in_the_script_and_the_demo(distilled, workdir, tmp_path, script,
                                                                           capsys):
    from fcdiffusion.apps.demo_app import DemoInputError, load_demo
    from fcdiffusion.core.weights import load_student

    own = load_student(student_file(distilled)).guidance_scale
    assert own is not None and own != 1.0  # the teachers' w, which the student learned
    args = script_args(distilled, workdir, tmp_path / "out", "--steps", "1")
    assert script.main([*args, "--guidance_scale", f"{own:g}"]) == 0  # its own w: accepted
    assert script.main([*args, "--guidance_scale", "1"]) == 1  # 1 is no exception
    script_error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "fixed guidance scale" in script_error

    demo = load_demo(student_file(distilled), {}, torch.device("cpu"))
    served = demo.served["student"]
    assert served.guidance_fixed and served.guidance_scale == own and "(learned, fixed)" in served.describe()
    photo, request = workdir / "photos" / "coffee.png", ("a cup", ["high_pass"])
    for accepted in (None, own):
        assert "guidance" not in demo.translate(photo, *request, steps=1, guidance_scale=accepted).summary
    with pytest.raises(DemoInputError) as refused:
        demo.translate(photo, *request, steps=1, guidance_scale=1.0)
    assert str(refused.value) == script_error.removeprefix("error: ")  # the same words as the script's
    with pytest.raises(DemoInputError, match="the prompt is empty"):
        demo.translate(photo, "  \n ", ["high_pass"], steps=1)
    with pytest.raises(DemoInputError, match="steps must be a whole number from 1 to 1000"):
        demo.translate(photo, *request, steps=1001)
    long = demo.translate(photo, "a cup " * 100, ["high_pass"], steps=1)
    assert any("the prompt is 125 token(s) longer than the text encoder reads" in note for note in long.notes)


def test_a_checkpoint_write_that_fails_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    from fcdiffusion.train.training import AtomicCheckpointIO

    last = tmp_path / LAST_CHECKPOINT
    write_checkpoint(last, 100)
    save = torch.save

    def disk_full(obj, path):  # half a checkpoint written, then the disk is full
        save(obj, path)
        truncated(Path(path))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "global_step": 150}, last)
    monkeypatch.undo()
    assert global_step(last) == 100 and [p.name for p in tmp_path.iterdir()] == [LAST_CHECKPOINT]
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "global_step": 150}, last)
    assert global_step(last) == 150
