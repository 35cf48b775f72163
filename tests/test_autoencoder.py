"""The KL autoencoder against the SD reference outputs, the SD 2.1-base key manifest, and its posterior."""
from __future__ import annotations

import pytest
import torch

from ldm.checkpoint import CheckpointMismatchError, load_weights, save_state_dict
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from tests.reference import assert_close_to_reference, configs, sd21_shapes
from tests.reference import weights as reference_weights

SD21_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0,
)


assert_close = assert_close_to_reference



@pytest.fixture(scope="module")
def first_stage_config() -> dict:
    return configs()["first_stage_config"]


@pytest.fixture(scope="module")
def vae(reference, first_stage_config) -> AutoencoderKL:
    model = AutoencoderKL(**first_stage_config).eval()
    load_weights(model, reference_weights("first_stage_model."))  # strict: the Identity lossconfig adds no keys
    return model


@torch.no_grad()
def test_encode_matches_reference(vae, reference):
    posterior = vae.encode(reference["vae_in.image"])
    assert_close(posterior.mean, reference["vae_out.mean"])
    assert_close(posterior.logvar, reference["vae_out.logvar"])


@torch.no_grad()
def test_decode_matches_reference(vae, reference):
    assert_close(vae.decode(reference["vae_in.z"]), reference["vae_out.decoded"])


@torch.no_grad()
def test_forward_uses_mode_or_sample(vae, reference):
    image = reference["vae_in.image"]
    reconstruction, posterior = vae(image, sample_posterior=False)
    assert torch.equal(reconstruction, vae.decode(posterior.mode()))
    torch.manual_seed(0)
    sampled, _ = vae(image)
    assert sampled.shape == image.shape and not torch.allclose(sampled, reconstruction)


def test_full_size_keys_match_sd21_manifest():
    prefix = "first_stage_model."
    expected = {k[len(prefix):]: tuple(v) for k, v in sd21_shapes().items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = AutoencoderKL(ddconfig=SD21_DDCONFIG, embed_dim=4, lossconfig={"target": "torch.nn.Identity"})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(  # SD's VAE GroupNorm, not the UNet's float32 GroupNorm32 (eps 1e-5)
        type(m) is torch.nn.GroupNorm and m.num_groups == 32 and m.eps == 1e-6 and m.affine for m in norms
    )


def test_attention_levels_build_and_run():
    config = dict(SD21_DDCONFIG, ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=16, attn_resolutions=[8])
    model = AutoencoderKL(ddconfig=config, embed_dim=4).eval()
    keys = model.state_dict().keys()
    assert "encoder.down.1.attn.0.q.weight" in keys and "decoder.up.1.attn.1.proj_out.weight" in keys
    assert "encoder.down.0.attn.0.q.weight" not in keys
    with torch.no_grad():
        posterior = model.encode(torch.randn(1, 3, 16, 16))
        assert posterior.mean.shape == (1, 4, 8, 8)
        assert model.decode(posterior.mode()).shape == (1, 3, 16, 16)


def test_ckpt_path_with_ignore_keys(vae, first_stage_config, tmp_path):
    path = tmp_path / "vae.ckpt"
    save_state_dict({**vae.state_dict(), "loss.logvar": torch.zeros(())}, path)
    model = AutoencoderKL(**first_stage_config, ckpt_path=path, ignore_keys=("loss",))
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointMismatchError, match="loss"):
        AutoencoderKL(**first_stage_config, ckpt_path=path)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        AutoencoderKL(**first_stage_config, ckpt_path=tmp_path / "missing.ckpt")


def test_gaussian_moments_and_clamp():
    mean = torch.randn(2, 4, 3, 3)
    logvar = torch.linspace(-40.0, 30.0, 72).reshape(2, 4, 3, 3)
    dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert torch.equal(dist.mode(), mean)
    assert dist.logvar.min() == -30.0 and dist.logvar.max() == 20.0
    assert torch.allclose(dist.var, dist.std**2, rtol=1e-5)
    draw = dist.sample(torch.Generator().manual_seed(1))
    assert torch.equal(draw, dist.sample(torch.Generator().manual_seed(1)))
    assert draw.shape == mean.shape and not torch.equal(draw, mean)


def test_gaussian_kl():
    params = torch.randn(2, 8, 3, 3)
    dist = DiagonalGaussianDistribution(params)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(dist.mean, dist.std), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=(1, 2, 3))
    assert torch.allclose(dist.kl(), expected, atol=1e-5)
    assert torch.allclose(dist.kl(dist), torch.zeros(2), atol=1e-6)
    assert torch.allclose(DiagonalGaussianDistribution(torch.zeros(1, 8, 2, 2)).kl(), torch.zeros(1))
