"""FreqControlNet and ControlledUnetModel: no-op at init, SD-compatible encoder, modulation and gradient flow."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from fcdiffusion.core.control_net import FreqControlNet
from fcdiffusion.core.controlled_unet import ControlledUnetModel
from ldm.checkpoint import load_weights
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.util import instantiate_from_config
from tests.reference import sd21_unet_params, unet_params

PREFIX = "model.diffusion_model."
ENCODER_PREFIXES = ("time_embed.", "input_blocks.", "middle_block.")
CONTROL_ONLY_PREFIXES = ("input_hint_block.", "hint_", "zero_convs_", "middle_block_out_")


@pytest.fixture(scope="module")
def unet_config() -> dict:
    return unet_params()


@pytest.fixture(scope="module")
def control_config(unet_config) -> dict:
    return {k: v for k, v in unet_config.items() if k != "out_channels"}


@pytest.fixture(scope="module")
def unet_state(reference) -> dict[str, torch.Tensor]:
    return {k[len(PREFIX) :]: v for k, v in reference.items() if k.startswith(PREFIX)}


@pytest.fixture()
def inputs(reference) -> tuple[torch.Tensor, ...]:
    x, t, context = reference["unet_in.x"], reference["unet_in.t"], reference["unet_in.context"]
    hint = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    return x, hint, t, context


def make_control_net(config: dict, unet_state: dict, randomise_outputs: bool = False) -> FreqControlNet:
    """Control net with its encoder copied from the UNet; optionally non-zero hint and output convs."""
    control_net = FreqControlNet(**config)
    missing = load_weights(control_net, unet_state, strict=False)
    assert missing and all(k.startswith(CONTROL_ONLY_PREFIXES) for k in missing)
    if randomise_outputs:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in control_net.named_parameters():
                if name.startswith(CONTROL_ONLY_PREFIXES):
                    p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return control_net


def test_no_control_and_zero_control_equal_plain_unet_exactly(unet_config, control_config, unet_state, inputs):
    x, hint, t, context = inputs
    plain = UNetModel(**unet_config).eval()
    controlled = ControlledUnetModel(**unet_config).eval()
    plain.load_state_dict(unet_state)
    controlled.load_state_dict(unet_state)
    control = make_control_net(control_config, unet_state)(x, hint, t, context)
    assert all(not a.any() and not m.any() for a, m in control)
    expected = plain(x, t, context)
    assert torch.equal(controlled(x, t, context), expected)
    assert torch.equal(controlled(x, t, context, control=control), expected)


def test_pairs_match_encoder_features(unet_config, control_config, unet_state, inputs):
    x, hint, t, context = inputs
    unet = UNetModel(**unet_config)
    unet.load_state_dict(unet_state)
    with torch.no_grad():
        middle, features = unet.encode(x, unet.embed_time(t), context)
        pairs = make_control_net(control_config, unet_state)(x, hint, t, context)
    assert len(pairs) == len(unet.input_blocks) + 1
    for (add, mul), feature in zip(pairs, features + [middle]):
        assert add.shape == mul.shape == feature.shape


def test_encoder_keys_and_shapes_are_the_unets(unet_config, control_config):
    unet_state = UNetModel(**unet_config).state_dict()
    control_state = FreqControlNet(**control_config).state_dict()
    encoder = {k: v.shape for k, v in control_state.items() if k.startswith(ENCODER_PREFIXES)}
    assert encoder == {k: v.shape for k, v in unet_state.items() if k.startswith(ENCODER_PREFIXES)}
    assert set(control_state) - set(encoder) == {k for k in control_state if k.startswith(CONTROL_ONLY_PREFIXES)}


def test_control_modulates_middle_and_skips_in_reverse_order(unet_config, control_config, unet_state, inputs):
    """Reference: a plain UNet whose middle output and each decoder block's skip half are modulated by hooks."""
    x, hint, t, context = inputs
    controlled = ControlledUnetModel(**unet_config).eval()
    controlled.load_state_dict(unet_state)
    with torch.no_grad():
        control = make_control_net(control_config, unet_state, randomise_outputs=True)(x, hint, t, context)
    control_copy = list(control)

    plain = UNetModel(**unet_config).eval()
    plain.load_state_dict(unet_state)
    add, mul = control[-1]
    plain.middle_block.register_forward_hook(lambda _m, _i, out: (1 + mul) * out + add)
    for j, block in enumerate(plain.output_blocks):
        skip_add, skip_mul = control[len(plain.output_blocks) - 1 - j]

        def modulate_skip(_module, args, a=skip_add, m=skip_mul):
            h, *rest = args
            c = a.shape[1]
            return (torch.cat([h[:, :-c], (1 + m) * h[:, -c:] + a], dim=1), *rest)

        block.register_forward_pre_hook(modulate_skip)
    with torch.no_grad():
        out = controlled(x, t, context, control=control)
        torch.testing.assert_close(out, plain(x, t, context), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(out, controlled(x, t, context), atol=1e-3)
    assert len(control) == len(control_copy) and all(p is q for p, q in zip(control, control_copy))
    with pytest.raises(ValueError, match="control pairs"):
        controlled(x, t, context, control=control[:-1])


def test_gradients_reach_control_net_and_decoder_but_not_frozen_encoder(
    unet_config, control_config, unet_state, inputs
):
    x, hint, t, context = inputs
    control_net = make_control_net(control_config, unet_state, randomise_outputs=True)
    controlled = ControlledUnetModel(**unet_config)
    controlled.load_state_dict(unet_state)
    control = [(0.5 * a, 0.5 * m) for a, m in control_net(x, hint, t, context)]
    controlled(x, t, context, control=control).square().mean().backward()

    assert all(p.grad is not None for p in control_net.parameters())
    assert control_net.hint_add.weight.grad.abs().sum() > 0
    assert control_net.input_blocks[1][0].in_layers[2].weight.grad.abs().sum() > 0
    for name, p in controlled.named_parameters():
        if name.startswith(ENCODER_PREFIXES):
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
    assert controlled.output_blocks[0][0].in_layers[2].weight.grad.abs().sum() > 0


def test_class_label_enters_through_label_emb_as_in_sd(control_config, unet_state, inputs):
    """SD's class conditioning: `num_classes` adds `label_emb`, whose row for label y joins the time embedding."""
    x, hint, t, context = inputs
    plain = make_control_net(control_config, unet_state, randomise_outputs=True)
    labelled = FreqControlNet(**control_config, num_classes=4)
    labelled.load_state_dict({**plain.state_dict(), "label_emb.weight": torch.ones(4, 4 * plain.model_channels)})
    labels = torch.tensor([2] * x.shape[0])
    with torch.no_grad():
        base = plain(x, hint, t, context)
        labelled.label_emb.weight.zero_()
        zero = labelled(x, hint, t, context, y=labels)
        labelled.label_emb.weight.normal_(generator=torch.Generator().manual_seed(2))
        shifted = labelled(x, hint, t, context, y=labels)
        other = labelled(x, hint, t, context, y=labels - 1)
        manual = labelled.time_embed(timestep_embedding(t, labelled.model_channels)) + labelled.label_emb.weight[2]
        torch.testing.assert_close(labelled.embed_time(t, labels), manual)
    assert all(torch.equal(a, b) for pa, pb in zip(base, zero) for a, b in zip(pa, pb))
    assert torch.equal(base[0][0], shifted[0][0])  # the first block is a plain conv: no time embedding yet
    assert not torch.allclose(base[-1][0], shifted[-1][0]) and not torch.allclose(shifted[-1][1], other[-1][1])
    with pytest.raises(ValueError, match="class label"):
        labelled(x, hint, t, context)
    with pytest.raises(ValueError, match="class label"):
        plain(x, hint, t, context, y=labels)


def test_builds_from_yaml_config(unet_config, control_config):
    for target, params in [
        ("fcdiffusion.core.control_net.FreqControlNet", control_config),
        ("fcdiffusion.core.controlled_unet.ControlledUnetModel", unet_config),
    ]:
        model = instantiate_from_config(OmegaConf.create({"target": target, "params": params}))
        assert type(model).__name__ == target.rsplit(".", 1)[1]
    with pytest.raises(TypeError):
        FreqControlNet(**unet_config)  # no decoder: out_channels is not an option


def test_sd21_base_control_net_on_meta_device():
    config = {k: v for k, v in sd21_unet_params().items() if k != "out_channels"}
    with torch.device("meta"):
        control_net = FreqControlNet(**config)
        x = torch.empty(1, 4, 64, 64)
        pairs = control_net(x, torch.empty_like(x), torch.zeros(1), torch.empty(1, 77, 1024))
    assert len(control_net.zero_convs_add) == len(control_net.zero_convs_mul) == 12
    shapes = {k: tuple(v.shape) for k, v in control_net.state_dict().items()}
    assert shapes["input_hint_block.0.weight"] == (512, 4, 3, 3)  # key names as in FCDiffusion checkpoints
    assert shapes["hint_add.weight"] == shapes["hint_mul.weight"] == (320, 512, 1, 1)
    assert shapes["zero_convs_add.11.0.weight"] == shapes["zero_convs_mul.11.0.weight"] == (1280, 1280, 1, 1)
    assert shapes["middle_block_out_add.0.weight"] == shapes["middle_block_out_mul.0.weight"] == (1280, 1280, 1, 1)
    assert len(pairs) == 13
    expected = [(320, 64)] * 3 + [(320, 32), (640, 32), (640, 32), (640, 16), (1280, 16), (1280, 16)]
    expected += [(1280, 8)] * 4
    assert [(a.shape[1], a.shape[-1]) for a, _ in pairs] == expected
    assert all(a.shape == m.shape for a, m in pairs)
