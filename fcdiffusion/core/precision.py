"""The precision names every flag takes (`fp32`, `bf16`, `fp16`): of inference, of the distiller's frozen tensors,
and of training, which runs them as Lightning's mixed precision (`lightning_precision`).

A model is cast parameter by parameter (`cast_parameters`), never buffer by buffer: the noise-schedule buffers
(`alphas_cumprod`, ...) stay float32, so DDIM's arithmetic does not change with the network's precision. Where
tensors of one model end up in different dtypes (a low-precision network fed float32 latents, the distiller's
bf16 frozen base under an fp32 student), `follow_weight_dtype` casts each layer's floating inputs to that
layer's own weight dtype, so no code path needs to know which parts were cast.

The VAE is the one exception to "everything in the chosen dtype": SD's VAE decoder overflows fp16 (activations
in its last up-blocks exceed 65504 at some image sizes, giving inf/NaN images), so with `fp16` the VAE stays in
float32 (`vae_dtype`). bf16 has float32's exponent range, so it cannot overflow and the VAE runs in bf16.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Training keeps float32 weights: bf16 and fp16 autocast the passes (fp16 with loss scaling), fp32 is plain float32.
LIGHTNING_PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
_HOOKED = "_fcdiffusion_follows_weight_dtype"


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision name (`PRECISIONS`); a ValueError naming the valid ones otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def lightning_precision(precision: str) -> str:
    """Lightning's `precision` for a training run in `precision` (a name of `PRECISIONS`); a ValueError naming the
    valid ones otherwise (Lightning's own spellings, "32" or "bf16-mixed", included)."""
    if precision not in LIGHTNING_PRECISIONS:
        names = ", ".join(f"{name} ({lightning})" for name, lightning in LIGHTNING_PRECISIONS.items())
        raise ValueError(f"--precision must be one of {names}, got {precision!r}")
    return LIGHTNING_PRECISIONS[precision]


def vae_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE runs in when the rest of the model runs in `dtype`: float32 instead of fp16 (overflow)."""
    return torch.float32 if dtype == torch.float16 else dtype


def cast_parameters(modules: Iterable[nn.Module], dtype: torch.dtype,
                    skip: Iterable[nn.Parameter] = ()) -> None:
    """Cast every floating parameter of `modules` (not in `skip`) to `dtype`, in place.

    In place (`p.data = ...`) keeps each Parameter object, so a tensor shared by several models (the distiller's
    frozen base) is cast once and stays shared. Buffers are left as they are (see the module docstring).
    """
    skipped = {id(p) for p in skip}
    seen: set[int] = set()
    for module in modules:
        for p in module.parameters():
            if id(p) in seen or id(p) in skipped or not p.is_floating_point():
                continue
            seen.add(id(p))
            p.data = p.data.to(dtype)


def _cast_to_weight_dtype(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    dtype = next(p.dtype for p in module.parameters(recurse=False) if p.is_floating_point())

    def cast(value: Any) -> Any:
        if torch.is_tensor(value) and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        return value

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def follow_weight_dtype(model: nn.Module) -> nn.Module:
    """Make every layer holding floating parameters cast its floating inputs to its weights' dtype (idempotent).

    The dtype is read at each call, so casting the weights later needs no new hooks. Outputs keep the layer's
    dtype; element-wise arithmetic between layers promotes as torch does (bf16 + float32 -> float32).
    """
    for module in model.modules():
        if getattr(module, _HOOKED, False):
            continue
        if any(p.is_floating_point() for p in module.parameters(recurse=False)):
            module.register_forward_pre_hook(_cast_to_weight_dtype, with_kwargs=True)
            setattr(module, _HOOKED, True)
    return model


def resident_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the distinct parameter and buffer tensors of `modules` (a tensor shared by several counted once)."""
    unique: dict[int, int] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            unique[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(unique.values())


def prepare_for_inference(model: nn.Module, device: torch.device | str, precision: str = "fp32",
                          compile: bool = False) -> nn.Module:
    """`model` in eval mode on `device`, its weights in `precision` (the VAE per `vae_dtype`), optionally compiled.

    `compile` wraps the networks evaluated at every sampling step (the UNet and the control net) in
    `torch.compile`; the first translation then pays the compilation.
    """
    dtype = precision_dtype(precision)
    model = model.eval().to(device)
    if dtype != torch.float32:
        cast_parameters([m for name, m in model.named_children() if name != "first_stage_model"], dtype)
        cast_parameters([model.first_stage_model], vae_dtype(dtype))
        follow_weight_dtype(model)
    if compile:
        model.model.diffusion_model.compile()
        model.control_model.compile()
    return model
