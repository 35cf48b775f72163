"""Trajectory distillation: the teacher's full guided solve read at the student's boundaries, the trained step
counts the student records and keeps to, the per-step normalised loss, guided control targets, the w embedding."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from fcdiffusion.core.control_net import ScalarEmbedding
from fcdiffusion.core.frequency import CONTROL_MODES
from fcdiffusion.core.weights import load_student
from fcdiffusion.train.distiller import DistillOptions, FrequencyDistiller
from fcdiffusion.train.trajectory import (
    FINAL,
    START,
    Trajectory,
    TrajectoryPool,
    boundary_timesteps,
    cond_slice,
    teacher_trajectory,
)
from ldm.models.diffusion.ddim import ddim_step
from ldm.models.diffusion.sampling import guided_eps
from ldm.models.diffusion.scheduler import Scheduler
from ldm.modules.diffusionmodules.util import timestep_embedding
from tests.helpers import teacher_paths

MODES = ("low_pass", "high_pass")


def make_distiller(workdir, model_config, distill_config, step_embedding: bool = False,
                   **distill) -> FrequencyDistiller:
    """Two teachers of the tiny config, the trajectory objective on a 6-step teacher solve."""
    paths = teacher_paths(workdir / "logs")
    options = {**OmegaConf.to_container(distill_config.distill), "teacher_steps": 6, **distill}
    return FrequencyDistiller(model_config, {m: paths[m] for m in MODES}, paths["mid_pass"],
                              {"trainable": ["control_net"], "step_embedding": step_embedding}, options,
                              learning_rate=2e-3)


def batch(distiller: FrequencyDistiller):
    torch.manual_seed(0)
    z = torch.randn(2, 4, 16, 16)
    context = distiller.student.get_learned_conditioning(["a cat", "a red car"])
    return z, context, torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))


def test_boundaries_are_the_inner_steps_of_every_trained_schedule():
    assert boundary_timesteps([1, 2, 4], "trailing", 1000) == [749, 499, 249]
    assert boundary_timesteps([1], "trailing", 1000) == []
    assert boundary_timesteps([3], "trailing", 1000) == [666, 332]  # trailing: round(1000 - 1000 i / 3) - 1


def test_the_trajectory_is_the_teachers_own_solve_read_at_the_boundaries(workdir, model_config, distill_config):
    distiller = make_distiller(workdir, model_config, distill_config)
    teacher = distiller.teachers["low_pass"]
    z, context, noise = batch(distiller)
    cond = teacher.condition(z, context, "low_pass")
    uncond = teacher.unconditional_conditioning(cond)
    w = torch.tensor([9.0, 3.0])
    calls = []

    def counted(*args):
        calls.append(args[1])
        return teacher.apply_model(*args)

    states = teacher_trajectory(counted, teacher.alphas_cumprod, noise[:2], cond, uncond, w, [749, 499, 249], 6)
    assert len(calls) == 6  # one guided (batched) evaluation per step: the boundaries reuse the steps' own
    # the end of the solve is the teacher's own 6-step guided DDIM sample, per sample at its w
    for j in range(2):
        reference = teacher.sample(cond_slice(cond, j), noise[j:j + 1], steps=6, guidance_scale=float(w[j]))
        torch.testing.assert_close(states[FINAL][j:j + 1], reference, rtol=1e-4, atol=5e-4)  # batch of 2 vs 1
    assert torch.equal(states[START], noise[:2])
    # 749 lies between the grid's first two timesteps: one DDIM step from x_T with its guided eps
    scheduler = Scheduler(teacher.alphas_cumprod).set_timesteps(6)
    assert scheduler.timesteps[0] > 749 > scheduler.timesteps[1]
    x = noise[:2]
    t0, a0, a1 = scheduler.steps("cpu")[0]
    eps = guided_eps(teacher.apply_model, x, torch.full((2,), t0), cond, uncond, w)
    expected, _ = ddim_step(x, eps, a0, teacher.alphas_cumprod[749])
    assert torch.equal(states[749], expected)


def test_the_student_keeps_to_the_step_counts_it_was_trained_for(workdir, model_config, distill_config, tmp_path):
    distiller = make_distiller(workdir, model_config, distill_config, student_steps=[1, 2, 4])
    assert distiller.step_pairs == [(1, 0), (2, 0), (2, 1), (4, 0), (4, 1), (4, 2), (4, 3)]
    path = tmp_path / "student.safetensors"
    distiller.export_student(path)
    student = load_student(path)
    assert student.trained_steps == [1, 2, 4] and student.student_steps == 4
    z, context, noise = batch(distiller)
    cond = student.condition(z, context, "low_pass")
    for k in (1, 2, 4):
        assert student.sample(cond, noise[:2], steps=k).shape == noise[:2].shape
    with pytest.raises(ValueError, match=r"distilled for 1, 2, 4 steps.*3 steps"):
        student.sample(cond, noise[:2], steps=3)
    with pytest.raises(ValueError, match="progressive distils one step count"):
        DistillOptions(objective="progressive", student_steps=[1, 2])
    with pytest.raises(ValueError, match="denoise_weight applies to objective: progressive"):
        DistillOptions(denoise_weight=1.0)
    with pytest.raises(ValueError, match="valid: trajectory, progressive"):
        DistillOptions(objective="consistency")


def test_each_pair_learns_from_the_state_at_its_start_towards_the_state_at_its_end(workdir, model_config,
                                                                                  distill_config):
    distiller = make_distiller(workdir, model_config, distill_config)
    z, context, noise = batch(distiller)
    trajectory = distiller.solve_trajectories(z, context, MODES, noise)[0]
    x, t, x_next, t_next = distiller.pair_states(trajectory, (4, 3))
    assert (t, t_next) == (999, 749) and torch.equal(x, noise[:1]) and torch.equal(x_next, trajectory.states[749])
    x, t, x_next, t_next = distiller.pair_states(trajectory, (2, 0))
    assert (t, t_next) == (499, -1) and torch.equal(x_next, trajectory.states[FINAL])
    x, t, x_next, t_next = distiller.pair_states(trajectory, (1, 0))
    assert (t, t_next) == (999, -1) and torch.equal(x, noise[:1])


def test_the_normalised_loss_weighs_every_step_alike(workdir, model_config, distill_config):
    """The x0 error of a step from pure noise is far above the last step's; normalised per mode and step, both count
    about one, so the band weights act whatever timesteps were drawn."""
    distiller = make_distiller(workdir, model_config, distill_config, band_weights={})
    z, context, noise = batch(distiller)
    trajectories = distiller.solve_trajectories(z, context, MODES, noise)
    p1, p4 = distiller.step_pairs.index((1, 0)), distiller.step_pairs.index((4, 0))
    pairs = torch.tensor([p1, p4] * 2)
    distiller.train()
    _, logs = distiller.trajectory_loss(trajectories, MODES, pairs)
    raw = distiller.step_error[CONTROL_MODES.index("low_pass"), [p1, p4]]
    assert raw[0] > 10 * raw[1]  # from noise in one step vs the last of four
    assert logs["train/loss_distill"] == pytest.approx(1.0, rel=0.2)
    first = distiller.step_error.clone()
    distiller.trajectory_loss(trajectories, MODES, pairs)
    torch.testing.assert_close(distiller.step_error, first, equal_nan=True)  # same errors: the running scale stays
    distiller.eval()
    assert torch.isnan(distiller.step_error[0, distiller.step_pairs.index((2, 1))])  # never drawn: no scale yet


def test_band_weights_do_not_tip_the_balance_between_modes(workdir, model_config, distill_config):
    """A weight of 4 on every band of high_pass would make its examples count 4x a low_pass example's; normalised
    per mode, each mode's weighted error counts one."""
    distiller = make_distiller(workdir, model_config, distill_config,
                               band_weights={"high_pass": {band: 4.0 for band in distill_config.distill.bands}})
    z, context, noise = batch(distiller)
    trajectories = distiller.solve_trajectories(z, context, MODES, noise)
    pairs = torch.tensor([distiller.step_pairs.index((2, 0))] * 4)
    distiller.train()
    _, logs = distiller.trajectory_loss(trajectories, MODES, pairs)
    assert logs["train/distill_high_pass"] > 2 * logs["train/distill_low_pass"]  # raw: the weights count in it
    assert logs["train/loss_distill"] == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("step_embedding", [False, True])
