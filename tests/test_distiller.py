"""The frequency-aware distiller: teachers frozen and shared, the student learns, loss parts, memory at SD size."""
from __future__ import annotations

import pytest
import torch

from fcdiffusion.core.frequency import CONTROL_MODES
from fcdiffusion.core.weights import ModeMismatchError, UntrainedTeacherError, teacher_model_config
from fcdiffusion.train.distiller import DistillOptions, FrequencyDistiller, band_energies, mode_chunks
from ldm.util import load_config
from tests.helpers import SD_DISTILL_CONFIG, teacher_paths


def make_distiller(workdir, model_config, distill_config, **distill) -> FrequencyDistiller:
    """The tiny config's distiller; progressive on 4 steps unless `distill` says otherwise (the trajectory objective
    has its own tests, tests/test_trajectory_distill.py)."""
    paths = teacher_paths(workdir / "logs")
    options = {**dict(distill_config.distill), "objective": "progressive", "student_steps": 4, **distill}
    return FrequencyDistiller(model_config, paths, paths["mid_pass"], {"trainable": ["control_net"]}, options,
                              learning_rate=1e-3)


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
    optimizer = distiller.configure_optimizers()["optimizer"]
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


def test_mode_chunks_split_a_mode_major_batch():
    batch = torch.arange(6)
    low, high = mode_chunks(batch, ["low_pass", "high_pass"])
    assert low.tolist() == [0, 1, 2] and high.tolist() == [3, 4, 5] and low.data_ptr() == batch.data_ptr()
    with pytest.raises(ValueError, match="6 samples does not split evenly over 4 modes"):
        mode_chunks(batch, CONTROL_MODES)


def test_teachers_frozen_shared_and_untouched_while_the_student_learns(workdir, model_config, distill_config):
    distiller = make_distiller(workdir, model_config, distill_config)
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
    assert "control_model.label_emb.weight" in trained
    assert all(n.startswith("control_model.") for n in trained)
    changed = {n for n, p in distiller.student.named_parameters() if not torch.equal(p, student_before[n])}
    assert changed and changed <= trained and "control_model.label_emb.weight" in changed
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


def test_loss_is_the_sum_of_its_named_parts(workdir, model_config, distill_config):
    distiller = make_distiller(workdir, model_config, distill_config, modes_per_step=2, control_weight=0.5,
                               denoise_weight=0.1)
    torch.manual_seed(0)
    picks = [distiller.sample_modes() for _ in range(20)]
    assert all(len(p) == 2 and p == [m for m in CONTROL_MODES if m in p] for p in picks)
    assert len({tuple(p) for p in picks}) > 1
    z, context, steps, noise = fixed_inputs(distiller)
    modes = ["low_pass", "high_pass"]
    loss, logs = distiller.distillation_loss(z, context, modes, steps[:4], noise[:4])
    expected = logs["train/loss_distill"] + 0.1 * logs["train/loss_denoise"] + 0.5 * logs["train/loss_control"]
    torch.testing.assert_close(loss.detach(), expected)
    assert {f"train/band_{b}" for b in distill_config.distill.bands} <= set(logs)
    assert {"train/distill_low_pass", "train/distill_high_pass"} <= set(logs)
    assert logs["train/loss_control"] > 0

    # The parts on their own: teacher targets of the right shape, band loss zero exactly at the target.
    t, t_prev = distiller.student_schedule(steps[:4])
    conds = [distiller.student.condition(z, context, mode) for mode in modes]
    x_t = distiller.student.q_sample(z.repeat(2, 1, 1, 1), t, noise[:4])
    target = distiller.teacher_targets(x_t, t, t_prev, modes, conds)
    weighted, energies = distiller.band_loss(target, target, modes)
    assert target.shape == x_t.shape and not weighted.any() and energies.shape == (4, len(distill_config.distill.bands))
    weighted, _ = distiller.band_loss(target + 1, target, modes)
    assert (weighted > 0).all()

    distiller.to(torch.float64)  # the same _apply path as .to(device)
    key = "first_stage_model.decoder.conv_out.weight"
    for teacher in distiller.teachers.values():
        assert all(p.dtype == torch.float64 for p in teacher.parameters())
        assert teacher.get_parameter(key) is distiller.student.get_parameter(key)


def test_a_teacher_given_for_another_mode_or_untrained_is_refused(workdir, model_config, distill_config, tiny_files):
    paths = teacher_paths(workdir / "logs")
    swapped = {**paths, "low_pass": paths["high_pass"]}
    with pytest.raises(ModeMismatchError, match="high_pass teacher.*'low_pass'"):
        FrequencyDistiller(model_config, swapped, paths["mid_pass"], {}, dict(distill_config.distill))
    untrained = {**paths, "mini_pass": tiny_files.init}  # tool_add_control_sd21.py output: never trained
    with pytest.raises(UntrainedTeacherError, match="untrained init checkpoint"):
        FrequencyDistiller(model_config, untrained, paths["mid_pass"], {}, dict(distill_config.distill))


def test_sd21_distiller_on_meta_holds_under_45_percent_of_five_models():
    distiller = FrequencyDistiller(teacher_model_config(load_config(SD_DISTILL_CONFIG)))
    assert all(p.is_meta for m in distiller.models() for p in m.parameters())
    counts = distiller.parameter_counts()
    full = sum(p.numel() for p in distiller.teachers["mid_pass"].parameters())
    assert full > 1.6e9  # SD 2.1-base + control net
    assert counts["resident"] <= 0.45 * 5 * full, counts
    assert counts["resident"] < 0.45 * counts["independent"]


def test_benchmark_builds_the_sd21_architecture_at_a_reduced_resolution():
    """The speed benchmark times SD 2.1-base at 128 px: bands scaled to the 16x16 latent, student alongside."""
    from fcdiffusion.apps.benchmark import resized_config
    from fcdiffusion.core.student import student_config
    from fcdiffusion.core.weights import build_on_meta

    config = resized_config(teacher_model_config(load_config(SD_DISTILL_CONFIG)), 128)
    assert config["params"]["image_size"] == 16 and config["params"]["frequency_thresholds"]["high_threshold"] == 12
    teacher, student = build_on_meta(config), build_on_meta(student_config(config))
    assert teacher.modes == ("mid_pass",) and student.image_size == 16
