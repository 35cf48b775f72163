"""Training SD's own parts (train_sd.py): the autoencoder's loss and training step, exact latent rescaling,
random-crop augmentation, and the script's train -> export -> resume path on the tiny configs."""
import logging

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

import train_sd
from fcdiffusion.train.dataset import Augment, FCDiffusionDataset, prepare_image
from fcdiffusion.train.pretraining import SD_SCALE_FACTOR, latent_std, normalise_latents, reconstruction_psnr
from ldm.checkpoint import load_checkpoint, load_weights
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses import ReconstructionKLLoss, psnr
from ldm.util import instantiate_from_config, load_config

AUTOENCODER_CONFIG = "configs/autoencoder_tiny.yaml"


def tiny_autoencoder(**params) -> AutoencoderKL:
    torch.manual_seed(0)
    config = OmegaConf.to_container(load_config(AUTOENCODER_CONFIG).model, resolve=True)
    config["params"].update(params)
    return instantiate_from_config(config)


def test_psnr_matches_skimage():
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1 for _ in range(2))
    ours = psnr(a, b)
    for i in range(2):
        expected = peak_signal_noise_ratio(((b[i] + 1) / 2).numpy(), ((a[i] + 1) / 2).numpy(), data_range=1.0)
        assert ours[i].item() == pytest.approx(expected, rel=1e-5)


def test_reconstruction_kl_loss_is_zero_only_for_a_perfect_standard_normal_code():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    standard = DiagonalGaussianDistribution(torch.zeros(2, 8, 1, 1))  # mean 0, logvar 0: KL to N(0, I) is 0
    for pixel_loss in ("l1", "l2"):
        loss_fn = ReconstructionKLLoss(kl_weight=1e-6, pixel_loss=pixel_loss)
        assert loss_fn(x, x, standard)[0].item() == 0
        assert loss_fn(x, x + 0.1, standard)[0].item() > 0
        shifted = DiagonalGaussianDistribution(torch.ones(2, 8, 1, 1))
        assert loss_fn(x, x, shifted)[0].item() > 0
    with pytest.raises(ValueError, match="pixel_loss"):
        ReconstructionKLLoss(pixel_loss="lpips")


def test_autoencoder_without_a_loss_refuses_to_train():
    vae = tiny_autoencoder(lossconfig={"target": "torch.nn.Identity"})
    with pytest.raises(ValueError, match="no training loss"):
        vae.training_step({"jpg": torch.zeros(1, 64, 64, 3)}, 0)


def test_autoencoder_training_steps_reduce_the_loss():
    vae = tiny_autoencoder()
    batch = {"jpg": torch.from_numpy(np.stack([prepare_image(Image.fromarray(
        np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).resize((64, 64)), 64)
        for i in range(2)]))}
    vae.log = lambda *args, **kwargs: None
    vae.log_dict = lambda *args, **kwargs: None
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = vae.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    grid = vae.log_images(batch, N=1)
    assert set(grid) == {"source", "reconstruction"} and grid["reconstruction"].shape == (1, 3, 64, 64)


def test_rescale_latents_changes_the_code_not_the_reconstruction():
    vae = tiny_autoencoder().eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        before = vae.encode(x)
        reconstruction = vae.decode(before.mode())
        images = [prepare_image(Image.fromarray((np.random.default_rng(i).random((64, 64, 3)) * 255).astype(
            np.uint8)), 64) for i in range(3)]
        factor = normalise_latents(vae, images)
        after = vae.encode(x)
        assert torch.allclose(after.mean, before.mean * factor, rtol=1e-4, atol=1e-6)
        assert torch.allclose(after.std, before.std * factor, rtol=1e-4, atol=1e-6)
        assert torch.allclose(vae.decode(after.mode()), reconstruction, atol=1e-5)
        assert latent_std(vae, images) * SD_SCALE_FACTOR == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="positive"):
        vae.rescale_latents(0.0)