def test_the_student_converges_to_the_teachers_full_solve(workdir, model_config, distill_config, step_embedding):
    """On a fixed pool of solved trajectories the student's k-step samples approach the teacher's solve."""
    distiller = make_distiller(workdir, model_config, distill_config, step_embedding, student_steps=[1, 2],
                               guidance_scale=5.0)
    z, context, noise = batch(distiller)
    pool = distiller.solve_trajectories(z, context, MODES, noise)

    def distance() -> float:
        errors = []
        for tr in pool:
            for k in (1, 2):
                sample = distiller.student.sample(tr.cond, tr.states[START], steps=k)
                errors.append(torch.mean((sample - tr.states[FINAL]) ** 2).item())
        return sum(errors) / len(errors)

    before = distance()
    optimizer = distiller.configure_optimizers()["optimizer"]
    distiller.train()
    for step in range(40):
        pairs = torch.arange(4) + step
        loss, _ = distiller.trajectory_loss(pool, MODES, pairs % len(distiller.step_pairs))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    distiller.eval()
    after = distance()
    assert after < 0.5 * before, (before, after)


def test_a_step_conditioned_student_is_told_the_size_of_each_step(workdir, model_config, distill_config, tmp_path,
                                                                    monkeypatch):
    """The first step of 1, 2 and 4 steps starts from the same noise at t = 999 and must land on three different
    states; a step-conditioned student takes num_timesteps / k as an input, in training and in sampling, and its
    weights file keeps the embedding."""
    distiller = make_distiller(workdir, model_config, distill_config, step_embedding=True)
    z, context, noise = batch(distiller)
    trajectories = distiller.solve_trajectories(z, context, MODES, noise)
    assert "step_size" not in trajectories[0].cond  # one trajectory serves every count
    student = distiller.student
    seen, forward = [], student.control_model.forward
    monkeypatch.setattr(student.control_model, "forward",
                        lambda *args, **kwargs: (seen.append(kwargs["step_size"]), forward(*args, **kwargs))[1])
    pairs = torch.tensor([distiller.step_pairs.index(pair) for pair in [(1, 0), (2, 1), (4, 0), (4, 3)]])
    distiller.trajectory_loss(trajectories, MODES, pairs)
    assert seen[-1].tolist() == [1000.0, 500.0, 250.0, 250.0]
    cond = student.condition(z, context, "low_pass")
    assert "step_size" not in distiller.teacher_condition(cond)
    for k in (1, 2, 4):
        seen.clear()
        student.sample(cond, noise[:2], steps=k)
        assert len(seen) == k and all(s.tolist() == [1000.0 / k] * 2 for s in seen)
    x, t = noise[:2], torch.tensor([999, 999])
    fresh = student.apply_model(x, t, {**cond, "step_size": torch.full((2,), 1000.0)})
    torch.testing.assert_close(student.apply_model(x, t, {**cond, "step_size": torch.full((2,), 250.0)}), fresh)
    with torch.no_grad():  # a trained embedding: the step size changes the step
        torch.nn.init.normal_(student.control_model.step_emb.layers[2].weight)
    one = student.apply_model(x, t, {**cond, "step_size": torch.full((2,), 1000.0)})
    assert not torch.allclose(one, student.apply_model(x, t, {**cond, "step_size": torch.full((2,), 250.0)}))
    path = tmp_path / "student.safetensors"
    distiller.export_student(path)
    loaded = load_student(path)
    assert loaded.step_conditioned
    torch.testing.assert_close(loaded.apply_model(x, t, {**cond, "step_size": torch.full((2,), 1000.0)}), one)
    plain = make_distiller(workdir, model_config, distill_config).student
    with pytest.raises(ValueError, match="step size must be given exactly when the control net has a step size "
                                         "embedding"):
        plain.apply_model(x, t, {**plain.condition(z, context, "low_pass"), "step_size": torch.full((2,), 250.0)})


