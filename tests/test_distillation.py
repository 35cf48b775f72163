"""Frequency-aware distillation: teachers frozen and shared, student learns, checkpoints resume, inference script.

Everything runs on the tiny configs with teacher checkpoints built in a temporary folder: one random tiny
FCDiffusion (its zero-initialised layers randomised so the networks do something), then one copy per mode with
its control net perturbed differently.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import fcdiffusion_distill
from fcdiffusion.distiller import (DistillOptions, FrequencyDistiller, band_energies, ddim_x0_target, load_student,
                                   teacher_model_config)
from fcdiffusion.frequency import CONTROL_MODES
from fcdiffusion.student import STUDENT_TARGET, LoRALinear
from ldm.checkpoint import CheckpointMismatchError, load_state_dict, save_state_dict
from ldm.models.diffusion.ddim import ddim_step
from ldm.util import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "distill_config_tiny.yaml"
SD_CONFIG = ROOT / "configs" / "distill_config.yaml"
PHOTOS = {"astronaut": "an astronaut", "coffee": "a cup of coffee", "chelsea": "a cat"}


def _load_script():
    """The top-level test_distillation.py, under another name (this file is also called test_distillation)."""
    spec = importlib.util.spec_from_file_location("test_distillation_script", ROOT / "test_distillation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def in_repo_root():
    """Configs name files relative to the repository root (e.g. the tiny open_clip architecture)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        yield


@pytest.fixture(scope="module")
def config():
    return load_config(TINY)


@pytest.fixture(scope="module")
def model_config(config) -> dict:
    return teacher_model_config(config)


@pytest.fixture(scope="module")
def student_options(config) -> dict:
    return {k: v for k, v in dict(config.student).items() if k != "init"} | {"trainable": ["control_net"]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, model_config) -> Path:
    """Teacher checkpoints under logs/fcdiffusion_<mode>_checkpoint/last.ckpt, photos with prompts, a data index."""
    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    base = instantiate_from_config(random_text_encoder(model_config))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in base.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    state = base.state_dict()
    for i, mode in enumerate(CONTROL_MODES):
        generator = torch.Generator().manual_seed(100 + i)
        teacher = {k: v + 0.05 * torch.randn(v.shape, generator=generator)
                   if k.startswith("control_model.") and ("zero_convs" in k or "middle_block_out" in k) else v
                   for k, v in state.items()}
        save_state_dict(teacher, root / "logs" / f"fcdiffusion_{mode}_checkpoint" / "last.ckpt")
    photos = root / "photos"
    photos.mkdir()
    lines = []
    for name, prompt in PHOTOS.items():
        Image.fromarray(np.asarray(getattr(skimage.data, name)())[::4, ::4]).save(photos / f"{name}.png")
        (photos / f"{name}.txt").write_text(prompt)
        lines.append(json.dumps({"img_path": f"photos/{name}.png", "prompt": prompt}))
    (root / "data.json").write_text("\n".join(lines) + "\n")
    return root


def random_text_encoder(config: dict, **params) -> dict:
    """`config` (plus `params`) with a randomly initialised text encoder instead of its weights file."""
    config = copy.deepcopy(config)
    config["params"].update(params)
    config["params"]["cond_stage_config"]["params"]["version"] = None
    return config


def teacher_paths(workdir: Path) -> dict[str, Path]:
    return {m: workdir / "logs" / f"fcdiffusion_{m}_checkpoint" / "last.ckpt" for m in CONTROL_MODES}


def make_distiller(workdir, model_config, student_options, config, **distill) -> FrequencyDistiller:
    paths = teacher_paths(workdir)
    return FrequencyDistiller(model_config, paths, paths["mid_pass"], student_options,
                              {**dict(config.distill), **distill}, learning_rate=1e-3)


