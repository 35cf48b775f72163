"""The tiny autoencoder (TAESD) against diffusers' AutoencoderTiny on random weights, both weight formats, the latent
scaling, and its use in place of a model's VAE by the Translator."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderTiny
from safetensors.torch import save_file

from fcdiffusion.core.inference import Translator
from fcdiffusion.core.tiny_vae import TinyVAE, load_tiny_vae, random_tiny_vae, vae_downsampling
from ldm.checkpoint import CheckpointMismatchError
from ldm.models.tiny_autoencoder import (
    TinyAutoencoder,
    TinyAutoencoderConfig,
    load_tiny_autoencoder,
    save_diffusers_folder,
)

ATOL = 1e-5


def oracle(stages: int = 3, width: int = 64, **config) -> AutoencoderTiny:
    """diffusers' AutoencoderTiny with random weights (every parameter redrawn, biases too)."""
    torch.manual_seed(0)
    model = AutoencoderTiny(encoder_block_out_channels=[width] * (stages + 1),
                            decoder_block_out_channels=[width] * (stages + 1),
                            num_encoder_blocks=[1, *[3] * stages], num_decoder_blocks=[*[3] * stages, 1], **config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * (1.5 / p[0].numel() ** 0.5))
    return model.eval()


def taesd_pair(model: AutoencoderTiny, folder, suffix: str = ".pth", stem: str = "taesd"):
    """`model`'s weights as TAESD's two files, renamed as diffusers' conversion script reads them (decoder index + 1:
    TAESD's decoder starts with a parameter-free clamp)."""
    state = model.state_dict()
    encoder = {k.removeprefix("encoder.layers."): v for k, v in state.items() if k.startswith("encoder.")}
    decoder = {}
    for key, value in state.items():
        if key.startswith("decoder."):
            index, _, rest = key.removeprefix("decoder.layers.").partition(".")
            decoder[f"{int(index) + 1}.{rest}"] = value
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / f"{stem}_encoder{suffix}", folder / f"{stem}_decoder{suffix}"
    for path, sd in zip(paths, (encoder, decoder)):
        save_file(sd, path) if suffix == ".safetensors" else torch.save(sd, path)
    return paths


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("stages,width", [(3, 64), (2, 16)])
def test_diffusers_folder_matches_autoencoder_tiny(tmp_path, images, stages, width):
    reference = oracle(stages, width)
    reference.save_pretrained(tmp_path / "vae")
    ours = load_tiny_autoencoder(tmp_path / "vae")
    assert ours.config == TinyAutoencoderConfig.for_stages(stages, width) and ours.downsampling_factor == 2**stages
    with torch.no_grad():
        latents = reference.encode(images).latents
        assert latents.shape == (2, 4, 64 // 2**stages, 48 // 2**stages)
        torch.testing.assert_close(ours.encode(images), latents, atol=ATOL, rtol=0)
        z = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2)) * 2
        torch.testing.assert_close(ours.decode(z), reference.decode(z).sample, atol=ATOL, rtol=0)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_taesd_pair_matches_autoencoder_tiny(tmp_path, images, suffix):
    reference = oracle()
    encoder_path, decoder_path = taesd_pair(reference, tmp_path / "taesd", suffix)
    for path in (tmp_path / "taesd", encoder_path, decoder_path):  # the folder, or either file of the pair
        ours = load_tiny_autoencoder(path)
        with torch.no_grad():
            torch.testing.assert_close(ours.encode(images), reference.encode(images).latents, atol=ATOL, rtol=0)
            z = reference.encode(images).latents
            torch.testing.assert_close(ours.decode(z), reference.decode(z).sample, atol=ATOL, rtol=0)
    assert ours.config == TinyAutoencoderConfig()  # read off the keys: TAESD's 3 stages, width 64


def test_taesd_pair_architecture_follows_the_keys(tmp_path):
    """A 2-stage pair (the quickstart's 4x VAE) with 16 latent channels is recognised from its keys alone."""
    reference = oracle(2, 8, latent_channels=16)
    ours = load_tiny_autoencoder(taesd_pair(reference, tmp_path, stem="taetiny")[0])
    assert ours.config == TinyAutoencoderConfig.for_stages(2, 8, latent_channels=16)


