"""DPM-Solver++(2M): the published update (diffusers' implementation as the oracle), its limits against DDIM, and
the teacher sampling with it."""
import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddim import ddim_step
from ldm.models.diffusion.dpm_solver import dpmpp_2m_step
from ldm.models.diffusion.sampling import guided_eps, sample
from ldm.models.diffusion.scheduler import Scheduler
from ldm.modules.diffusionmodules.util import make_beta_schedule

BETAS = make_beta_schedule("linear", 1000, 0.00085, 0.012)  # SD's schedule


class FakeModel:
    """A fixed nonlinear eps model on SD's schedule, guided by a conditioning vector c (N, C)."""

    num_timesteps = 1000
    device = torch.device("cpu")
    alphas_cumprod = torch.tensor(np.cumprod(1.0 - BETAS), dtype=torch.float32)

    def apply_model(self, x, t, c):
        scale = (t.float() / 1000)[:, None, None, None]
        return 0.2 * x + scale * torch.tanh(0.5 * x + c[:, :, None, None])


class GaussianModel(FakeModel):
    """The exact eps of data x0 ~ N(mu, s^2): its probability-flow ODE keeps (x_t - sqrt(a) mu) / sqrt(a s^2 + 1 - a)
    constant, so the exact solution is known."""

    alphas_cumprod = torch.tensor(np.cumprod(1.0 - BETAS), dtype=torch.float64)
    mu, s = 0.5, 0.4

    def apply_model(self, x, t, c):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(x.dtype)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)

    def solution(self, x_T, t_T, a_end):
        a = self.alphas_cumprod[t_T]
        z = (x_T - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a).sqrt()
        return a_end**0.5 * self.mu + z * (a_end * self.s**2 + 1 - a_end) ** 0.5


def solve(model, x_T, steps, sampler, cond=None, uncond=None, guidance_scale=1.0, spacing="uniform",
          final_alpha_cumprod=None):
    """The shared loop with `sampler` on a `steps`-step Scheduler of `model`'s schedule."""
    scheduler = Scheduler(model.alphas_cumprod, spacing, final_alpha_cumprod).set_timesteps(steps)
    return sample(model.apply_model, x_T, scheduler.steps(x_T.device), cond, uncond, guidance_scale, sampler=sampler)


def test_first_order_step_is_ddim_and_a_step_to_alpha_one_lands_on_x0():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    a_s, a_t = torch.tensor([0.2, 0.5]).view(-1, 1, 1, 1), torch.tensor([0.6, 0.9]).view(-1, 1, 1, 1)
    ddim, x0 = ddim_step(x, eps, a_s, a_t)
    dpm, h = dpmpp_2m_step(x, x0, a_s, a_t)
    torch.testing.assert_close(dpm, ddim, rtol=1e-5, atol=1e-5)
    assert (h > 0).all()
    # With a history the step is second order (differs); landing on alpha 1 it is first order again: x0 itself.
    second, _ = dpmpp_2m_step(x, x0, a_s, a_t, x0_prev=x0 + 1, h_prev=h)
    assert not torch.allclose(second, ddim, atol=1e-3)
    clean, h_last = dpmpp_2m_step(x, x0, a_s, 1.0, x0_prev=x0 + 1, h_prev=h)
    assert torch.isinf(h_last).all() and torch.allclose(clean, x0)


@pytest.mark.parametrize("spacing,steps,final", [("uniform", 6, "sigma_min"), ("trailing", 5, "sigma_min"),
                                                 ("trailing", 4, "zero")])
def test_matches_the_published_update_of_diffusers_dpm_solver_multistep(spacing, steps, final):
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++, midpoint, order 2) with SD's betas on the same fake
    model, guidance and timesteps. 'sigma_min' ends at alphas_cumprod[0] as SD's DDIM (every step after the first
    second order: lower_order_final off); 'zero' ends at alpha 1, where the last step is first order in both."""
    from diffusers import DPMSolverMultistepScheduler

    model = FakeModel()
    g = torch.Generator().manual_seed(0)
    x_T, cond, uncond = torch.randn(2, 3, 6, 6, generator=g), torch.randn(2, 3, generator=g), torch.zeros(2, 3)
    final_alpha_cumprod = 1.0 if final == "zero" else None
    ours = solve(model, x_T, steps, "dpmpp_2m", cond, uncond, 7.5, spacing, final_alpha_cumprod)
    timesteps = Scheduler(model.alphas_cumprod, spacing).set_timesteps(steps).timesteps

    scheduler = DPMSolverMultistepScheduler(trained_betas=BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                            solver_type="midpoint", prediction_type="epsilon",
                                            final_sigmas_type=final, lower_order_final=False)
    scheduler.set_timesteps(timesteps=timesteps.tolist())
    x = x_T.clone()
    for t in scheduler.timesteps:
        eps = guided_eps(model.apply_model, x, t.repeat(2), cond, uncond, 7.5)
        x = scheduler.step(eps, t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    plain = solve(model, x_T, steps, "ddim", cond, uncond, 7.5, spacing, final_alpha_cumprod)
    assert (ours - plain).abs().max() > 1e-2  # so the comparison above could tell the solvers apart


def test_many_steps_agree_with_ddim_and_few_steps_are_closer_to_the_ode_solution():
    """On SD's uniform spacing, toward the exact probability-flow solution of Gaussian data: DPM-Solver++ (second
    order) is closer than DDIM (first order) at few steps, identical at one step, and both meet at many steps (999,
    the most SD's uniform spacing takes)."""
    model = GaussianModel()
    x_T = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = {}
    for steps in (1, 4, 10, 25, 999):
        start = int(Scheduler(model.alphas_cumprod).set_timesteps(steps).timesteps[0])
        exact = model.solution(x_T, start, model.alphas_cumprod[0].item())
        ddim, dpm = (solve(model, x_T, steps, sampler) for sampler in ("ddim", "dpmpp_2m"))
        errors[steps] = ((ddim - exact).abs().max().item(), (dpm - exact).abs().max().item(),
                         (dpm - ddim).abs().max().item())
    assert errors[1][2] < 1e-6  # one step: first order, DDIM itself
    assert all(errors[n][1] < errors[n][0] for n in (4, 10, 25)), errors
    assert errors[4][1] < 0.2 * errors[4][0] and errors[4][2] > 0.3, errors
    ddim_error, dpm_error, gap = errors[999]
    assert ddim_error < 0.006 and dpm_error < 0.001 and gap < 0.006, errors  # measured 0.0045, 0.00057, 0.0051
