"""Access to the reference fixtures made with the public SD 2 implementation (see tests/fixtures/)."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.util import without_sd_only_params

FIXTURES = Path(__file__).parent / "fixtures"
SD21_BASE_CONFIG = Path(__file__).parents[1] / "configs" / "sd21_base.yaml"


@lru_cache(maxsize=1)
def tensors() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "ldm_reference_tiny.safetensors"))


@lru_cache(maxsize=1)
def configs() -> dict:
    return json.loads((FIXTURES / "ldm_reference_tiny.json").read_text())


@lru_cache(maxsize=1)
def sd21_shapes() -> dict[str, list[int]]:
    return json.loads((FIXTURES / "sd21_base_state_dict_shapes.json").read_text())


def weights(prefix: str) -> dict[str, torch.Tensor]:
    """The fixture's weights under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors().items() if k.startswith(prefix)}


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    """Max abs error at most `rel` times the reference's scale (its max abs value)."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = (out.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel} * scale {scale:.3e}"


def unet_params() -> dict:
    """The fixture's UNet parameters as the constructor takes them: SD's `image_size` dropped, as
    `instantiate_from_config` drops it."""
    return without_sd_only_params(UNetModel, configs()["unet_config"])


def sd21_unet_params() -> dict:
    """The UNet parameters of configs/sd21_base.yaml (the SD 2.1-base layout) as the constructor takes them."""
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(OmegaConf.load(SD21_BASE_CONFIG).model.params.unet_config.params)
    return without_sd_only_params(UNetModel, params)
