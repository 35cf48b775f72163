"""Build the initial FCDiffusion checkpoint from a Stable Diffusion 2.x checkpoint.

    python tool_add_control_sd21.py models/v2-1_512-ema-pruned.ckpt models/fcdiffusion_init.ckpt

Every SD tensor is kept; each control-net tensor whose name matches a UNet tensor (`control_model.X` <-
`model.diffusion_model.X`: time embedding, input blocks, middle block) is copied from it; the control net's
new layers (hint block, zero convolutions) keep their initialisation, drawn from `--seed` (default 0), so the same
inputs always give the same file.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch
from omegaconf import OmegaConf

from fcdiffusion import cli
from fcdiffusion.core.paths import DOWNLOAD_HELP
from ldm.checkpoint import CheckpointMismatchError, check_state_dict, group_keys, load_state_dict, save_state_dict
from ldm.util import instantiate_from_config, load_config, without_text_encoder_file

CONTROL_PREFIX, UNET_PREFIX = "control_model.", "model.diffusion_model."


def add_control(sd_state: dict, model_state: dict, source: str = "SRC") -> tuple[dict, list[str], list[str]]:
    """Return (FCDiffusion state dict, copied control keys, new control keys) from an SD state dict."""
    sd_part = {k: v for k, v in model_state.items() if not k.startswith(CONTROL_PREFIX)}
    if not any(k.startswith(UNET_PREFIX) for k in sd_state) or not any(
            k.startswith("cond_stage_model.model.") for k in sd_state):
        raise CheckpointMismatchError(
            f"{source} is not a Stable Diffusion 2.x checkpoint (no '{UNET_PREFIX}*' UNet or "
            "'cond_stage_model.model.*' OpenCLIP keys); SD 1.x and diffusers folders are not supported")
    check_state_dict(sd_part, sd_state, source)
    out, copied, new = dict(sd_state), [], []
    for key, value in model_state.items():
        if not key.startswith(CONTROL_PREFIX):
            continue
        twin = UNET_PREFIX + key[len(CONTROL_PREFIX):]
        if twin in sd_state and sd_state[twin].shape == value.shape:
            out[key] = sd_state[twin].clone()
            copied.append(key)
        else:
            out[key] = value
            new.append(key)
    return out, copied, new


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("src", help="SD 2.x checkpoint (.ckpt or .safetensors)")
    parser.add_argument("dst", help="output FCDiffusion checkpoint (.ckpt or .safetensors)")
    parser.add_argument("--config", default="configs/model_config.yaml", help="FCDiffusion model config")
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new control-net layers' initialisation")
    return parser


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """Build the FCDiffusion model from the config, fill it from SRC (`add_control`) and write DST."""
    if os.path.exists(args.dst) and not args.force:
        raise cli.UsageError(f"{args.dst} exists; pass --force to overwrite it")
    sd_state = load_state_dict(args.src, hint=DOWNLOAD_HELP)
    config = OmegaConf.to_container(load_config(args.config, overrides).model, resolve=True)
    # The text encoder's weights come from SRC, so its own file is not needed here. The seed fixes the random
    # initialisation of the new layers without touching the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = instantiate_from_config(without_text_encoder_file(config))
    state, copied, new = add_control(sd_state, model.state_dict(), args.src)
    print(f"copied from the SD UNet into the control net ({len(copied)} tensors):\n{group_keys(copied, 3)}")
    print(f"new control-net layers, kept at their initialisation ({len(new)} tensors):\n{group_keys(new, 2)}")
    save_state_dict(state, args.dst)
    print(f"wrote {args.dst} ({len(state)} tensors)")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv, unknown="overrides")


if __name__ == "__main__":
    sys.exit(main())
