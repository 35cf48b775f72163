"""The FCDiffusion teacher model and the tool that builds its initial checkpoint."""
import pytest
import torch
from omegaconf import OmegaConf

import tool_add_control_sd21
from fcdiffusion.core.frequency import CONTROL_MODES, frequency_control
from fcdiffusion.core.weights import UntrainedTeacherError, check_trained_teacher, load_teacher
from ldm.checkpoint import load_state_dict
from ldm.util import instantiate_from_config, load_config, without_text_encoder_file
from tests.helpers import TINY_CONFIG, tiny_model

BATCH = {"jpg": torch.rand(2, 128, 128, 3) * 2 - 1, "txt": ["a cat on a sofa", "a rocket at dawn"]}


def test_unknown_control_mode_lists_the_valid_ones(tiny_files):
    with pytest.raises(ValueError) as info:
        tiny_model(tiny_files, "model.params.control_mode=band_pass")
    assert all(mode in str(info.value) for mode in CONTROL_MODES)


def test_get_input_gives_latent_text_and_filtered_control(tiny_files):
    model = tiny_model(tiny_files, "model.params.control_mode=low_pass")
    z, cond = model.get_input(BATCH, sample_posterior=False)
    assert z.shape == (2, 4, 32, 32) and set(cond) == {"c_crossattn", "c_concat"}
    assert cond["c_crossattn"][0].shape == (2, 77, 16)
    expected = frequency_control(z, "low_pass", **model.frequency_thresholds)
    torch.testing.assert_close(cond["c_concat"][0], expected)


def test_guidance_negative_branch_keeps_control_and_uses_empty_prompt(tiny_files):
    model = tiny_model(tiny_files)
    _, cond = model.get_input(BATCH, sample_posterior=False)
    uncond = model.unconditional_conditioning(cond)
    assert uncond["c_concat"][0] is cond["c_concat"][0]
    empty = model.get_learned_conditioning([""])
    torch.testing.assert_close(uncond["c_crossattn"][0], empty.expand(2, -1, -1))


def test_optimizer_trains_control_net_and_decoder_only_when_unlocked(tiny_files):
    locked = tiny_model(tiny_files)
    ids = lambda params: {id(p) for p in params}
    assert ids(locked.trainable_parameters()) == ids(locked.control_model.parameters())
    unlocked = tiny_model(tiny_files, "model.params.sd_locked=false")
    unet = unlocked.model.diffusion_model
    expected = (ids(unlocked.control_model.parameters()) | ids(unet.output_blocks.parameters())
                | ids(unet.out.parameters()))
    assert ids(unlocked.trainable_parameters()) == expected
    assert not any(p.requires_grad for p in unet.input_blocks.parameters())


def test_teacher_conditions_and_samples_its_own_mode_only(tiny_files):
    model = tiny_model(tiny_files, "model.params.control_mode=high_pass").eval()
    z, context = torch.randn(1, 4, 16, 16), model.get_learned_conditioning(["a cat"])
    assert model.modes == ("high_pass",)
    assert set(model.condition(z, context, "high_pass")) == {"c_crossattn", "c_concat"}
    with pytest.raises(ValueError, match="trained for control mode 'high_pass', not 'low_pass'"):
        model.condition(z, context, "low_pass")
    metadata = model.weights_metadata()
    assert metadata["fcdiffusion.kind"] == "teacher" and metadata["fcdiffusion.modes"] == '["high_pass"]'


def test_log_images_gives_the_four_grids(tiny_files):
    model = tiny_model(tiny_files).eval()
    model.ddim_steps = 3
    images = model.log_images(BATCH, N=2)
    assert list(images) == ["source", "reconstruction", "control", "samples"]
    assert all(v.shape == (2, 3, 128, 128) and torch.isfinite(v).all() for v in images.values())


def test_tool_add_control_copies_exactly_the_matching_tensors(tiny_files):
    sd = load_state_dict(tiny_files.sd)
    out = load_state_dict(tiny_files.init)
    fresh = tiny_model(tiny_files, ckpt=tiny_files.init).state_dict()
    assert set(out) == set(fresh)
    copied = new = 0
    for key, value in out.items():
        if not key.startswith("control_model."):
            assert torch.equal(value, sd[key]), key
            continue
        twin = "model.diffusion_model." + key[len("control_model."):]
        if twin in sd:
            assert torch.equal(value, sd[twin]), key
            copied += 1
        else:
            new += 1
    assert copied > 0 and new > 0
    for name in ("hint_add", "hint_mul", "zero_convs_add", "zero_convs_mul", "middle_block_out_add"):
        assert all(not v.any() for k, v in out.items() if k.startswith(f"control_model.{name}")), name


