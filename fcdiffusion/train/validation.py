"""Validation metrics on fixed data: the same timesteps, noise and seeds at every validation, so that successive
values compare and differ only because the weights changed.

Teachers (`FCDiffusion.validation_step`) report the diffusion loss at `validation_timesteps`. The distiller
(`FrequencyDistiller.validation_step`) reports its loss, and on the first validation batch `agreement_metrics`:
per mode, how far the student's k-step result is from its teacher's own guided sampling, and how well it keeps
the source's controlled band (`fcdiffusion.core.band_fidelity`), as `evaluate.py` measures them.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from fcdiffusion.core.band_fidelity import latent_band_scores
from fcdiffusion.core.inference import Translator, batch_images, encode_images
from fcdiffusion.core.model import FCDiffusion, FrequencyControlledLDM


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Torch's random generators (the CPU's and `device`'s) seeded with `seed` for the duration, restored after, so
    validation draws the same numbers every time without disturbing training's stream."""
    devices = [device] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield


def teacher_references(student: FrequencyControlledLDM, teachers: Mapping[str, FCDiffusion], z: torch.Tensor,
                       context: torch.Tensor, prompts: Sequence[str], cache: dict[Any, dict[str, torch.Tensor]]
                       ) -> dict[str, torch.Tensor]:
    """Per mode, the encoded result of the teacher's own guided sampling (its steps and scale, seed 0) of these
    sources; computed once per batch of prompts and kept in `cache`, since the teachers are frozen."""
    key = (tuple(prompts), tuple(z.shape), z.device, float(z.double().sum()))
    if key not in cache:
        references = {}
        for mode, teacher in teachers.items():
            result = Translator(teacher).translate_latents(z, context, [mode], seed=0, decode_control=False)[mode]
            references[mode] = encode_images(student, result.image)
        cache[key] = references
    return cache[key]


@torch.no_grad()
def agreement_metrics(student: FrequencyControlledLDM, teachers: Mapping[str, FCDiffusion], batch: Mapping[str, Any],
                      cache: dict[Any, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """On `batch`, per mode: `val/teacher_latent_mse_<mode>` (the student's k-step result, seed 0, against its
    teacher's, both decoded and re-encoded, as evaluate.py's teacher_latent_mse), `val/band_error_<mode>` and
    `val/band_freedom_<mode>` (latent space); and `val/teacher_latent_mse`, the mean over modes. `cache` keeps the
    teachers' results between validations."""
    modes = list(teachers)
    images, prompts = batch_images(batch, student.first_stage_key, student.cond_stage_key)
    translator = Translator(student)
    z, context = translator.encode(images, prompts)
    results = translator.translate_latents(z, context, modes, seed=0, decode_control=False)
    references = teacher_references(student, teachers, z, context, prompts, cache)
    logs = {}
    for mode in modes:
        output = results[mode].image
        logs[f"val/teacher_latent_mse_{mode}"] = (encode_images(student, output) - references[mode]).pow(2).mean()
        error, freedom = latent_band_scores(student, images, output, mode)
        logs[f"val/band_error_{mode}"], logs[f"val/band_freedom_{mode}"] = error.mean(), freedom.mean()
    logs["val/teacher_latent_mse"] = torch.stack([logs[f"val/teacher_latent_mse_{m}"] for m in modes]).mean()
    return logs
