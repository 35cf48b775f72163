"""DDIM sampling and the beta schedule against the reference implementation's outputs (and diffusers' DDIM with
eta > 0)."""
import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddim import ddim_sigma, ddim_step, ddim_x0_target
from ldm.models.diffusion.sampling import SAMPLERS, check_sampler, guided_eps, sample
from ldm.models.diffusion.scheduler import Scheduler, ddim_timesteps
from ldm.modules.diffusionmodules.util import make_beta_schedule
from tests.reference import assert_close_to_reference, tensors


class StubModel:
    """The stub eps model of the fixture: eps(x, t, c) = 0.3 x + c * t / 1000."""

    num_timesteps = 1000
    device = torch.device("cpu")

    def __init__(self):
        betas = make_beta_schedule("linear", 1000, 0.00085, 0.012)
        self.alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)

    def apply_model(self, x, t, c):
        return 0.3 * x + c[:, :, None, None] * (t.float() / 1000)[:, None, None, None]


def test_linear_schedule_matches_reference():
    ref = tensors()
    betas = make_beta_schedule("linear", 1000, 0.00085, 0.012)
    assert_close_to_reference(torch.from_numpy(betas), ref["schedule.betas"], rel=1e-12)
    assert_close_to_reference(torch.from_numpy(np.cumprod(1 - betas)), ref["schedule.alphas_cumprod"], rel=1e-12)


def ddim(model, x_T, steps, cond, uncond=None, guidance_scale=1.0, spacing="uniform", final_alpha_cumprod=None,
         **options):
    """The shared loop with DDIM on a `steps`-step Scheduler of `model`'s schedule."""
    scheduler = Scheduler(model.alphas_cumprod, spacing, final_alpha_cumprod).set_timesteps(steps)
    return sample(model.apply_model, x_T, scheduler.steps(x_T.device), cond, uncond, guidance_scale, **options)


@pytest.mark.parametrize("steps", [50, 4])
def test_ddim_with_guidance_matches_reference(steps):
    ref = tensors()
    p = f"ddim{steps}."
    assert np.array_equal(ddim_timesteps(steps), ref[p + "timesteps"].numpy())
    x0 = ddim(StubModel(), ref[p + "x_T"], steps, ref[p + "cond"], ref[p + "uncond"], 7.5)
    assert_close_to_reference(x0, ref[p + "x0"])


def test_guidance_changes_result_and_scale_one_ignores_uncond():
    ref = tensors()
    model, x_T, cond = StubModel(), ref["ddim4.x_T"], ref["ddim4.cond"]
    plain = ddim(model, x_T, 4, cond)
    same = ddim(model, x_T, 4, cond, ref["ddim4.uncond"] * 5, guidance_scale=1.0)
    guided = ddim(model, x_T, 4, cond, ref["ddim4.uncond"], guidance_scale=7.5)
    assert torch.equal(plain, same)
    assert not torch.allclose(plain, guided)


def test_eta_adds_seeded_noise():
    ref = tensors()
    run = lambda seed: ddim(StubModel(), ref["ddim4.x_T"], 4, ref["ddim4.cond"], eta=1.0,
                            generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0)) and not torch.allclose(run(0), run(1))
    with pytest.raises(ValueError, match="eta=1.0 applies to DDIM only"):
        ddim(StubModel(), ref["ddim4.x_T"], 4, ref["ddim4.cond"], eta=1.0, sampler="dpmpp_2m")