def fixed_inputs(distiller: FrequencyDistiller):
    """A fixed latent batch, prompts, student steps and noise (two images x four modes)."""
    torch.manual_seed(0)
    z = torch.randn(2, 4, 16, 16)
    context = distiller.student.get_learned_conditioning(["a cat", "a red car"])
    steps = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    noise = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    return z, context, steps, noise


def run_steps(distiller: FrequencyDistiller, n: int) -> list[float]:
    """n optimizer steps on the fixed batch (the mini_pass shuffle seeded too); returns the losses."""
    z, context, steps, noise = fixed_inputs(distiller)
    optimizer = distiller.configure_optimizers()
    distiller.train()
    losses = []
    for _ in range(n):
        torch.manual_seed(5)
        loss, _ = distiller.distillation_loss(z, context, CONTROL_MODES, steps, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ---- maths ------------------------------------------------------------------------------------------------
def test_x0_target_makes_one_ddim_step_land_on_the_teacher():
    generator = torch.Generator().manual_seed(0)
    x_t, x_prev = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    a_t, a_prev = torch.tensor([0.1, 0.3]).view(-1, 1, 1, 1), torch.tensor([0.5, 1.0]).view(-1, 1, 1, 1)
    x0 = ddim_x0_target(x_t, x_prev, a_t, a_prev)
    eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    landed, _ = ddim_step(x_t, eps, a_t, a_prev)
    torch.testing.assert_close(landed, x_prev, rtol=1e-5, atol=1e-5)
    assert torch.equal(x0[1], x_prev[1])  # alpha_prev = 1: the target is the teacher's result itself


def test_band_energies_split_the_mse_and_weights_follow_the_config():
    diff = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    options = DistillOptions(bands={"low": 0, "mid": 5, "high": 12}, band_weights={"high_pass": {"high": 3.0}})
    energies = band_energies(diff, options.band_limits())
    torch.testing.assert_close(energies.sum(1), diff.pow(2).mean((1, 2, 3)))
    assert options.band_limits() == [(0, 4), (5, 11), (12, None)]
    weights = options.weight_matrix()
    assert weights[CONTROL_MODES.index("high_pass")].tolist() == [1.0, 1.0, 3.0] and weights.sum() == 14
    with pytest.raises(ValueError, match="unknown bands"):
        DistillOptions(bands={"low": 0}, band_weights={"low_pass": {"mid": 2.0}})
    with pytest.raises(ValueError, match="from 0"):
        DistillOptions(bands={"low": 3})


# ---- the distiller ----------------------------------------------------------------------------------------
def test_teachers_frozen_shared_and_untouched_while_the_student_learns(workdir, model_config, student_options, config):
    distiller = make_distiller(workdir, model_config, student_options, config)
    teachers = distiller.teachers
    before = {m: {k: v.clone() for k, v in t.state_dict().items()} for m, t in teachers.items()}
    student_before = {n: p.detach().clone() for n, p in distiller.student.named_parameters()}
    trained = {n for n, p in distiller.student.named_parameters() if p.requires_grad}
    losses = run_steps(distiller, 25)

    assert losses[-1] < 0.5 * losses[0], losses  # the loss on a fixed batch falls
    for mode, teacher in teachers.items():
        assert not teacher.training
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
        assert all(torch.equal(v, before[mode][k]) for k, v in teacher.state_dict().items())
    assert "mode_embedding.weight" in trained
    assert all(n.startswith(("control_model.", "mode_embedding.")) for n in trained)
    changed = {n for n, p in distiller.student.named_parameters() if not torch.equal(p, student_before[n])}
    assert changed and changed <= trained and any(n.startswith("control_model.") for n in changed)
    # The teachers are not submodules: not in the state dict, not in the optimizer.
    assert all(k.startswith("student.") for k in distiller.state_dict())

    # Sharing: one object for frozen tensors, distinct control nets; counts below separate copies.
    mini, high = teachers["mini_pass"], teachers["high_pass"]
    key = "first_stage_model.decoder.conv_out.weight"
    assert mini.get_parameter(key) is high.get_parameter(key) is distiller.student.get_parameter(key)
    unet_key = "model.diffusion_model.out.2.weight"
    assert mini.get_parameter(unet_key) is distiller.student.get_parameter(unet_key)
    assert mini.control_model.zero_convs_add[0][0].weight is not high.control_model.zero_convs_add[0][0].weight
    counts = distiller.parameter_counts()
    separate = sum(sum(p.numel() for p in m.parameters()) for m in distiller.models())
    assert counts["independent"] == separate and counts["resident"] < separate
    control = sum(p.numel() for p in mini.control_model.parameters())
    assert counts["resident"] == sum(p.numel() for p in mini.parameters()) + 4 * control + 4 * 32 * 4


def test_modes_per_step_and_teachers_follow_to(workdir, model_config, student_options, config):
    distiller = make_distiller(workdir, model_config, student_options, config, modes_per_step=2, control_weight=0.5,
                               denoise_weight=0.1)
    torch.manual_seed(0)
    picks = [distiller.sample_modes() for _ in range(20)]
    assert all(len(p) == 2 and p == [m for m in CONTROL_MODES if m in p] for p in picks)
    assert len({tuple(p) for p in picks}) > 1
    z, context, steps, noise = fixed_inputs(distiller)
    loss, logs = distiller.distillation_loss(z, context, ["low_pass", "high_pass"], steps[:4], noise[:4])
    expected = logs["train/loss_distill"] + 0.1 * logs["train/loss_denoise"] + 0.5 * logs["train/loss_control"]
    torch.testing.assert_close(loss.detach(), expected)
    assert {f"train/band_{b}" for b in config.distill.bands} <= set(logs)
    assert {"train/distill_low_pass", "train/distill_high_pass"} <= set(logs)
    assert logs["train/loss_control"] > 0

    distiller.to(torch.float64)  # the same _apply path as .to(device)
    key = "first_stage_model.decoder.conv_out.weight"
    for teacher in distiller.teachers.values():
        assert all(p.dtype == torch.float64 for p in teacher.parameters())
        assert teacher.get_parameter(key) is distiller.student.get_parameter(key)


def test_sd21_distiller_on_meta_holds_under_45_percent_of_five_models():
    config = load_config(SD_CONFIG)
    distiller = FrequencyDistiller(teacher_model_config(config))
    assert all(p.is_meta for m in distiller.models() for p in m.parameters())
    counts = distiller.parameter_counts()
    full = sum(p.numel() for p in distiller.teachers["mid_pass"].parameters())
    assert full > 1.6e9  # SD 2.1-base + control net
    assert counts["resident"] <= 0.45 * 5 * full, counts
    assert counts["resident"] < 0.45 * counts["independent"]


# ---- the student --------------------------------------------------------------------------------------------
def test_mode_embedding_makes_one_student_differ_per_mode(workdir, model_config, student_options):
    student = load_student(model_config, _export_initial_student(workdir, model_config, student_options),
                           **student_options).eval()
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = student.get_learned_conditioning(["a house"])
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    cond = student.mode_conditioning(z, context, "low_pass")

    def eps(mode_index: int) -> torch.Tensor:
        with torch.no_grad():
            return student.apply_model(x, t, {**cond, "c_mode": torch.tensor([mode_index])})

    assert all(torch.equal(eps(0), eps(i)) for i in range(1, 4))  # zero-initialised: a no-op
    with torch.no_grad():
        student.mode_embedding.weight.normal_(generator=torch.Generator().manual_seed(2))
    outputs = [eps(i) for i in range(4)]
    assert all(not torch.allclose(outputs[i], outputs[j]) for i in range(4) for j in range(i + 1, 4))


def _export_initial_student(workdir: Path, model_config, student_options) -> Path:
    """A student file made from the mid_pass teacher, the way the distiller initialises it."""
    path = workdir / "initial_student.safetensors"
    if not path.exists():
        config = {**random_text_encoder(model_config, **student_options), "target": STUDENT_TARGET}
        student = instantiate_from_config(config)
        teacher = load_state_dict(teacher_paths(workdir)["mid_pass"])
        student.load_state_dict({**student.state_dict(), **teacher})
        save_state_dict(student.state_dict(), path)
    return path


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_generate_uses_trailing_steps_and_ends_at_alpha_one(workdir, model_config, student_options, steps):
    student = load_student(model_config, _export_initial_student(workdir, model_config, student_options),
                           **student_options).eval()
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = student.mode_conditioning(z, student.get_learned_conditioning(["a tree"]), "mid_pass")
    seen, last = [], {}
    original = student.apply_model

    def recording(x, t, c):
        eps = original(x, t, c)
        seen.append(int(t[0]))
        last.update(x=x, t=int(t[0]), eps=eps)
        return eps

    student.apply_model = recording
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    out = student.generate(cond, steps=steps, x_T=x_T)
    assert seen == [round(1000 * (steps - i) / steps) - 1 for i in range(steps)]  # 999 first, no guidance pass
    a = student.alphas_cumprod[last["t"]]
    torch.testing.assert_close(out, (last["x"] - (1 - a).sqrt() * last["eps"]) / a.sqrt())  # alpha_prev = 1


def test_lora_student_starts_as_its_init_and_trains_only_adapters(workdir, model_config, student_options):
    init = _export_initial_student(workdir, model_config, student_options)
    plain = load_student(model_config, init, **student_options).eval()
    distiller_like = FrequencyDistiller(model_config, teacher_paths(workdir), init,
                                        {"trainable": ["lora"], "lora_rank": 2}, {"bands": {"all": 0}})
    lora = distiller_like.student.eval()
    adapters = [m for m in lora.modules() if isinstance(m, LoRALinear)]
    assert adapters and all(not p.requires_grad for p in lora.control_model.parameters())
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or n.startswith("mode_embedding.") for n in trained)
    assert all(n.startswith("model.diffusion_model.output_blocks.") for n in trained if ".lora_" in n)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = plain.mode_conditioning(z, plain.get_learned_conditioning(["a boat"]), "high_pass")
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([300])
    with torch.no_grad():
        torch.testing.assert_close(lora.apply_model(x, t, cond), plain.apply_model(x, t, cond))
        adapters[0].lora_up.weight.fill_(0.5)
        assert not torch.allclose(lora.apply_model(x, t, cond), plain.apply_model(x, t, cond))
    with pytest.raises(CheckpointMismatchError, match="missing keys"):  # no adapters in the file: not a LoRA student
        load_student(model_config, init, trainable=["lora"], lora_rank=2)


