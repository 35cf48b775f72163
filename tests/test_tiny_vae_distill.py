"""distill_tiny_vae.py: a tiny autoencoder distilled from an AutoencoderKL trains a few steps, validates, resumes, and
exports a folder that diffusers' AutoencoderTiny loads and matches; the recipe's targets and guards."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from omegaconf import OmegaConf
from PIL import Image

import distill_tiny_vae
from fcdiffusion.train.demo_data import load_photo
from fcdiffusion.train.loss_curves import read_losses
from fcdiffusion.train.resampler_init import init_as_resampler
from fcdiffusion.train.tiny_vae_distill import TinyVAEDistiller, linear_start, load_vae, student_config
from ldm.checkpoint import CheckpointMismatchError, load_checkpoint, save_state_dict
from ldm.models.tiny_autoencoder import TinyAutoencoder, TinyAutoencoderConfig, load_tiny_autoencoder
from ldm.modules.losses import psnr
from ldm.util import instantiate_from_config, load_config
from tests.helpers import DEMO_PHOTOS, ROOT, write_photos

TINY_VAE_CONFIG = ROOT / "configs" / "tiny_vae_distill_tiny.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny AutoencoderKL (the quickstart's architecture) saved as train_sd.py exports it, and photos."""
    root = tmp_path_factory.mktemp("tiny_vae")
    config = OmegaConf.to_container(load_config(ROOT / "configs" / "autoencoder_tiny.yaml").model, resolve=True)
    torch.manual_seed(0)
    vae = instantiate_from_config(config)
    save_state_dict(vae.state_dict(), root / "autoencoder.safetensors")
    write_photos(root / "photos", root / "data.json")
    return root


def args(root, logdir, steps, *extra):
    return ["--config", str(TINY_VAE_CONFIG), "--vae", str(root / "autoencoder.safetensors"), "--data",
            str(root / "data.json"), "--logdir", str(logdir), "--max_steps", str(steps), "--resolution", "64",
            "--batch_size", "2", "--width", "8", "--checkpoint_every", "1", "--log_images_every", "0",
            "train.log_every=1", *extra]


def test_trains_validates_resumes_and_exports_for_diffusers(setup, tmp_path):
    logdir, export = tmp_path / "logs", tmp_path / "tiny_vae"
    folder = logdir / "tiny_vae_distill_tiny_checkpoint"
    assert distill_tiny_vae.main(args(setup, logdir, 2, "--val_data", str(setup / "data.json"), "--val_every", "2",
                                      "--export", str(export))) == 0
    state, metadata = load_checkpoint(folder / "last.ckpt")
    assert state and all(k.startswith("student.") for k in state)  # the big VAE stays out of checkpoints
    assert json.loads(metadata["fcdiffusion.tiny_vae"])["scale_factor"] == pytest.approx(0.18215)
    validated = read_losses(logdir / "tiny_vae_distill_tiny", "val/psnr_photo")
    assert len(validated) == 1 and 0 < next(iter(validated.values())) < 60  # one validation, at step 2
    first = load_tiny_autoencoder(export)
    assert first.config == TinyAutoencoderConfig.for_stages(2, 8)

    # The same command with more steps resumes at step 2 (its optimizer state too) and exports again.
    assert distill_tiny_vae.main(args(setup, logdir, 3, "--export", str(export))) == 0
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 3
    ours = load_tiny_autoencoder(export)
    assert any(not torch.equal(v, first.state_dict()[k]) for k, v in ours.state_dict().items())

    reference = AutoencoderTiny.from_pretrained(export).eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = reference.encode(images).latents * reference.config.scaling_factor
        torch.testing.assert_close(ours.encode(images), latents, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.decode(latents), reference.decode(latents).sample, atol=1e-5, rtol=0)


def test_resume_refuses_another_architecture(setup, tmp_path):
    logdir = tmp_path / "logs"
    assert distill_tiny_vae.main(args(setup, logdir, 1)) == 0
    with pytest.raises(RuntimeError, match="size mismatch"):
        distill_tiny_vae.main([*args(setup, logdir, 2), "--width", "4"])


