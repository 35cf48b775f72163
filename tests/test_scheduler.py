"""The noise scheduler: SD's uniform and the trailing timestep spacings, the alphas of each step and the one the last
step lands on, with diffusers' DDIMScheduler as the independent oracle where it defines the same spacing."""
import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddim import ddim_step
from ldm.models.diffusion.scheduler import (
    SPACINGS,
    Scheduler,
    check_spacing,
    ddim_timesteps,
    spaced_timesteps,
    trailing_timesteps,
)
from ldm.modules.diffusionmodules.util import make_beta_schedule

BETAS = make_beta_schedule("linear", 1000, 0.00085, 0.012)  # SD's schedule
ALPHAS = torch.tensor(np.cumprod(1.0 - BETAS), dtype=torch.float32)  # as LatentDiffusion's buffer


def diffusers_ddim(spacing: str, steps: int, final_alpha_one: bool):
    """diffusers' DDIMScheduler on SD's betas: its 'leading' spacing with steps_offset=1 is SD's uniform one."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(trained_betas=BETAS, timestep_spacing="leading" if spacing == "uniform" else spacing,
                              steps_offset=1 if spacing == "uniform" else 0, clip_sample=False,
                              set_alpha_to_one=final_alpha_one)
    scheduler.set_timesteps(steps)
    return scheduler


def test_spacings_by_name():
    assert trailing_timesteps(4).tolist() == [249, 499, 749, 999]
    assert trailing_timesteps(1).tolist() == [999]
    assert trailing_timesteps(2).tolist() == [499, 999]
    assert len(trailing_timesteps(8)) == 8 and trailing_timesteps(8)[-1] == 999
    assert trailing_timesteps(1000).tolist() == list(range(1000))
    with pytest.raises(ValueError):
        ddim_timesteps(0)
    assert ddim_timesteps(999)[-1] == 999
    with pytest.raises(ValueError, match="in \\[1, 999\\]"):
        ddim_timesteps(1000)  # its last timestep would be 1000, past the schedule
    assert spaced_timesteps(4, "trailing").tolist() == [249, 499, 749, 999]
    assert spaced_timesteps(4).tolist() == [1, 251, 501, 751]
    assert SPACINGS == ("uniform", "trailing") and check_spacing("trailing") == "trailing"
    with pytest.raises(ValueError, match="'leading'; valid: uniform, trailing"):
        spaced_timesteps(4, "leading")


@pytest.mark.parametrize("spacing,steps", [("uniform", 50), ("uniform", 7), ("uniform", 999), ("trailing", 1),
                                           ("trailing", 3), ("trailing", 4), ("trailing", 1000)])
def test_timesteps_and_their_alphas_match_diffusers(spacing, steps):
    ours = Scheduler(ALPHAS, spacing).set_timesteps(steps)
    theirs = diffusers_ddim(spacing, steps, final_alpha_one=False)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()  # sampling order: descending
    # diffusers takes its cumulative product in float32, ours in float64: equal to float32 rounding.
    torch.testing.assert_close(ours.alphas, theirs.alphas_cumprod[theirs.timesteps], rtol=1e-5, atol=0)
    assert torch.equal(ours.alphas, ALPHAS[torch.from_numpy(ours.timesteps)])
    assert torch.equal(ours.alphas_next[:-1], ours.alphas[1:])


@pytest.mark.parametrize("spacing,steps,final_alpha_one", [("uniform", 10, False), ("uniform", 3, True),
                                                           ("trailing", 4, True), ("trailing", 5, False)])
def test_each_steps_alphas_are_those_of_diffusers_ddim_step(spacing, steps, final_alpha_one):
    """One DDIM step per (t, a_t, a_next) from the same x equals diffusers' step at t: same alpha at t and the same
    alpha landed on, the last one alphas_cumprod[0] (SD) or 1 (`final_alpha_cumprod=1.0`, diffusers'
    set_alpha_to_one). The step counts divide 1000: diffusers' DDIM lands on t - 1000 // steps, the previous
    timestep of both spacings exactly then."""
    ours = Scheduler(ALPHAS, spacing, 1.0 if final_alpha_one else None).set_timesteps(steps)
    theirs = diffusers_ddim(spacing, steps, final_alpha_one)
    generator = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 6, 6, generator=generator), torch.randn(2, 4, 6, 6, generator=generator)
    for (t, a_t, a_next), t_theirs in zip(ours.steps("cpu"), theirs.timesteps, strict=True):
        assert t == int(t_theirs) and a_t.dtype == ALPHAS.dtype and a_t.ndim == 0
        x_ours, _ = ddim_step(x, eps, a_t, a_next)
        torch.testing.assert_close(x_ours, theirs.step(eps, t_theirs, x).prev_sample, rtol=1e-5, atol=1e-5)
    expected = 1.0 if final_alpha_one else ALPHAS[0].item()
    assert ours.alphas_next[-1].item() == expected == pytest.approx(theirs.final_alpha_cumprod.item(), rel=1e-6)


def test_final_alpha_and_the_steps_handed_to_a_loop():
    sd = Scheduler(ALPHAS).set_timesteps(4)
    assert sd.timesteps.tolist() == [751, 501, 251, 1] and torch.equal(sd.alphas_next[-1], ALPHAS[0])
    student = Scheduler(ALPHAS, "trailing", 1.0).set_timesteps(2)
    steps = student.steps("cpu")
    assert [t for t, _, _ in steps] == [999, 499] and all(isinstance(t, int) for t, _, _ in steps)
    assert [a.item() for _, a, _ in steps] == [ALPHAS[999].item(), ALPHAS[499].item()]
    assert [a.item() for _, _, a in steps] == [ALPHAS[499].item(), 1.0]
    float64 = Scheduler(ALPHAS.double(), "trailing").set_timesteps(2)  # the schedule's own dtype is kept
    assert float64.alphas.dtype == float64.steps("cpu")[0][1].dtype == torch.float64


def test_invalid_schedulers_are_refused():
    with pytest.raises(ValueError, match="unknown timestep spacing 'leading'"):
        Scheduler(ALPHAS, "leading")
    for final in (0.0, 1.5):
        with pytest.raises(ValueError, match="final_alpha_cumprod must be in \\(0, 1\\]"):
            Scheduler(ALPHAS, final_alpha_cumprod=final)
    with pytest.raises(ValueError, match="one alpha per training timestep"):
        Scheduler(ALPHAS.view(10, 100))
    with pytest.raises(RuntimeError, match="set_timesteps"):
        Scheduler(ALPHAS).steps("cpu")
    with pytest.raises(ValueError, match="in \\[1, 1000\\]"):
        Scheduler(ALPHAS, "trailing").set_timesteps(1001)