# ---- the scripts --------------------------------------------------------------------------------------------
def distill_args(workdir: Path, logdir: Path, max_steps: int, *extra: str) -> list[str]:
    paths = teacher_paths(workdir)
    return ["--config", str(TINY), "--data", str(workdir / "data.json"), "--logdir", str(logdir),
            "--max_steps", str(max_steps), "--checkpoint_every", "1", "--batch_size", "2",
            "--student_init", str(paths["mid_pass"]),
            *[a for m in CONTROL_MODES for a in (f"--teacher_{m}", str(paths[m]))], *extra]


@pytest.fixture(scope="module")
def distilled(workdir) -> Path:
    """A two-step distillation run (image log at step 2); returns its logdir."""
    logdir = workdir / "run"
    args = distill_args(workdir, logdir, 2, "--log_images_every", "2", "distill.log_teacher_steps=2")
    assert fcdiffusion_distill.main(args) == 0
    return logdir


def test_checkpoints_hold_only_the_student_and_export_loads_strictly(distilled, model_config, student_options):
    folder = distilled / fcdiffusion_distill.CHECKPOINT_DIR
    checkpoint = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2 and checkpoint["optimizer_states"]
    assert all(k.startswith("student.") for k in checkpoint["state_dict"])
    assert (folder / "step-000001.ckpt").is_file() and (folder / "image_log" / "step-000002.png").is_file()
    exported = load_state_dict(folder / fcdiffusion_distill.STUDENT_FILE)
    assert set(exported) == {k[len("student."):] for k in checkpoint["state_dict"]}
    student = load_student(model_config, folder / fcdiffusion_distill.STUDENT_FILE, **student_options)
    assert torch.equal(student.mode_embedding.weight, checkpoint["state_dict"]["student.mode_embedding.weight"])
    assert student.mode_embedding.weight.any()  # it trained
    rows = list(csv.DictReader(open(next(distilled.glob("fcdiffusion_distill/version_*/metrics.csv")))))
    assert any(row.get("train/band_f12_up") for row in rows)


