"""The guidance-conditioned student: w embedded (a no-op at first), drawn per example while distilling with the
teachers guided at that w, chosen at inference at one network evaluation per step; a fixed-w student refuses
another w."""
from __future__ import annotations

import csv
import importlib.util

import pytest
import torch

import fcdiffusion_distill
from fcdiffusion.apps import benchmark
from fcdiffusion.apps.demo_app import DemoInputError, load_demo, model_resolution
from fcdiffusion.core.guidance import check_guidance_range, check_guidance_scale
from fcdiffusion.core.inference import Translator
from fcdiffusion.core.paths import student_file
from fcdiffusion.core.student import FCDiffusionStudent
from fcdiffusion.core.weights import load_student, recorded
from fcdiffusion.train import distiller as distiller_module
from fcdiffusion.train.distiller import DistillOptions, FrequencyDistiller
from ldm.checkpoint import load_checkpoint
from ldm.models.diffusion.sampling import sample
from tests.helpers import PHOTOS, ROOT, distill_args, teacher_paths


@pytest.fixture(scope="module")
def guided_run(workdir):
    """fcdiffusion_distill.py for 2 steps (one image, two modes each): a guidance-conditioned student for 1 and 2
    steps (w in [2, 12]) on the teachers' trajectories, feature terms (against the guided teacher) whose weights
    change at step 1; its logdir."""
    logdir = workdir / "guided"
    args = distill_args(workdir, logdir, 2, "--guidance_range", "2", "12", "--batch_size", "1",
                        "--modes_per_step", "2", "distill.feature_weights={unet_out1: 0.5, attn_control_mid: 1}",
                        "distill.loss_stages=[[1, {unet_out1: 0.0, control_mid: 1.0}]]", "--student_steps", "1", "2")
    assert fcdiffusion_distill.main(args) == 0
    return logdir


@pytest.fixture(scope="module")
def distiller(workdir, model_config, distill_config):
    """A distiller of a guidance-conditioned student (w in [2, 12]) that starts as the mid_pass teacher."""
    paths = teacher_paths(workdir / "logs")
    return FrequencyDistiller(model_config, paths, paths["mid_pass"], {"trainable": ["control_net"]},
                              {**dict(distill_config.distill), "objective": "progressive", "student_steps": 4,
                               "guidance_range": [2.0, 12.0]})


def test_dpm_solver_teacher_substeps_are_the_sampler_on_their_grid(distiller, monkeypatch):
    """`teacher_sampler: dpmpp_2m`: the teacher's n sub-steps from t to t_prev (a timestep and alpha per sample) are
    the shared loop's n DPM-Solver++(2M) steps on the same integer grid (one timestep for the batch), guided at each
    example's scale; and `teacher_solve` is that loop on `teacher_steps`."""
    monkeypatch.setattr(distiller.options, "teacher_sampler", "dpmpp_2m")
    monkeypatch.setattr(distiller.options, "teacher_substeps", 3)
    teacher, size = distiller.teachers["low_pass"], distiller.student.image_size
    generator = torch.Generator().manual_seed(3)
    z, x = (torch.randn(2, 4, size, size, generator=generator) for _ in range(2))
    cond = distiller.student.condition(z, distiller.student.get_learned_conditioning(["a", "b"]), "low_pass")
    t, t_prev = torch.tensor([999, 999]), torch.tensor([749, 749])
    calls = []
    monkeypatch.setattr(distiller_module, "sample", lambda *a, **k: calls.append(k["sampler"]) or sample(*a, **k))
    solved = distiller.teacher_solve("low_pass", x, t, t_prev, {**cond, "guidance_scale": torch.tensor([4.0, 4.0])})
    assert calls == ["dpmpp_2m"]  # one run of the shared loop
    plain = distiller.teacher_condition(cond)
    uncond, alphas = teacher.unconditional_conditioning(plain), teacher.alphas_cumprod
    grid = [999, 916, 832, 749]  # round(999 - 250 j / 3)
    steps = [(s, alphas[s], alphas[s_next]) for s, s_next in zip(grid[:-1], grid[1:])]
    expected = sample(teacher.apply_model, x, steps, plain, uncond, 4.0, sampler="dpmpp_2m")
    torch.testing.assert_close(solved, expected, rtol=1e-4, atol=1e-4)
    per_sample = distiller.teacher_steps(t, t_prev)
    assert [s.tolist() for s, _, _ in per_sample] == [[999, 999], [916, 916], [832, 832]]
    assert per_sample[0][1].shape == (2, 1, 1, 1) and per_sample[-1][2].flatten().tolist() == [alphas[749].item()] * 2
    looped = sample(teacher.apply_model, x, per_sample, plain, uncond, torch.tensor([4.0, 4.0]), sampler="dpmpp_2m")
    assert torch.equal(solved, looped)