def test_lpips_term_on_with_weights_and_off_without(setup, tmp_path, alexnet_file, caplog):
    logdir = tmp_path / "with"
    assert distill_tiny_vae.main([*args(setup, logdir, 1), "--lpips_weight", "0.5", "--lpips_weights",
                                  str(alexnet_file), "loss.lpips_net=alex"]) == 0
    assert read_losses(logdir / "tiny_vae_distill_tiny", "train/lpips")
    with caplog.at_level("WARNING"):
        assert distill_tiny_vae.main([*args(setup, tmp_path / "without", 1), "--lpips_weight", "0.5",
                                      "--lpips_weights", str(tmp_path / "missing.pth")]) == 0
    assert "the LPIPS term is off: no backbone weights" in caplog.text
    assert not read_losses(tmp_path / "without" / "tiny_vae_distill_tiny", "train/lpips")


def test_targets_are_the_diffusion_latents_and_the_full_decoding(tiny_files):
    """From an SD config and checkpoint, the encoder's target is exactly what the diffusion model trains on
    (`get_first_stage_encoding` of the posterior mean) and the decoder's is `decode_first_stage` of it."""
    from tests.helpers import tiny_model

    vae, scale = load_vae(ROOT / "configs" / "sd21_tiny.yaml", tiny_files.sd)
    model = tiny_model(tiny_files).eval()
    assert scale == model.scale_factor
    distiller = TinyVAEDistiller(vae, TinyAutoencoder(student_config(vae, 8)), scale)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents, decoded = distiller.targets(images)
    expected = model.get_first_stage_encoding(model.encode_first_stage(images), sample=False)
    torch.testing.assert_close(latents, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(decoded, model.decode_first_stage(expected), atol=1e-5, rtol=0)
    terms, _, _ = distiller.losses(images)
    assert set(terms) == {"latent", "teacher", "photo"} and all(v > 0 for v in terms.values())


def test_guards(tiny_files, tmp_path):
    vae, _ = load_vae(ROOT / "configs" / "sd21_tiny.yaml", tiny_files.sd)
    with pytest.raises(ValueError, match="does not fit the VAE"):
        TinyVAEDistiller(vae, TinyAutoencoder(TinyAutoencoderConfig.for_stages(3, 8)))
    with pytest.raises(ValueError, match="unknown pixel_loss"):
        TinyVAEDistiller(vae, TinyAutoencoder(student_config(vae, 8)), pixel_loss="l3")
    with pytest.raises(ValueError, match="needs the LPIPS network"):
        TinyVAEDistiller(vae, TinyAutoencoder(student_config(vae, 8)), lpips_weight=1.0)
    wrong = tmp_path / "wrong.safetensors"
    save_state_dict({"encoder.conv_in.weight": torch.zeros(1)}, wrong)
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        load_vae(ROOT / "configs" / "autoencoder_tiny.yaml", wrong)
    (tmp_path / "identity.yaml").write_text("model:\n  target: torch.nn.Identity\n")
    with pytest.raises(ValueError, match="describes a Identity, not an AutoencoderKL"):
        load_vae(tmp_path / "identity.yaml", wrong)


def test_linear_start_is_close_to_a_resampler_vae():
    """Against the quickstart's VAE started as a resampler (average pooling + bilinear upsampling), the linear start
    is nearly exact: its latents and decodings match the big VAE's far better than a random start's."""
    config = OmegaConf.to_container(load_config(ROOT / "configs" / "autoencoder_tiny.yaml").model, resolve=True)
    vae = init_as_resampler(instantiate_from_config(config)).eval()
    photos = [Image.fromarray(load_photo(n)).resize((64, 64)) for n in DEMO_PHOTOS]
    images = torch.stack([torch.from_numpy(np.asarray(p)).permute(2, 0, 1) for p in photos]).float() / 127.5 - 1
    distiller = TinyVAEDistiller(vae, TinyAutoencoder(student_config(vae, 8)))
    latents, decoded = distiller.targets(images)
    random_error = (distiller.student.encode(images) - latents).pow(2).mean()
    linear_start(distiller.student, images, latents, decoded)
    with torch.no_grad():
        assert (distiller.student.encode(images) - latents).pow(2).mean() < 0.01 * random_error
        assert psnr(distiller.student.decode(latents), decoded).mean() > 30
    with pytest.raises(ValueError, match="needs width >= 8"):
        linear_start(TinyAutoencoder(TinyAutoencoderConfig.for_stages(2, 6)), images, latents, decoded)
