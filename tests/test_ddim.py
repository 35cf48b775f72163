"""DDIM sampler and beta schedule against the reference implementation's outputs."""
import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddim import (
    DDIMSampler,
    ddim_step,
    ddim_timesteps,
    ddim_x0_target,
    guided_eps,
    spaced_timesteps,
    trailing_timesteps,
)
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


@pytest.mark.parametrize("steps", [50, 4])
def test_ddim_with_guidance_matches_reference(steps):
    ref = tensors()
    p = f"ddim{steps}."
    assert np.array_equal(ddim_timesteps(steps), ref[p + "timesteps"].numpy())
    x0 = DDIMSampler(StubModel()).sample(
        steps, 2, (4, 6, 6), conditioning=ref[p + "cond"], x_T=ref[p + "x_T"], eta=0.0,
        unconditional_guidance_scale=7.5, unconditional_conditioning=ref[p + "uncond"], verbose=False)
    assert_close_to_reference(x0, ref[p + "x0"])


def test_guidance_changes_result_and_scale_one_ignores_uncond():
    ref = tensors()
    sampler = DDIMSampler(StubModel())
    args = dict(conditioning=ref["ddim4.cond"], x_T=ref["ddim4.x_T"], verbose=False)
    plain = sampler.sample(4, 2, (4, 6, 6), **args)
    same = sampler.sample(4, 2, (4, 6, 6), unconditional_conditioning=ref["ddim4.uncond"] * 5,
                             unconditional_guidance_scale=1.0, **args)
    guided = sampler.sample(4, 2, (4, 6, 6), unconditional_conditioning=ref["ddim4.uncond"],
                               unconditional_guidance_scale=7.5, **args)
    assert torch.equal(plain, same)
    assert not torch.allclose(plain, guided)


def test_eta_adds_seeded_noise():
    ref = tensors()
    sampler = DDIMSampler(StubModel())
    run = lambda seed: sampler.sample(4, 2, (4, 6, 6), conditioning=ref["ddim4.cond"], x_T=ref["ddim4.x_T"], eta=1.0,
                                      verbose=False, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0)) and not torch.allclose(run(0), run(1))


def test_trailing_schedule_starts_at_last_timestep():
    assert trailing_timesteps(4).tolist() == [249, 499, 749, 999]
    assert trailing_timesteps(1).tolist() == [999]
    assert trailing_timesteps(2).tolist() == [499, 999]
    assert len(trailing_timesteps(8)) == 8 and trailing_timesteps(8)[-1] == 999
    with pytest.raises(ValueError):
        ddim_timesteps(0)
    assert ddim_timesteps(999)[-1] == 999
    with pytest.raises(ValueError, match="in \\[1, 999\\]"):
        ddim_timesteps(1000)  # its last timestep would be 1000, past the schedule
    assert spaced_timesteps(4, "trailing").tolist() == [249, 499, 749, 999]
    assert spaced_timesteps(4).tolist() == [1, 251, 501, 751]
    with pytest.raises(ValueError, match="uniform, trailing"):
        spaced_timesteps(4, "leading")


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