def test_w_embedding_starts_as_a_no_op_and_two_w_differ_after_training(distiller):
    student, teacher = distiller.student.eval(), distiller.teachers["mid_pass"]  # the student's init
    assert student.guidance_conditioned and student.guidance_scale == 9.0  # the teachers' scale is the default w
    generator, size = torch.Generator().manual_seed(0), student.image_size
    z, x = (torch.randn(2, 4, size, size, generator=generator) for _ in range(2))
    context, t = student.get_learned_conditioning(["a boat", "a tree"]), torch.tensor([500, 800])
    cond = student.condition(z, context, "mid_pass")
    assert cond["guidance_scale"].tolist() == [9.0, 9.0]

    def eps(guidance_scale: float) -> torch.Tensor:
        with torch.no_grad():
            return student.apply_model(x, t, {**cond, "guidance_scale": torch.full((2,), guidance_scale)})

    with torch.no_grad():
        init = teacher.apply_model(x, t, distiller.teacher_condition(cond))
    assert torch.equal(eps(2.0), eps(12.0)) and torch.equal(eps(2.0), init)  # a no-op: the student is its init

    # The teacher target follows each example's own w: one batch of two scales = each scale on its own.
    t_prev = torch.tensor([300, 600])
    mixed = distiller.teacher_solve("high_pass", x, t, t_prev, {**cond, "guidance_scale": torch.tensor([2.0, 12.0])})
    for i, w in enumerate((2.0, 12.0)):
        alone = distiller.teacher_solve("high_pass", x, t, t_prev, {**cond, "guidance_scale": torch.full((2,), w)})
        torch.testing.assert_close(mixed[i], alone[i])
    assert not torch.allclose(mixed[0], distiller.teacher_solve("high_pass", x, t, t_prev, cond)[0])

    optimizer = torch.optim.AdamW(student.trainable_parameters(), lr=1e-3)
    distiller.train()
    torch.manual_seed(0)
    for _ in range(2):  # w drawn per example from [2, 12]
        loss, _ = distiller.distillation_loss(z, context, ["mid_pass", "high_pass"], torch.tensor([0, 1, 2, 3]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    student.eval()
    assert student.control_model.guidance_emb.layers[2].weight.any()
    assert not torch.allclose(eps(2.0), eps(12.0))


def test_distilled_file_samples_any_w_in_its_range_at_one_evaluation_per_step(guided_run, workdir, monkeypatch):
    path = student_file(guided_run)
    _, metadata = load_checkpoint(path)
    assert recorded(metadata, "distill")["objective"] == "trajectory"
    assert recorded(metadata, "config")["params"]["guidance_range"] == [2.0, 12.0]
    student = load_student(path).eval()  # strict: the guidance embedding's keys are in the file
    assert student.guidance_conditioned and student.guidance_range == [2.0, 12.0] and student.student_steps == 2
    assert student.control_model.guidance_emb.layers[2].weight.any()  # it trained
    size = model_resolution(student)
    image = torch.rand(1, 3, size, size) * 2 - 1
    calls = []
    original = FCDiffusionStudent.apply_model
    monkeypatch.setattr(FCDiffusionStudent, "apply_model",
                        lambda self, *a: calls.append(a[2]["guidance_scale"]) or original(self, *a))
    translator = Translator(student)
    results = {w: translator(image, ["a house"], ["low_pass"], guidance_scale=w)["low_pass"].latents
               for w in (3.0, 11.0)}
    assert len(calls) == 2 * 2 and [float(c[0]) for c in calls] == [3.0, 3.0, 11.0, 11.0]  # no guidance batch
    assert not torch.equal(results[3.0], results[11.0])
    with pytest.raises(ValueError, match=r"outside the range \[2, 12\]"):
        translator(image, ["a house"], ["low_pass"], guidance_scale=20.0)

    demo = load_demo(path, {}, torch.device("cpu"))  # the demo takes a w for this student, within its range
    result = demo.translate(workdir / "photos" / "coffee.png", "a cup", ["high_pass"], steps=1, guidance_scale=4)
    assert "guidance 4" in result.summary
    with pytest.raises(DemoInputError, match=r"guidance_scale=15 is outside the range \[2, 12\]"):
        demo.translate(workdir / "photos" / "coffee.png", "a cup", ["high_pass"], steps=1, guidance_scale=15)

    # Every scheduled feature term is logged at every step; the second stage (from step 1) reweighs them.
    rows = list(csv.DictReader(open(next(guided_run.glob("fcdiffusion_distill/version_*/metrics.csv")))))
    logged = {int(row["step"]): {k: float(v) for k, v in row.items() if v and k.startswith("train/")}
              for row in rows if row.get("train/loss")}
    stages = {0: {"unet_out1": 0.5, "attn_control_mid": 1.0, "control_mid": 0.0},
              1: {"unet_out1": 0.0, "attn_control_mid": 1.0, "control_mid": 1.0}}
    for step, weights in stages.items():
        f = logged[step]
        assert all(f[f"train/feat_{name}"] >= -1e-6 for name in weights)  # a KL can round below 0
        expected = f["train/loss_distill"] + sum(w * f[f"train/feat_{name}"] for name, w in weights.items())
        assert f["train/loss"] == pytest.approx(expected, rel=1e-5)
    assert logged[0]["train/feat_unet_out1"] != logged[1]["train/feat_unet_out1"]  # measured anew at each step


def test_script_takes_a_guidance_scale_for_a_guidance_student_only(guided_run, distilled, workdir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("test_distillation_script", ROOT / "test_distillation.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    common = ["--input_dir", str(workdir / "photos"), "--resolution", "128", "--mode", "mid_pass"]
    assert script.main([*common, "--student", str(student_file(guided_run)), "--guidance_scale", "4",
                        "--out_dir", str(tmp_path / "w4")]) == 0
    assert len(list((tmp_path / "w4").glob("*_mid_pass.png"))) == len(PHOTOS)
    assert script.main([*common, "--student", str(student_file(guided_run)), "--guidance_scale", "30"]) == 1
    assert "outside the range [2, 12]" in capsys.readouterr().err
    assert script.main([*common, "--student", str(student_file(distilled)), "--guidance_scale", "7.5"]) == 1
    assert "fixed guidance scale" in capsys.readouterr().err
    # Resuming the run as a fixed-w student (or with another range) is refused before anything is built.
    assert fcdiffusion_distill.main(distill_args(workdir, guided_run, 3, "--student_steps", "2")) == 1
    assert "guidance_range" in capsys.readouterr().err


def test_benchmark_compares_every_few_step_alternative_on_held_out_photos(guided_run, workdir, monkeypatch,
                                                                          tmp_path):
    # Two modes and k = 1, 2 against a 2-step reference, to keep the test short.
    monkeypatch.setattr(benchmark, "STUDENT_STEPS", (1, 2))
    monkeypatch.setattr(benchmark, "CONTROL_MODES", ("mid_pass", "high_pass"))
    with pytest.raises(ValueError, match="guidance_images of at least 1"):
        benchmark.fidelity(teacher_paths(workdir / "logs"), student_file(guided_run), 128, 1, 2, torch.device("cpu"),
                           photos=workdir / "photos", guidance_images=0, sweep_latents=tmp_path / "none.pt")
    figures, setup = benchmark.fidelity(teacher_paths(workdir / "logs"), student_file(guided_run), 128, 1, 2,
                                        torch.device("cpu"), photos=workdir / "photos", guidance_scales=[3],
                                        sweep_latents=tmp_path / "sweep.pt")
    # The saved sweep holds the very latents of the w table (one photo: its errors are the table's figures).
    sweep = torch.load(tmp_path / "sweep.pt", weights_only=True)
    assert (sweep["image"], sweep["scales"], sweep["teacher_steps"]) == ("astronaut.png", [3.0], 2)
    assert set(sweep["latents"]) == {"mid_pass w3", "high_pass w3"} and not (tmp_path / "none.pt").exists()
    for mode, kept in ((mode, sweep["latents"][f"{mode} w3"]) for mode in ("mid_pass", "high_pass")):
        assert set(kept) == {"teacher_2", "student_k1", "student_k2"}
        for k in (1, 2):
            error = torch.mean((kept[f"student_k{k}"] - kept["teacher_2"]) ** 2).item()
            assert error == pytest.approx(figures[mode][f"w3_student_k{k}_mse"], rel=1e-6)
    assert setup["photos"] == str(workdir / "photos") and setup["images"] == ["astronaut.png"]
    assert setup["guidance_scales"] == [3.0] and set(figures) == {"mid_pass", "high_pass"}
    baselines, guided = benchmark.TEACHER_BASELINES, benchmark.GUIDED_BASELINE
    for f in figures.values():
        assert f["teacher_k2_mse"] == 0  # the 2-step reference is guided DDIM on SD's uniform spacing itself
        for k in (1, 2):
            keys = [f"student_k{k}_mse", *(f"{name}_k{k}_mse" for name in baselines if (name, k) != ("teacher", 2)),
                    f"w3_student_k{k}_mse", f"w3_{guided}_k{k}_mse"]
            assert all(f[key] > 0 for key in keys), f
        # One step of DPM-Solver++ is first order: DDIM on the same (trailing) timesteps; two are not.
        assert f["teacher_dpmpp_2m_trailing_k1_mse"] == pytest.approx(f["teacher_ddim_trailing_k1_mse"], rel=1e-4)
        assert f["teacher_dpmpp_2m_trailing_k2_mse"] != pytest.approx(f["teacher_ddim_trailing_k2_mse"], rel=1e-3)
    # The teacher's reference read from what test_distillation.py saved with the fidelity's seeds gives the same
    # figures; saved with another seed, it is refused.
    spec = importlib.util.spec_from_file_location("test_distillation_script", ROOT / "test_distillation.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    teacher = str(teacher_paths(workdir / "logs")["mid_pass"])
    saved = ["--input_dir", str(workdir / "photos"), "--resolution", "128", "--teacher", teacher, "--steps", "2",
             "--save_latents"]
    assert script.main([*saved, "--seed", str(benchmark.SEED), "--out_dir", str(tmp_path / "teacher")]) == 0
    assert script.main([*saved, "--seed", "7", "--out_dir", str(tmp_path / "other")]) == 0
    again, again_setup = benchmark.fidelity(teacher_paths(workdir / "logs"), student_file(guided_run), 128, 1, 2,
                                            torch.device("cpu"), photos=workdir / "photos", guidance_scales=[3],
                                            references=tmp_path / "teacher")
    assert again_setup["references"] == {"folder": str(tmp_path / "teacher"), "read": 1}  # mid_pass's; high_pass solved
    for mode in ("mid_pass", "high_pass"):
        assert again[mode] == pytest.approx(figures[mode], rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match=r"control_seed: saved 7, wanted 1000; seed: saved 7, wanted 1000"):
        benchmark.fidelity(teacher_paths(workdir / "logs"), student_file(guided_run), 128, 1, 2, torch.device("cpu"),
                           photos=workdir / "photos", references=tmp_path / "other")
    tables = benchmark.fidelity_tables(figures, setup, 2)
    rows = [line for line in tables if line.startswith("| mid_pass |")]
    assert len(rows) == 2 + 1  # a row per k, then one per w
    best = min(figures["mid_pass"][f"{name}_k1_mse"] for name in baselines)
    assert rows[1].startswith("| mid_pass | 2 |") and rows[1].endswith(f"| {best:.4f} |")  # 2 NFE: 1 guided step
    assert any("2k NFE" in line for line in tables) and rows[2].startswith("| mid_pass | 3 |")


def test_one_check_for_guidance_scales_and_ranges():
    """`check_guidance_scale` is what the student, its sampling and the distill options check a scale with."""
    assert check_guidance_scale(7) == 7.0 and check_guidance_scale(2, [2, 12]) == 2.0
    for bad in (-1.0, float("nan"), float("inf"), "7"):
        with pytest.raises(ValueError, match="finite number >= 0"):
            check_guidance_scale(bad)
    with pytest.raises(ValueError, match=r"guidance_scale=13 is outside the range \[2, 12\]"):
        check_guidance_scale(13.0, [2.0, 12.0])
    for bad_range in ([3.0, 2.0], [-1.0, 2.0], [1.0, 2.0, 3.0]):
        with pytest.raises(ValueError, match="guidance_range must be \\[lo, hi\\] with 0 <= lo <= hi"):
            check_guidance_range(bad_range)
    with pytest.raises(ValueError, match=r"outside the range \[2, 12\]"):
        DistillOptions(guidance_range=[2.0, 12.0], guidance_scale=1.0)
    with pytest.raises(ValueError, match="guidance_range must be"):
        DistillOptions(guidance_range=[12.0, 2.0])
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        DistillOptions(teacher_sampler="euler")