def test_control_targets_are_the_guided_teachers(workdir, model_config, distill_config):
    distiller = make_distiller(workdir, model_config, distill_config, control_weight=1.0)
    z, context, noise = batch(distiller)
    teacher = distiller.teachers["low_pass"]
    cond = distiller.teacher_condition(distiller.student.condition(z, context, "low_pass"))
    t = torch.tensor([500, 500])
    c = teacher.control(noise[:2], t, cond)
    u = teacher.control(noise[:2], t, teacher.unconditional_conditioning(cond))
    student_pairs = [(torch.zeros_like(a), torch.zeros_like(m)) for a, m in c]
    w = torch.tensor([1.0, 1.0])
    conditional = distiller.control_loss(noise[:2], t, ["low_pass"], [cond], student_pairs)
    assert distiller.control_loss(noise[:2], t, ["low_pass"], [cond], student_pairs, w) == pytest.approx(
        conditional.item())
    w = torch.tensor([3.0, 3.0])
    expected = torch.stack([(u_ + 3 * (c_ - u_)).pow(2).mean() for pair_c, pair_u in zip(c, u)
                            for c_, u_ in zip(pair_c, pair_u)]).mean()
    assert distiller.control_loss(noise[:2], t, ["low_pass"], [cond], student_pairs, w) == pytest.approx(
        expected.item(), rel=1e-5)