def test_tool_add_control_refuses_overwrite_missing_and_non_sd_files(tiny_files, tmp_path, capsys):
    args = ["--config", TINY_CONFIG]
    assert tool_add_control_sd21.main([str(tiny_files.sd), str(tiny_files.init), *args]) == 1
    assert "--force" in capsys.readouterr().err
    missing = tmp_path / "v2-1_512-ema-pruned.ckpt"
    assert tool_add_control_sd21.main([str(missing), str(tmp_path / "o.ckpt"), *args]) == 1
    err = capsys.readouterr().err
    assert "v2-1_512-ema-pruned.ckpt" in err and "huggingface.co/stabilityai" in err
    not_sd = tmp_path / "clip_only.ckpt"
    torch.save({"state_dict": load_state_dict(tiny_files.clip)}, not_sd)
    assert tool_add_control_sd21.main([str(not_sd), str(tmp_path / "o.ckpt"), *args]) == 1
    assert "not a Stable Diffusion 2.x checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o.ckpt").exists()


def test_tool_add_control_is_seeded_and_a_seed_changes_the_new_layers_only(tiny_files, tmp_path, capsys):
    args = [str(tiny_files.sd), "--config", TINY_CONFIG]
    rng = torch.random.get_rng_state()
    assert tool_add_control_sd21.main([args[0], str(tmp_path / "seed0.ckpt"), *args[1:], "--seed", "0"]) == 0
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's random state is left alone
    assert tool_add_control_sd21.main([args[0], str(tmp_path / "seed1.ckpt"), *args[1:], "--seed", "1"]) == 0
    new_layers = capsys.readouterr().out.split("new control-net layers")[1]
    # tiny_files.init was written by an earlier run with the default seed: the same bytes.
    assert (tmp_path / "seed0.ckpt").read_bytes() == tiny_files.init.read_bytes()
    seed0, seed1 = load_state_dict(tmp_path / "seed0.ckpt"), load_state_dict(tmp_path / "seed1.ckpt")
    assert set(seed0) == set(seed1)
    differ = sorted(k for k in seed0 if not torch.equal(seed0[k], seed1[k]))
    assert differ == ["control_model.input_hint_block.0.bias", "control_model.input_hint_block.0.weight"]
    assert "control_model.input_hint_block.* (2)" in new_layers


def test_untrained_init_checkpoint_is_refused_as_a_teacher(tiny_files, model_config):
    for mode, config in [(None, None), ("mid_pass", model_config)]:
        with pytest.raises(UntrainedTeacherError) as info:
            load_teacher(tiny_files.init, mode, config)
        message = str(info.value)
        assert str(tiny_files.init) in message and "untrained init checkpoint (tool_add_control_sd21.py" in message
        assert "fcdiffusion_train.py" in message
    state = load_state_dict(tiny_files.init)
    with pytest.raises(UntrainedTeacherError):
        check_trained_teacher(state, "init")
    key = "control_model.middle_block_out_mul.0.bias"
    check_trained_teacher({**state, key: state[key] + 1e-3}, "a control net that trained")


def test_frequency_bands_are_checked_at_the_models_latent_size(tiny_files):
    # 32x32 latents: i + j <= 62, so a high_pass band from 63 (or a mid band from 63) keeps nothing.
    for override, mode, band in [("high_threshold=63", "high_pass", "i + j >= 63"),
                                 ("mid_low=63", "mid_pass", "63 <= i + j <= 70")]:
        overrides = [f"model.params.frequency_thresholds.{override}", "model.params.frequency_thresholds.mid_high=70"]
        with pytest.raises(ValueError) as info:
            tiny_model(tiny_files, "model.params.control_mode=low_pass", *overrides)  # every mode is checked
        assert f"control mode '{mode}' keeps the DCT band {band}, which is empty on a 32x32 latent" in str(info.value)
    model = tiny_model(tiny_files, "model.params.frequency_thresholds.high_threshold=62",
                       "model.params.control_mode=high_pass")  # the last anti-diagonal is a band still
    assert model.condition(torch.randn(1, 4, 32, 32), torch.zeros(1, 77, 16), "high_pass")["c_concat"][0].any()
    with torch.device("meta"):  # the SD config: 64x64 latents, the paper's thresholds
        sd = instantiate_from_config(without_text_encoder_file(
            OmegaConf.to_container(load_config("configs/model_config.yaml").model, resolve=True)))
    assert sd.image_size == 64 and sd.frequency_thresholds["high_threshold"] == 50