def test_augment_crops_flips_and_is_seeded():
    image = Image.fromarray(np.arange(64 * 96 * 3, dtype=np.uint8).reshape(64, 96, 3))
    augment = Augment(crop_scale=(0.25, 0.75), hflip=True)
    torch.manual_seed(0)
    first = [prepare_image(image, 32, augment) for _ in range(4)]
    torch.manual_seed(0)
    again = [prepare_image(image, 32, augment) for _ in range(4)]
    assert all(a.shape == (32, 32, 3) for a in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert len({a.tobytes() for a in first}) == 4
    assert not np.array_equal(first[0], prepare_image(image, 32))
    assert Augment.from_config(None) is None
    assert Augment.from_config({"crop_scale": [0.5, 1.0]}) == Augment((0.5, 1.0), False)
    with pytest.raises(ValueError, match="crop_scale"):
        Augment(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="unknown augment"):
        Augment.from_config({"rotate": 10})


def test_train_sd_trains_exports_and_resumes_the_autoencoder_then_the_unet(tiny_files, tmp_path, caplog):
    logdir, vae_file, base_file = tmp_path / "logs", tmp_path / "vae.safetensors", tmp_path / "base.ckpt"
    common = ["--data", str(tiny_files.data), "--logdir", str(logdir), "--batch_size", "2",
              "--checkpoint_every", "2", "--log_images_every", "2"]
    args = ["--config", AUTOENCODER_CONFIG, *common, "--max_steps", "2", "--export", str(vae_file)]
    assert train_sd.main(args) == 0
    state, metadata = load_checkpoint(vae_file)
    assert metadata["train_sd.step"] == "2" and float(metadata["train_sd.latent_rescale"]) > 0
    vae = tiny_autoencoder(ckpt_path=str(vae_file))  # strict: every key and shape
    photos = FCDiffusionDataset(tiny_files.data, resolution=64)
    images = [photos[i]["jpg"] for i in range(len(photos))]
    assert latent_std(vae, images) * SD_SCALE_FACTOR == pytest.approx(1.0, rel=1e-3)  # the export's own photos
    assert all(np.isfinite(reconstruction_psnr(vae, images)))
    assert (logdir / "autoencoder_tiny_checkpoint" / "image_log" / "step-000002.png").is_file()

    with caplog.at_level(logging.INFO, logger="fcdiffusion.train.training"):  # where the resume is logged
        assert train_sd.main([*args[:-2], "--max_steps", "3"]) == 0
    assert any("resuming from" in r.getMessage() and "last.ckpt" in r.getMessage() for r in caplog.records)
    assert torch.load(logdir / "autoencoder_tiny_checkpoint" / "last.ckpt", weights_only=False)["global_step"] == 3

    unet_args = ["--config", "configs/sd21_tiny.yaml", *common, "--max_steps", "2", "--autoencoder", str(vae_file),
                 "--export", str(base_file), *tiny_files.overrides]
    assert train_sd.main(unet_args) == 0
    base = instantiate_from_config(OmegaConf.to_container(
        load_config("configs/sd21_tiny.yaml", tiny_files.overrides).model, resolve=True))
    load_weights(base, base_file)
    assert torch.equal(base.first_stage_model.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    assert (logdir / "sd21_tiny_checkpoint" / "image_log" / "step-000002.png").is_file()


def test_train_sd_names_a_bad_config(tmp_path, capsys):
    assert train_sd.main(["--config", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml" in capsys.readouterr().err


def resampled(x: torch.Tensor, sharpening: float = 1.0) -> torch.Tensor:
    """The oracle for a resampler start: 4x4 average pooling, a sharpening 3x3 filter, then twice nearest-neighbour
    doubling followed by a [1, 2, 1]^2 / 16 blur (bilinear), written with plain torch ops."""
    tap = torch.tensor([1.0, 2.0, 1.0]) / 4
    blur = torch.outer(tap, tap)
    delta = torch.zeros(3, 3)
    delta[1, 1] = 1.0

    def filtered(h: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(h, kernel.expand(3, 1, 3, 3), padding=1, groups=3)

    h = filtered(torch.nn.functional.avg_pool2d(x, 4), delta + sharpening * (delta - blur))
    for _ in range(2):
        h = filtered(torch.nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"), blur)
    return h


def test_resampler_start_pools_and_upsamples_the_photos():
    from fcdiffusion.train.demo_data import load_photo
    from fcdiffusion.train.resampler_init import init_as_resampler

    vae = init_as_resampler(tiny_autoencoder()).eval()
    x = torch.from_numpy(np.stack([prepare_image(Image.fromarray(load_photo(n)), 128) for n in ("chelsea", "rocket")]))
    x = x.permute(0, 3, 1, 2).float()
    with torch.no_grad():
        posterior = vae.encode(x)
        reconstruction = vae.decode(posterior.mode())
    pooled = torch.nn.functional.avg_pool2d(x, 4)
    # Within the norm's (1 + x^2/C^2)^-1/2 of an exact resampler (C = 8: < 1%).
    assert torch.allclose(posterior.mode()[:, :3], pooled, rtol=0.01, atol=1e-3)
    assert posterior.mode()[:, 3].abs().max() < 1e-6 and torch.allclose(posterior.logvar, torch.full_like(
        posterior.logvar, -10.0))
    expected = resampled(x)
    assert (reconstruction - expected).abs().max() < 0.02 * expected.abs().max()
    assert psnr(reconstruction.clamp(-1, 1), x).min() > 20  # a recognisable picture before any training
    assert any(p.requires_grad for p in vae.parameters())


def test_resampler_start_needs_norm_groups_of_four_channels(tiny_files, capsys):
    from fcdiffusion.train.resampler_init import init_as_resampler

    config = OmegaConf.to_container(load_config(AUTOENCODER_CONFIG).model.params.ddconfig)
    with pytest.raises(ValueError, match="norm_groups"):
        init_as_resampler(tiny_autoencoder(ddconfig={**config, "norm_groups": 32}))
    assert train_sd.main(["--config", AUTOENCODER_CONFIG, "--data", str(tiny_files.data), "train.init=lanczos"]) == 1
    assert "unknown train.init 'lanczos'; valid: resampler" in capsys.readouterr().err