def test_the_guidance_embedding_scales_w_minus_one_as_latent_consistency_models():
    torch.manual_seed(0)
    embedding = ScalarEmbedding(8, 16, scale=1000.0)
    torch.nn.init.normal_(embedding.layers[2].weight)
    w = torch.tensor([1.0, 7.5])
    expected = embedding.layers(timestep_embedding((w - 1) * 1000, 8))
    torch.testing.assert_close(embedding(w), expected)
    raw = ScalarEmbedding(8, 16)  # files from before the scale was recorded embed w itself
    raw.load_state_dict(embedding.state_dict())
    torch.testing.assert_close(raw(w), embedding.layers(timestep_embedding(w, 8)))


def test_the_pool_keeps_the_newest_and_draws_by_mode(workdir, model_config, distill_config):
    distiller = make_distiller(workdir, model_config, distill_config)
    z, context, noise = batch(distiller)
    trajectories = distiller.solve_trajectories(z, context, MODES, noise)
    pool = TrajectoryPool(3)
    for trajectory in trajectories:
        pool.add(trajectory)
    assert len(pool) == 3 and pool.count("low_pass") == 1 and pool.count("high_pass") == 2
    assert all(tr.mode == "high_pass" for tr in pool.draw(5, "high_pass"))
    with pytest.raises(ValueError, match="no mid_pass trajectory"):
        pool.draw(1, "mid_pass")
    assert set(CONTROL_MODES) >= set(MODES)


def test_the_batch_is_encoded_only_when_the_pool_is_refreshed(workdir, model_config, distill_config, monkeypatch):
    distiller = make_distiller(workdir, model_config, distill_config, trajectory_refresh=3, student_steps=[1])
    encode, encoded = distiller.student.get_input, []
    monkeypatch.setattr(distiller.student, "get_input", lambda b: encoded.append(1) or encode(b))
    step = [0]
    monkeypatch.setattr(FrequencyDistiller, "global_step", property(lambda self: step[0]))
    torch.manual_seed(0)
    photos = {"jpg": torch.rand(2, 64, 64, 3) * 2 - 1, "txt": ["a cat", "a red car"]}
    for step[0] in range(7):
        drawn = distiller.pooled_trajectories(photos, list(MODES))
        assert [tr.mode for tr in drawn] == ["low_pass"] * 2 + ["high_pass"] * 2
    assert len(encoded) == 3 and len(distiller.pool) == 3 * 2 * len(MODES)  # solved at steps 0, 3 and 6


def test_the_pool_is_filled_before_the_first_step_then_refreshed_every_n_steps(workdir, model_config, distill_config,
                                                                               monkeypatch):
    distiller = make_distiller(workdir, model_config, distill_config, trajectory_prefill=10, trajectory_refresh=4,
                               trajectory_prefill_batch=3, student_steps=[1], teacher_steps=2)
    solved = []
    monkeypatch.setattr(distiller, "solve_trajectories", lambda z, context, modes: solved.append((step[0], len(z))) or [
        Trajectory(m, {}, torch.ones(1), {}) for m in modes for _ in range(len(z))])
    step = [0]
    monkeypatch.setattr(FrequencyDistiller, "global_step", property(lambda self: step[0]))
    photos = {"jpg": torch.rand(2, 64, 64, 3) * 2 - 1, "txt": ["a cat", "a red car"]}
    distiller.prefill_pool([photos])  # 10 trajectories of 2 modes: 5 photos, the 2-photo loader read 3 times
    assert solved == [(0, 3), (0, 2)] and len(distiller.pool) == 10
    distiller.prefill_pool([photos])  # full: nothing more to solve
    for step[0] in range(9):
        distiller.pooled_trajectories(photos, list(MODES))
    assert solved == [(0, 3), (0, 2), (4, 2), (8, 2)]  # then a batch's every 4th step, not again at step 0
    with pytest.raises(ValueError, match="yielded no batch"):
        make_distiller(workdir, model_config, distill_config, trajectory_prefill=4).prefill_pool([])
    with pytest.raises(ValueError, match="trajectory_prefill_batch"):
        DistillOptions(trajectory_prefill_batch=-1)
    with pytest.raises(ValueError, match="trajectory_prefill"):
        DistillOptions(trajectory_prefill=300, trajectory_pool=256)