def test_latent_scaling_follows_the_diffusers_config(tmp_path, images):
    """diffusers' pipelines use (raw - shift_factor) * scaling_factor as the diffusion latents and decode
    latents / scaling_factor + shift_factor: so do we, and TAESD's own scaling (1, 0) leaves its raw latents (SD's
    scaled latents) as they are."""
    reference = oracle(2, 16, scaling_factor=0.5, shift_factor=0.25)
    reference.save_pretrained(tmp_path / "vae")
    ours = load_tiny_autoencoder(tmp_path / "vae")
    assert (ours.config.scaling_factor, ours.config.shift_factor) == (0.5, 0.25)
    with torch.no_grad():
        raw = reference.encode(images).latents
        torch.testing.assert_close(ours.encode(images), (raw - 0.25) * 0.5, atol=ATOL, rtol=0)
        z = torch.randn(raw.shape, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(ours.decode(z), reference.decode(z / 0.5 + 0.25).sample, atol=ATOL, rtol=0)
        plain = TinyAutoencoder(TinyAutoencoderConfig.for_stages(2, 16))
        plain.load_state_dict(ours.state_dict())
        torch.testing.assert_close(plain.encode(images), raw, atol=ATOL, rtol=0)


def test_save_diffusers_folder_round_trips_through_diffusers(tmp_path, images):
    torch.manual_seed(4)
    ours = TinyAutoencoder(TinyAutoencoderConfig(4, 16, (1, 2, 3), (3, 2, 1), scaling_factor=2.0)).eval()
    save_diffusers_folder(ours, tmp_path / "vae", {"fcdiffusion.kind": "tiny_vae"})
    reference = AutoencoderTiny.from_pretrained(tmp_path / "vae").eval()
    assert reference.config.scaling_factor == 2.0 and list(reference.config.num_encoder_blocks) == [1, 2, 3]
    with torch.no_grad():
        torch.testing.assert_close(ours.encoder(images), reference.encode(images).latents, atol=ATOL, rtol=0)
    again = load_tiny_autoencoder(tmp_path / "vae")
    assert again.config == ours.config
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())


def test_loading_is_strict_and_says_what_is_wrong(tmp_path):
    encoder_path, decoder_path = taesd_pair(oracle(2, 16), tmp_path / "pair")
    decoder = torch.load(decoder_path)
    decoder["99.weight"] = torch.zeros(1)
    torch.save(decoder, decoder_path)
    with pytest.raises(CheckpointMismatchError, match=r"taesd_decoder\.pth does not match(.|\n)*unexpected(.|\n)*99\."):
        load_tiny_autoencoder(encoder_path)
    oracle(2, 16).save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "num_decoder_blocks": [3, 3, 2]}))
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        load_tiny_autoencoder(tmp_path / "vae")
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "act_fn": "silu"}))
    with pytest.raises(ValueError, match="act_fn='silu'"):
        load_tiny_autoencoder(tmp_path / "vae")
    with pytest.raises(FileNotFoundError, match=r"not found: .*nowhere(.|\n)*taesd_encoder\.pth(.|\n)*models/taesd"):
        load_tiny_autoencoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a diffusers AutoencoderTiny folder"):
        load_tiny_autoencoder(tmp_path / "empty")


def test_translator_encodes_and_decodes_with_the_tiny_vae(tiny_files, tmp_path):
    """In place of the model's VAE, the tiny one's latents go into sampling and its decoder makes the pictures: `use`
    picks which; a tiny autoencoder of another downsampling is refused."""
    from tests.helpers import tiny_model

    model = tiny_model(tiny_files).eval()
    assert vae_downsampling(model) == 4
    tiny = random_tiny_vae(model)
    assert tiny.autoencoder.config.stages == 2
    save_diffusers_folder(tiny.autoencoder, tmp_path / "vae")
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    full = Translator(model)
    z_full = full.encode_images(images)
    for use in ("both", "encode", "decode"):
        translator = Translator(model, load_tiny_vae(tmp_path / "vae", use))
        z = translator.encode_images(images)
        expected_z = tiny.autoencoder.encode(images) if use != "decode" else z_full
        torch.testing.assert_close(z, expected_z, atol=ATOL, rtol=0)
        expected_x = tiny.autoencoder.decode(z) if use != "encode" else model.decode_first_stage(z)
        torch.testing.assert_close(translator.decode(z), expected_x, atol=ATOL, rtol=0)
    result = Translator(model, tiny)(images, ["a photo"], steps=2)[model.control_mode]
    torch.testing.assert_close(result.image, tiny.decode(result.latents), atol=ATOL, rtol=0)
    eight_x = TinyVAE(TinyAutoencoder(TinyAutoencoderConfig.for_stages(3, 8)), source="taesd")
    with pytest.raises(ValueError, match="downsamples 8x to 4 latent channels, the model's VAE 4x"):
        Translator(model, eight_x)
    with pytest.raises(ValueError, match="unknown tiny VAE use"):
        TinyVAE(tiny.autoencoder, "sometimes")
