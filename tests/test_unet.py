"""The SD 2.x UNet against a reference output, the SD 2.1-base key/shape manifest and its own checkpointing."""
from __future__ import annotations

import pytest
import torch

from ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel
from tests.reference import assert_close_to_reference, sd21_shapes, sd21_unet_params, unet_params
from tests.reference import weights as reference_weights

PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def tiny_config() -> dict:
    return unet_params()



def test_matches_reference_output(reference, tiny_config):
    unet = UNetModel(**tiny_config).eval()
    unet.load_state_dict(reference_weights(PREFIX), strict=True)
    with torch.no_grad():
        out = unet(reference["unet_in.x"], timesteps=reference["unet_in.t"], context=reference["unet_in.context"])
    assert_close_to_reference(out, reference["unet_out"])


def test_sd21_base_keys_and_shapes_match_checkpoint_manifest():
    manifest = sd21_shapes()
    expected = {k[len(PREFIX) :]: tuple(v) for k, v in manifest.items() if k.startswith(PREFIX)}
    with torch.device("meta"):
        unet = UNetModel(**sd21_unet_params())
    assert all(p.is_meta for p in unet.parameters())
    got = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    assert {k: s for k, s in got.items() if s != expected[k]} == {}


def test_gradient_checkpointing_matches_plain_and_recomputes(reference, tiny_config):
    x, t, context = reference["unet_in.x"], reference["unet_in.t"], reference["unet_in.context"]
    results = []
    for use_checkpoint in (False, True):
        unet = UNetModel(**{**tiny_config, "use_checkpoint": use_checkpoint})
        unet.load_state_dict(reference_weights(PREFIX))
        calls = []
        resblock = next(m for m in unet.modules() if isinstance(m, ResBlock))
        resblock.in_layers.register_forward_hook(lambda *_: calls.append(1))
        out = unet(x, t, context)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad for n, p in unet.named_parameters()}
        results.append((out.detach(), grads, len(calls)))
    (out_plain, grads_plain, calls_plain), (out_ckpt, grads_ckpt, calls_ckpt) = results
    assert (calls_plain, calls_ckpt) == (1, 2)  # checkpointing recomputes the block in backward
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=1e-6)
    assert all(g is not None for g in grads_plain.values())
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_fp16_compute_dtype_under_autocast(reference, tiny_config):
    unet = UNetModel(**{**tiny_config, "use_fp16": True}).eval()
    unet.load_state_dict(reference_weights(PREFIX))
    assert unet.dtype == torch.float16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        out = unet(reference["unet_in.x"], reference["unet_in.t"], reference["unet_in.context"])
    expected = reference["unet_out"]
    assert out.dtype == torch.float16
    assert (out.float() - expected).abs().max() <= 1e-2 * expected.abs().max()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"use_spatial_transformer": False}, "use_spatial_transformer"),
        ({"num_heads": 2}, "exactly one"),
        ({"dims": 3}, "2D"),
        ({"context_dim": None}, "context_dim"),
    ],
)
def test_rejects_unsupported_options(tiny_config, override, message):
    with pytest.raises(ValueError, match=message):
        UNetModel(**{**tiny_config, **override})
