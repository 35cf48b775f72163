"""The one translation path: Translator, test_distillation.py, the benchmark and log_images agree bit for bit."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fcdiffusion.apps.benchmark import end_to_end
from fcdiffusion.core.frequency import CONTROL_MODES
from fcdiffusion.core.images import to_uint8
from fcdiffusion.core.inference import Translator, seeded_noise
from fcdiffusion.core.paths import student_file
from fcdiffusion.core.student import FCDiffusionStudent
from fcdiffusion.core.weights import load_student, load_teacher
from fcdiffusion.train.dataset import load_image
from fcdiffusion.train.distiller import FrequencyDistiller
from ldm.checkpoint import load_state_dict, save_state_dict
from tests.helpers import PHOTOS, ROOT, TINY_DISTILL_CONFIG, teacher_paths


def load_script():
    """The top-level test_distillation.py (pytest would take a tests/ module of that name for a test file)."""
    spec = importlib.util.spec_from_file_location("test_distillation_script", ROOT / "test_distillation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


def photo(workdir, name="astronaut") -> tuple[torch.Tensor, str]:
    return torch.from_numpy(load_image(workdir / "photos" / f"{name}.png", 128)).permute(2, 0, 1), PHOTOS[name]


def test_seeded_noise_depends_only_on_each_images_seed():
    alone = seeded_noise((4, 8, 8), [7])
    batch = seeded_noise((4, 8, 8), [3, 7, 3])
    assert torch.equal(batch[1], alone[0]) and torch.equal(batch[0], batch[2])
    assert not torch.equal(batch[0], batch[1])


def test_pipeline_benchmark_and_log_images_give_identical_results(distilled, workdir, model_config, distill_config):
    image, prompt = photo(workdir)
    batch = {"jpg": image.permute(1, 2, 0)[None].numpy(), "txt": [prompt]}
    paths = teacher_paths(workdir / "logs")

    # The student: the pipeline, the benchmark's end-to-end timing and the distiller's image log.
    student_options = {"trainable": ["control_net"], "step_embedding": distill_config.student.step_embedding}
    distiller = FrequencyDistiller(model_config, paths, student_file(distilled), student_options,
                                   {**dict(distill_config.distill), "student_steps": 3}).eval()
    student = Translator(distiller.student)
    for mode in CONTROL_MODES:
        piped = student(image[None], [prompt], [mode], seed=0)[mode]
        timed = end_to_end(student, image, prompt, mode, seed=0)
        assert torch.equal(piped.latents, timed.latents) and torch.equal(piped.image, timed.image)
    logged = distiller.log_images(batch, N=1, seed=0)
    for mode in CONTROL_MODES:
        assert torch.equal(logged[mode], student(image[None], [prompt], [mode], seed=0)[mode].image), mode
    assert set(logged) >= {f"{mode} teacher" for mode in CONTROL_MODES}

    # A teacher: its own image log is the pipeline's result.
    teacher = load_teacher(paths["mini_pass"]).eval()
    teacher.ddim_steps = 3
    logged = teacher.log_images(batch, N=1, seed=0)
    piped = Translator(teacher)(image[None], [prompt], seed=0)["mini_pass"]
    assert torch.equal(logged["samples"], piped.image) and torch.equal(logged["control"], piped.control)
    assert list(logged) == ["source", "reconstruction", "control", "samples"]
    # ... which changes with the seed and the mini_pass shuffle (so the comparisons above could fail).
    assert not torch.equal(Translator(teacher)(image[None], [prompt], seed=1)["mini_pass"].latents, piped.latents)
    assert not torch.equal(Translator(teacher)(image[None], [prompt], seed=0, control_seed=1)["mini_pass"].control,
                           piped.control)


def test_student_file_runs_with_no_config_its_own_steps_and_every_mode(distilled, workdir, script, tmp_path,
                                                                      monkeypatch, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(workdir / "photos", photos)
    (photos / "broken.png").write_bytes(b"not a png at all")
    (photos / "broken.txt").write_text("never read")
    out = tmp_path / "out"
    calls = []
    original = FCDiffusionStudent.apply_model
    monkeypatch.setattr(FCDiffusionStudent, "apply_model", lambda self, *a: calls.append(1) or original(self, *a))
    assert script.main(["--input_dir", str(photos), "--student", str(student_file(distilled)), "--resolution", "128",
                        "--batch_size", "4", "--out_dir", str(out)]) == 0
    assert "broken.png" in capsys.readouterr().err
    assert len(calls) == 3 * len(CONTROL_MODES)  # one batch, the student's own 3 steps per mode
    names = sorted(p.name for p in out.iterdir())
    per_mode = [f"{n}_{m}{kind}.png" for n in PHOTOS for m in CONTROL_MODES for kind in ("", "_control")]
    assert names == sorted(per_mode + [f"{n}_grid.png" for n in PHOTOS] + ["settings.json"])
    grid = Image.open(out / "astronaut_grid.png")
    assert grid.width > 9 * 128 and grid.height > 128  # source + (control, result) x 4 modes

    # The written PNG is the pipeline's result for that image (index 0 in sorted order, so seed 0).
    monkeypatch.undo()
    image, prompt = photo(workdir)
    expected = Translator(load_student(student_file(distilled)))(image[None], [prompt], ["high_pass"], seed=0)
    written = np.asarray(Image.open(out / "astronaut_high_pass.png")).astype(int)
    assert np.abs(written - to_uint8(expected["high_pass"].image[0]).astype(int)).max() <= 1


def test_teacher_serves_its_own_mode_and_refuses_another(workdir, script, tmp_path, capsys):
    teacher = teacher_paths(workdir / "logs")["low_pass"]
    common = ["--input_dir", str(workdir / "photos"), "--teacher", str(teacher), "--prompt", "a painting",
              "--steps", "2", "--resolution", "128"]
    with contextlib.redirect_stderr(io.StringIO()):  # its own mode, no --mode; DPM-Solver++ from t = 999
        assert script.main([*common, "--sampler", "dpmpp_2m", "--spacing", "trailing",
                            "--out_dir", str(tmp_path / "teacher")]) == 0
    assert sorted(p.name for p in (tmp_path / "teacher").glob("*_low_pass.png")) == sorted(
        f"{n}_low_pass.png" for n in PHOTOS)
    image, _ = photo(workdir)
    expected = Translator(load_teacher(teacher))(image[None], ["a painting"], steps=2, sampler="dpmpp_2m",
                                                 spacing="trailing")["low_pass"].image
    written = np.asarray(Image.open(tmp_path / "teacher" / "astronaut_low_pass.png")).astype(int)
    assert np.abs(written - to_uint8(expected[0]).astype(int)).max() <= 1
    assert script.main([*common, "--mode", "high_pass", "--out_dir", str(tmp_path / "wrong")]) == 1
    error = capsys.readouterr().err
    assert "'low_pass'" in error and "'high_pass'" in error and not (tmp_path / "wrong").exists()
    assert script.main([*common, "--mode", "all"]) == 1


def test_teacher_samples_with_dpm_solver_on_trailing_steps(workdir, monkeypatch):
    teacher = load_teacher(teacher_paths(workdir / "logs")["low_pass"]).eval()
    image, prompt = photo(workdir)
    seen = []
    original = teacher.apply_model
    monkeypatch.setattr(teacher, "apply_model", lambda x, t, c: seen.append(t.tolist()) or original(x, t, c))
    translator = Translator(teacher)
    dpm = translator(image[None], [prompt], steps=2, sampler="dpmpp_2m", spacing="trailing")["low_pass"]
    assert seen == [[999, 999], [499, 499]]  # from t = T-1, each step one guided (batch of 2) evaluation
    ddim = translator(image[None], [prompt], steps=2, spacing="trailing")["low_pass"]
    assert not torch.allclose(dpm.latents, ddim.latents, atol=1e-3)


def test_bad_flags_are_usage_errors(distilled, workdir, script, capsys):
    student = str(student_file(distilled))
    base = ["--input_dir", str(workdir / "photos"), "--student", student]
    assert script.main([*base, "--guidance_scale", "7.5"]) == 1  # a fixed-w student: only its own w
    assert "fixed guidance scale (w=9)" in capsys.readouterr().err
    assert script.main([*base, "--sampler", "dpmpp_2m"]) == 1
    assert "samples with ddim on the trailing schedule" in capsys.readouterr().err
    assert script.main([*base, "--steps", "0"]) == 1
    assert "at least 1" in capsys.readouterr().err
    assert script.main([*base, "model.params.scale_factor=1"]) == 1
    assert "need --config" in capsys.readouterr().err


def test_old_files_without_metadata_need_and_take_a_config(distilled, workdir, script, tmp_path, capsys):
    old_student = tmp_path / "student_without_metadata.safetensors"
    save_state_dict(load_state_dict(student_file(distilled)), old_student)
    old_teacher = tmp_path / "teacher_without_metadata.ckpt"
    save_state_dict(load_state_dict(teacher_paths(workdir / "logs")["high_pass"]), old_teacher)
    common = ["--input_dir", str(workdir / "photos"), "--resolution", "128", "--steps", "1"]
    assert script.main([*common, "--student", str(old_student), "--out_dir", str(tmp_path / "a")]) == 1
    assert "records no model config" in capsys.readouterr().err
    assert script.main([*common, "--student", str(old_student), "--config", str(TINY_DISTILL_CONFIG),
                        "distill.student_steps=[1,2,3]", "--out_dir", str(tmp_path / "b")]) == 0
    assert len(list((tmp_path / "b").glob("*_mid_pass.png"))) == len(PHOTOS)
    assert script.main([*common, "--teacher", str(old_teacher), "--config", str(TINY_DISTILL_CONFIG)]) == 1
    assert "records no control mode" in capsys.readouterr().err
    assert script.main([*common, "--teacher", str(old_teacher), "--config", str(TINY_DISTILL_CONFIG),
                        "--mode", "high_pass", "--out_dir", str(tmp_path / "c")]) == 0
    assert len(list((tmp_path / "c").glob("*_high_pass.png"))) == len(PHOTOS)
