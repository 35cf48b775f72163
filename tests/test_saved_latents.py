"""Saved translation latents are read back only for the settings that made them."""
import os

import pytest
import torch

from fcdiffusion.core.saved_latents import latents_path, load_latents, save_latents, translation_settings


def test_saved_latents_come_back_only_for_their_own_settings(tmp_path):
    model = tmp_path / "teacher.ckpt"
    model.write_bytes(b"weights")
    settings = translation_settings(model, "a photo", 128, 1003, 1000, 50)
    latents = torch.randn(4, 32, 32)
    path = latents_path(tmp_path, "astronaut", "low_pass")
    assert path.name == "astronaut_low_pass_latents.safetensors"
    save_latents(path, latents, settings)
    assert torch.equal(load_latents(path, translation_settings(model, "a photo", 128, 1003, 1000, 50)), latents)
    with pytest.raises(ValueError, match=r"guidance_scale: saved None, wanted 7.5; steps: saved 50, wanted 4"):
        load_latents(path, translation_settings(model, "a photo", 128, 1003, 1000, 4, guidance_scale=7.5))
    with pytest.raises(ValueError, match="prompt: saved 'a photo', wanted 'a cat'"):
        load_latents(path, translation_settings(model, "a cat", 128, 1003, 1000, 50))
    os.utime(model, ns=(0, 0))  # the same path retrained in place is another model
    with pytest.raises(ValueError, match="model: saved"):
        load_latents(path, translation_settings(model, "a photo", 128, 1003, 1000, 50))
