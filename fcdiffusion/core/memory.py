"""What a training step holds in memory, and the switches that cut it: gradient checkpointing, the frozen encoders'
dtype, and the optimizer (AdamW, or bitsandbytes' 8-bit AdamW), with the exact bytes of gradients and optimizer
state that `fcdiffusion.apps.train_memory` composes its figures from.

- Gradient checkpointing (`set_gradient_checkpointing`) recomputes each residual and transformer block's
  activations in the backward pass instead of keeping them. It only acts where a graph is built: frozen teachers'
  forwards run under `torch.no_grad()` and keep no activations either way.
- The frozen VAE and text encoder (`cast_frozen_encoders`) run only under `no_grad`, so holding them in bf16 costs
  no gradient precision; their outputs are returned in float32, and `state_dict()` still gives the exact float32
  values, kept on the host, so checkpoints written with the option equal those written without it.
- `make_optimizer` builds AdamW (the fused CUDA kernel on a GPU: no whole-size temporaries in the step; elsewhere
  the multi-tensor form, `ldm.util.FOREACH`) or bitsandbytes' `AdamW8bit` (8-bit blockwise states: a quarter of
  AdamW's state bytes); `check_optimizer` refuses an unknown name, or `adamw8bit` without bitsandbytes, before any
  model is built.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

from fcdiffusion.core.precision import cast_parameters, follow_weight_dtype
from ldm.util import FOREACH

OPTIMIZERS = ("adamw", "adamw8bit")
ENCODER_DTYPES = ("fp32", "bf16")
# bitsandbytes' 8-bit optimizers keep float32 states for tensors under this many elements (`min_8bit_size`) and
# one float32 scale per block of this many elements of each 8-bit state (blockwise quantisation).
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256


def check_optimizer(name: str) -> str:
    """`name` if it is one of `OPTIMIZERS` and can be built here; else a ValueError saying what to do."""
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--optimizer adamw8bit needs bitsandbytes, which is not installed here: "
                         "pip install bitsandbytes (its 8-bit optimizers run on CUDA GPUs), or use --optimizer adamw")
    return name


def make_optimizer(params: Sequence[nn.Parameter], learning_rate: float, name: str = "adamw") -> torch.optim.Optimizer:
    """The optimizer `name` (`OPTIMIZERS`) over `params`: AdamW (fused when every parameter is on CUDA) or
    bitsandbytes' AdamW8bit."""
    check_optimizer(name)
    params = list(params)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=learning_rate)
    fused = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(params, lr=learning_rate, fused=fused or None, foreach=None if fused else FOREACH)


def optimizer_state_bytes(params: Iterable[nn.Parameter], name: str = "adamw") -> int:
    """Bytes of the optimizer state `name` keeps for `params` (two moments per element): float32 for AdamW; for
    AdamW8bit one byte each plus a float32 scale per `BNB_BLOCK` elements, float32 below `BNB_MIN_8BIT_SIZE`."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    total = 0
    for p in params:
        n = p.numel()
        if name == "adamw" or n < BNB_MIN_8BIT_SIZE:
            total += 2 * 4 * n
        else:
            total += 2 * (n + 4 * math.ceil(n / BNB_BLOCK))
    return total


def gradient_bytes(params: Iterable[nn.Parameter]) -> int:
    """Bytes of the gradients of `params` (one per element, in the parameter's dtype)."""
    return sum(p.numel() * p.element_size() for p in params)


def set_gradient_checkpointing(modules: Iterable[nn.Module], enabled: bool) -> int:
    """Switch gradient checkpointing of every residual and transformer block in `modules` (the blocks' and
    networks' `use_checkpoint`); returns the number of blocks switched."""
    switched: set[int] = set()
    for module in modules:
        for block in module.modules():
            if hasattr(block, "use_checkpoint"):
                block.use_checkpoint = bool(enabled)
                if hasattr(block, "_forward"):
                    switched.add(id(block))
    return len(switched)


def _float32_output(module: nn.Module, args: Any, output: Any) -> Any:
    return output.float() if torch.is_tensor(output) and output.is_floating_point() else output


def _exact_values(masters: dict[int, torch.Tensor], names: dict[str, int], module: nn.Module,
                  state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for name, key in names.items():  # `state_dict(keep_vars=True)` asks for the Parameters themselves: left as they are
        if prefix + name in state_dict and not isinstance(state_dict[prefix + name], nn.Parameter):
            state_dict[prefix + name] = masters[key]


# The submodules whose outputs leave each frozen encoder (cast back to float32): the VAE's posterior moments and
# decoded image, the text encoder's final layer norm.
ENCODER_OUTPUTS = {"first_stage_model": ("quant_conv", "decoder"), "cond_stage_model": ("model.ln_final",)}


def cast_frozen_encoders(models: Iterable[nn.Module], dtype: torch.dtype) -> int:
    """Hold the frozen VAE (`first_stage_model`) and text encoder (`cond_stage_model`) of `models` in `dtype`.

    Their layers compute in `dtype` (`follow_weight_dtype`) and hand float32 on (latents, context, images). Their
    exact float32 values stay on the host, once per shared tensor, and `state_dict()` returns those, so checkpoints
    do not change. Encoders already in another dtype than float32 (the distiller's `teacher_dtype`) are left as
    they are. Returns the number of parameter elements cast; a ValueError if an encoder trains.
    """
    masters: dict[int, torch.Tensor] = {}
    cast = 0
    for model in models:
        for attribute, outputs in ENCODER_OUTPUTS.items():
            encoder = getattr(model, attribute, None)
            if encoder is None:
                continue
            params = dict(encoder.named_parameters())
            if any(p.requires_grad for p in params.values()):
                raise ValueError(f"{attribute} trains, so it cannot be held in {dtype}")
            if any(p.is_floating_point() and p.dtype != torch.float32 and id(p) not in masters
                   for p in params.values()):
                continue
            names = {}
            for name, p in params.items():
                if p.is_floating_point():
                    if id(p) not in masters:
                        masters[id(p)] = p.detach().to("cpu", copy=True)
                        cast += p.numel()
                    names[name] = id(p)
            cast_parameters([encoder], dtype)
            follow_weight_dtype(encoder)
            for output in outputs:
                encoder.get_submodule(output).register_forward_hook(_float32_output)
            encoder.register_state_dict_post_hook(functools.partial(_exact_values, masters, names))
    return cast