@pytest.mark.parametrize("spacing,final_alpha_one,eta", [("uniform", False, 1.0), ("trailing", True, 0.5)])
def test_stochastic_ddim_matches_diffusers_with_the_same_noise(spacing, final_alpha_one, eta):
    """diffusers' DDIMScheduler.step with eta and the noise our generator draws, step by step (its 'leading'
    spacing with steps_offset=1 is SD's uniform one; 4 steps: diffusers lands on the previous timestep too)."""
    from diffusers import DDIMScheduler

    ref, model = tensors(), StubModel()
    x_T, cond, uncond = ref["ddim4.x_T"], ref["ddim4.cond"], ref["ddim4.uncond"]
    ours = ddim(model, x_T, 4, cond, uncond, 7.5, spacing, 1.0 if final_alpha_one else None, eta=eta,
                generator=torch.Generator().manual_seed(3))
    theirs = DDIMScheduler(trained_betas=make_beta_schedule("linear", 1000, 0.00085, 0.012),
                           timestep_spacing="leading" if spacing == "uniform" else spacing,
                           steps_offset=1 if spacing == "uniform" else 0, clip_sample=False,
                           set_alpha_to_one=final_alpha_one)
    theirs.set_timesteps(4)
    x, generator = x_T.clone(), torch.Generator().manual_seed(3)
    for t in theirs.timesteps:
        eps = guided_eps(model.apply_model, x, t.repeat(2), cond, uncond, 7.5)
        noise = torch.randn(x.shape, generator=generator)
        x = theirs.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, ddim(model, x_T, 4, cond, uncond, 7.5, spacing), atol=1e-2)  # noise mattered


def test_sigma_is_zero_on_a_step_to_alpha_one_and_samplers_are_checked():
    a_t = torch.tensor([0.3, 0.6])
    assert ddim_sigma(a_t, torch.tensor([1.0, 1.0]), 1.0).tolist() == [0.0, 0.0]
    assert (ddim_sigma(a_t, torch.tensor([0.5, 0.9]), 1.0) > 0).all()
    assert ddim_sigma(a_t, a_t, 1.0).dtype == torch.float64
    assert SAMPLERS == ("ddim", "dpmpp_2m") and check_sampler("dpmpp_2m") == "dpmpp_2m"
    with pytest.raises(ValueError, match="unknown sampler 'euler'; valid: ddim, dpmpp_2m"):
        sample(StubModel().apply_model, torch.zeros(1, 4, 2, 2), [], None, sampler="euler")


def test_guidance_scale_per_sample_equals_each_samples_own_scale():
    """The distiller guides every example at its own w: one batched call equals one call per scale."""
    ref = tensors()
    model, x, t = StubModel(), ref["ddim4.x_T"], torch.tensor([500, 500])
    cond, uncond = ref["ddim4.cond"], ref["ddim4.uncond"]
    mixed = guided_eps(model.apply_model, x, t, cond, uncond, torch.tensor([2.0, 9.0]))
    for i, scale in enumerate((2.0, 9.0)):
        torch.testing.assert_close(mixed[i], guided_eps(model.apply_model, x, t, cond, uncond, scale)[i])
    assert not torch.allclose(mixed[0], guided_eps(model.apply_model, x, t, cond, uncond, 9.0)[0])


def test_ddim_step_is_exact_for_its_own_noise():
    """With the true noise as eps, one DDIM step from t to 0 (alpha 1) recovers x0 exactly."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    a_t = torch.tensor(0.3)
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
    x_prev, pred_x0 = ddim_step(x_t, noise, a_t, 1.0)
    torch.testing.assert_close(pred_x0, x0)
    torch.testing.assert_close(x_prev, x0)


def test_x0_target_is_the_inverse_of_ddim_step():
    """The distiller's target: one step from x_t with the target's eps lands exactly on the teacher's x_prev."""
    generator = torch.Generator().manual_seed(0)
    x_t, x_prev = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    a_t, a_prev = torch.tensor([0.1, 0.3]).view(-1, 1, 1, 1), torch.tensor([0.5, 1.0]).view(-1, 1, 1, 1)
    x0 = ddim_x0_target(x_t, x_prev, a_t, a_prev)
    eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    landed, _ = ddim_step(x_t, eps, a_t, a_prev)
    torch.testing.assert_close(landed, x_prev, rtol=1e-5, atol=1e-5)
    assert torch.equal(x0[1], x_prev[1])  # alpha_prev = 1: the target is the teacher's result itself