def test_interrupted_run_resumes_its_step_count(distilled, workdir):
    logdir = workdir / "resumed"
    shutil.copytree(distilled, logdir)
    assert fcdiffusion_distill.main(distill_args(workdir, logdir, 4)) == 0
    folder = logdir / fcdiffusion_distill.CHECKPOINT_DIR
    assert torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4
    assert (folder / "step-000003.ckpt").is_file() and not (folder / "step-000005.ckpt").exists()
    first = torch.load(folder / "step-000002.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert not torch.equal(first["student.mode_embedding.weight"], last["student.mode_embedding.weight"])


def test_missing_teacher_names_the_file_and_the_command(workdir, capsys):
    missing = workdir / "nowhere" / "fcdiffusion_high_pass_checkpoint" / "last.ckpt"
    args = distill_args(workdir, workdir / "never", 1, "--teacher_high_pass", str(missing))
    assert fcdiffusion_distill.main(args) == 1
    error = capsys.readouterr().err
    assert str(missing) in error
    assert "python fcdiffusion_train.py" in error and "--control_mode high_pass" in error
    assert f"--logdir {workdir / 'nowhere'}" in error


def test_inference_script_writes_pngs_and_grids_and_skips_unreadable(distilled, workdir, tmp_path, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(workdir / "photos", photos)
    (photos / "broken.png").write_bytes(b"not a png at all")
    (photos / "broken.txt").write_text("never read")
    out = tmp_path / "out"
    student = distilled / fcdiffusion_distill.CHECKPOINT_DIR / fcdiffusion_distill.STUDENT_FILE
    script = _load_script()
    assert script.main(["--input_dir", str(photos), "--student", str(student), "--config", str(TINY),
                        "--steps", "2", "--resolution", "128", "--batch_size", "2", "--out_dir", str(out)]) == 0
    assert "broken.png" in capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    per_mode = [f"{n}_{m}{kind}.png" for n in PHOTOS for m in CONTROL_MODES for kind in ("", "_control")]
    assert names == sorted(per_mode + [f"{n}_grid.png" for n in PHOTOS])
    grid = Image.open(out / "astronaut_grid.png")
    assert grid.width > 9 * 128 and grid.height > 128  # source + (control, result) x 4 modes
    assert Image.open(out / "coffee_high_pass.png").size == (128, 128)

    teacher = teacher_paths(workdir)["low_pass"]
    with contextlib.redirect_stderr(io.StringIO()):
        assert script.main(["--input_dir", str(photos), "--teacher", str(teacher), "--mode", "low_pass",
                            "--prompt", "a painting", "--steps", "2", "--config", str(TINY), "--resolution", "128",
                            "--out_dir", str(tmp_path / "teacher")]) == 0
        assert script.main(["--input_dir", str(photos), "--teacher", str(teacher), "--config", str(TINY)]) == 2
    assert len(list((tmp_path / "teacher").glob("*_low_pass.png"))) == len(PHOTOS)
