"""LatentDiffusion: the full SD 2.1-base key layout, strict checkpoint loading, training and sampling."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointMismatchError, load_state_dict, load_weights, save_state_dict
from ldm.models.diffusion.sampling import sample
from ldm.models.diffusion.scheduler import Scheduler
from ldm.util import instantiate_from_config, load_config, without_text_encoder_file
from tests.reference import assert_close_to_reference, sd21_shapes, tensors


def build(path, *overrides):
    config = OmegaConf.to_container(load_config(path, list(overrides)).model, resolve=True)
    return instantiate_from_config(without_text_encoder_file(config))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build("configs/sd21_tiny.yaml")


def test_full_config_has_exactly_the_sd21_base_keys_and_shapes():
    with torch.device("meta"):
        model = build("configs/sd21_base.yaml")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = sd21_shapes()
    assert sorted(set(expected) - set(ours)) == [] and sorted(set(ours) - set(expected)) == []
    assert ours == expected


def test_schedule_buffers_match_reference(tiny):
    ref = tensors()
    assert_close_to_reference(tiny.betas, ref["schedule.betas"], rel=1e-6)
    assert_close_to_reference(tiny.alphas_cumprod, ref["schedule.alphas_cumprod"], rel=1e-6)
    ac = ref["schedule.alphas_cumprod"]
    torch.testing.assert_close(tiny.sqrt_recipm1_alphas_cumprod.double(), (1 / ac - 1).sqrt(), rtol=1e-6, atol=0)


def test_q_sample_matches_closed_form(tiny):
    x0, noise = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    t = torch.tensor([0, 500, 999])
    a = tiny.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(tiny.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)


def test_strict_loading_reports_missing_unexpected_and_shapes(tiny, tmp_path):
    state = tiny.state_dict()
    path = tmp_path / "model.safetensors"
    save_state_dict(state, path)
    assert load_weights(tiny, path) == []
    broken = dict(state)
    broken.pop("model.diffusion_model.out.2.weight")
    broken["model.diffusion_model.extra.weight"] = torch.zeros(1)
    broken["first_stage_model.quant_conv.weight"] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(tiny, broken)
    message = str(info.value)
    assert "1 missing" in message and "model.diffusion_model.*" in message
    assert "1 unexpected" in message and "first_stage_model.quant_conv.weight" in message


def test_ckpt_and_safetensors_round_trip(tiny, tmp_path):
    for name in ("a.ckpt", "b.safetensors", "c.bin"):
        save_state_dict(tiny.state_dict(), tmp_path / name)
        loaded = load_state_dict(tmp_path / name)
        assert all(torch.equal(loaded[k], v) for k, v in tiny.state_dict().items())
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_state_dict(tmp_path / "nowhere.ckpt")


def test_training_step_lowers_loss_on_a_fixed_batch_and_keeps_frozen_parts(tiny):
    torch.manual_seed(0)
    batch = {"jpg": torch.rand(2, 128, 128, 3) * 2 - 1, "txt": ["a cat", "a harbour at night"]}
    vae_before = {k: v.clone() for k, v in tiny.first_stage_model.state_dict().items()}
    z, c = tiny.get_input(batch, sample_posterior=False)
    assert z.shape == (2, 4, 32, 32) and c.shape == (2, 77, 16)
    t, noise = torch.randint(0, 1000, (2,)), torch.randn_like(z)
    opt = torch.optim.Adam(tiny.trainable_parameters(), lr=1e-3)
    tiny.train()
    assert not tiny.first_stage_model.training and not tiny.cond_stage_model.training
    losses = []
    for _ in range(15):
        loss, logs = tiny.p_losses(z, c, t, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert "train/loss_simple" in logs
    assert all(torch.equal(v, tiny.first_stage_model.state_dict()[k]) for k, v in vae_before.items())


def test_latent_cache_encodes_each_image_once_for_the_same_latents(tiny, monkeypatch):
    """With `latent_cache`, a batch of images seen before is served from the cache (in any order and company) and
    one with a new image is encoded; the latents, posterior samples included, are those of encoding every batch."""
    torch.manual_seed(0)
    images = torch.rand(3, 128, 128, 3) * 2 - 1
    batches = [[0, 1], [1, 0], [2, 1], [2, 0]]

    def batch(rows):
        return {"jpg": images[rows], "txt": ["a cat"] * len(rows), "path": [f"photo{i}.png" for i in rows]}

    def latents():
        torch.manual_seed(5)
        return [tiny.get_input(batch(rows))[0] for rows in batches]

    plain = latents()
    encoded = []
    encode = tiny.first_stage_model.encode
    monkeypatch.setattr(tiny.first_stage_model, "encode", lambda x: encoded.append(len(x)) or encode(x))
    tiny.latent_cache = {}
    try:
        cached = latents()
    finally:
        tiny.latent_cache = None
    assert encoded == [2, 2]  # [0, 1] and [2, 1] (photo2 is new); [1, 0] and [2, 0] come from the cache
    assert all(torch.equal(a, b) for a, b in zip(cached, plain))
    assert not torch.equal(plain[0], plain[1])  # the posterior samples differ from draw to draw


def test_text_to_image_samples_are_guided_ddim_from_seeded_noise(tiny):
    """log_images' samples: the shared loop with guided DDIM on SD's uniform Scheduler, from noise seeded by `seed`."""
    tiny.eval()
    batch = {"jpg": torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1, "txt": ["a cat"]}
    images = lambda seed: tiny.log_images(batch, N=1, steps=4, guidance_scale=7.5, seed=seed)["samples"]
    a = images(0)
    assert a.shape == (1, 3, 128, 128) and torch.equal(a, images(0)) and not torch.equal(a, images(1))
    c, uc = tiny.get_learned_conditioning(["a cat"]), tiny.get_learned_conditioning([""])
    x_T = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    latents = sample(tiny.apply_model, x_T, Scheduler(tiny.alphas_cumprod).set_timesteps(4).steps("cpu"), c, uc, 7.5)
    assert torch.equal(a, tiny.decode_first_stage(latents).clamp(-1, 1))


def test_unsupported_options_fail_loudly():
    with pytest.raises(ValueError, match="parameterization"):
        build("configs/sd21_tiny.yaml", "model.params.parameterization=v")


def test_sd_only_keys_are_accepted_in_one_place_and_checked():
    """SD's YAML files carry keys for code this codebase does not have (configs/sd21_base.yaml builds above, with
    `monitor`, `use_ema`, the UNet's `image_size`, ...): `ldm.util.SD_ONLY_PARAMS` drops them, refuses a value that
    would make another model, and leaves every other key to the constructor."""
    assert "monitor" in load_config("configs/sd21_base.yaml").model.params
    for override, message in [("model.params.use_ema=true", "use_ema=True is not supported"),
                              ("model.params.num_timesteps_cond=2", "num_timesteps_cond=2 is not supported"),
                              ("model.params.first_stage_config.params.ema_decay=0.9", "ema_decay=0.9")]:
        with pytest.raises(ValueError, match=message):
            build("configs/sd21_tiny.yaml", override)
    with pytest.raises(TypeError, match="image_sise"):  # a misspelt key is no SD key: the constructor refuses it
        build("configs/sd21_tiny.yaml", "model.params.unet_config.params.image_sise=32")
