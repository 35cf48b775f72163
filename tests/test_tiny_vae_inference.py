"""--tiny_vae in test_distillation.py and the demo: the tiny autoencoder encodes and/or decodes in place of the VAE,
the outputs record it, a tiny autoencoder for another VAE is refused, and the demo's preview decodes the sampling
loop's x0 while it samples."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import test_distillation
from fcdiffusion.apps.demo_app import DemoInputError, DemoResult, load_demo, translate_streaming
from fcdiffusion.core.images import to_uint8
from fcdiffusion.core.paths import student_file
from fcdiffusion.core.tiny_vae import load_tiny_vae, random_tiny_vae
from fcdiffusion.core.weights import load_student
from ldm.models.tiny_autoencoder import TinyAutoencoder, TinyAutoencoderConfig, save_diffusers_folder


@pytest.fixture(scope="module")
def tiny_vae_folder(distilled, tmp_path_factory):
    """A random tiny autoencoder for the tiny student's 4x VAE, as a diffusers folder."""
    folder = tmp_path_factory.mktemp("tiny_vae") / "vae"
    save_diffusers_folder(random_tiny_vae(load_student(student_file(distilled))).autoencoder, folder)
    return folder


def test_script_decodes_with_the_tiny_vae_and_records_it(distilled, workdir, tiny_vae_folder, tmp_path, capsys):
    common = ["--input_dir", str(workdir / "photos"), "--student", str(student_file(distilled)), "--mode",
              "low_pass", "--steps", "1", "--resolution", "64"]
    assert test_distillation.main([*common, "--out_dir", str(tmp_path / "full")]) == 0
    assert test_distillation.main([*common, "--out_dir", str(tmp_path / "tiny"), "--tiny_vae", str(tiny_vae_folder),
                                   "--tiny_vae_use", "decode"]) == 0
    assert json.loads((tmp_path / "full" / "settings.json").read_text())["vae"] == "full"
    settings = json.loads((tmp_path / "tiny" / "settings.json").read_text())
    assert settings["vae"] == {"tiny_vae": str(tiny_vae_folder), "tiny_vae_use": "decode"}
    # The same latents (the full encoder's), another decoder: the pictures differ.
    full, tiny = (np.asarray(Image.open(tmp_path / w / "coffee_low_pass.png")) for w in ("full", "tiny"))
    assert full.shape == tiny.shape == (64, 64, 3) and not np.array_equal(full, tiny)

    eight_x = tmp_path / "taesd"
    save_diffusers_folder(TinyAutoencoder(TinyAutoencoderConfig.for_stages(3, 8)), eight_x)
    assert test_distillation.main([*common, "--out_dir", str(tmp_path / "x"), "--tiny_vae", str(eight_x)]) == 1
    assert "downsamples 8x to 4 latent channels, the model's VAE 4x" in capsys.readouterr().err
    assert test_distillation.main([*common, "--out_dir", str(tmp_path / "x"), "--tiny_vae", str(tmp_path)]) == 1
    assert "neither a diffusers AutoencoderTiny folder" in capsys.readouterr().err


def test_demo_translates_with_the_tiny_vae_and_previews(distilled, tiny_vae_folder, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((80, 96, 3)) * 255).astype(np.uint8)).save(photo)
    tiny = load_tiny_vae(tiny_vae_folder)
    demo = load_demo(student_file(distilled), {}, torch.device("cpu"), resolution=64, tiny_vae=tiny)
    result = demo.translate(photo, "a photo", ["low_pass"], steps=1)
    assert "tiny VAE (both)" in result.summary

    frames = []
    preview = demo.preview(lambda step, images: frames.append((step, images)), every=2)
    x0 = [torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    for index, latents in enumerate(x0):  # what the sampler loop does, once per step
        preview(index, len(x0), latents)
    assert [step for step, _ in frames] == [2, 4, 5]  # every 2nd step and the last
    for (step, images), latents in zip(frames, (x0[1], x0[3], x0[4])):
        assert images.dtype == np.uint8 and images.shape == (1, 64, 64, 3)
        assert np.array_equal(images, to_uint8(tiny.decode(latents)))
    with pytest.raises(DemoInputError, match="--tiny_vae"):
        load_demo(student_file(distilled), {}, torch.device("cpu")).preview(lambda *args: None)
    with pytest.raises(ValueError, match="at least 1"):
        demo.preview(lambda *args: None, every=0)


def test_the_sampling_loop_feeds_the_demo_preview_step_by_step(distilled, tiny_vae_folder, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)).save(photo)
    demo = load_demo(student_file(distilled), {}, torch.device("cpu"), resolution=64,
                     tiny_vae=load_tiny_vae(tiny_vae_folder))
    frames = []
    result = demo.translate(photo, "a photo", ["low_pass", "high_pass"], steps=3,
                            preview=lambda mode, step, images: frames.append((mode, step, images)), preview_every=1)
    assert [(mode, step) for mode, step, _ in frames] == [(m, k) for m in ("low_pass", "high_pass") for k in (1, 2, 3)]
    # the student's last step lands on alpha = 1, where the predicted x0 is the result: the last preview is it
    final = {p.caption.split(":")[0]: p.image for p in result.panels if "result" in p.caption}
    for mode in ("low_pass", "high_pass"):
        last = [images for m, _, images in frames if m == mode][-1][0]
        assert np.abs(last.astype(int) - final[mode].astype(int)).max() <= 1
    assert not np.array_equal(frames[0][2], frames[2][2])  # step 1's guess is not the result

    streamed = list(translate_streaming(demo, photo, "a photo", ["low_pass"], "student", 3, None, 0))
    assert [item[1] for item in streamed[:-1]] == [3] and isinstance(streamed[-1], DemoResult)
    with pytest.raises(DemoInputError, match="prompt is empty"):
        list(translate_streaming(demo, photo, " ", ["low_pass"], "student", 3, None, 0))
