"""The one translation pipeline: source image + prompt -> a translated image per control mode.

`Translator` wraps a loaded teacher or student and runs encode -> condition -> sample -> decode for a batch.
`test_distillation.py`, the benchmark, both `log_images` and the tests all translate through it, so a result
depends only on the model, the image, the prompt, the mode, the steps and the seeds, never on who asked.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from einops import rearrange

from fcdiffusion.core.tiny_vae import TinyVAE
from ldm.models.diffusion.sampling import StepCallback

log = logging.getLogger(__name__)
EXAMPLE_PROMPT = "a watercolor painting of a cat"


def check_prompt(prompt: str | None) -> str:
    """`prompt` as the text encoder reads it (whitespace runs collapsed, as caption files are read), or a ValueError
    when no word is left: the one rule for `--prompt`, caption files (an empty one skips its image) and the demo."""
    words = " ".join((prompt or "").split())
    if not words:
        raise ValueError(f"the prompt is empty: describe the picture you want, e.g. '{EXAMPLE_PROMPT}'")
    return words


class Translatable(Protocol):
    """What the pipeline needs of a model: the interface `fcdiffusion.core.model.FrequencyControlledLDM` gives
    teachers and the student (declared here so the model can use the pipeline without an import circle)."""

    modes: tuple[str, ...]
    device: torch.device

    def check_mode(self, mode: str) -> str: ...
    def condition(self, z: torch.Tensor, context: torch.Tensor, mode: str,
                  generator: torch.Generator | None = None) -> dict[str, Any]: ...
    def sample(self, cond: dict[str, Any], x_T: torch.Tensor, steps: int | None = None,
               guidance_scale: float | None = None, verbose: bool = False, sampler: str | None = None,
               spacing: str | None = None, callback: StepCallback | None = None) -> torch.Tensor: ...
    def get_learned_conditioning(self, prompts: Sequence[str]) -> torch.Tensor: ...
    def encode_first_stage(self, x: torch.Tensor) -> Any: ...
    def get_first_stage_encoding(self, posterior: Any, sample: bool = True) -> torch.Tensor: ...
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor: ...


def seeded_noise(shape: Sequence[int], seeds: Sequence[int], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Initial noise (len(seeds), *shape): sample i is drawn from a CPU generator seeded with seeds[i] alone.

    So an image's noise is the same whatever batch it is in, and on every device.
    """
    draws = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(draws).to(device=device, dtype=dtype)


@torch.no_grad()
def encode_images(model: Translatable, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> scaled latents, the VAE posterior's mean (what translation starts from).

    Contiguous first: convolutions may pick other kernels (other rounding) for other strides. The latents are
    float32 whatever the VAE's precision: the DCT bands and the sampler's arithmetic work on them.
    """
    posterior = model.encode_first_stage(images.to(model.device, torch.float32).contiguous())
    return model.get_first_stage_encoding(posterior, sample=False).float()


def batch_images(batch: Mapping[str, Any], image_key: str, prompt_key: str,
                 n: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """The first `n` images of a dataset batch (B, H, W, 3 in [-1, 1]) as (B, 3, H, W) float, and their prompts."""
    images = batch[image_key]
    images = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    return rearrange(images[:n], "b h w c -> b c h w").float(), list(batch[prompt_key])[:n]


@dataclass
class Translation:
    """One mode's results for a batch: the decoded result in [-1, 1], the sampled latents, and the decoded control
    signal (None when not asked for)."""

    image: torch.Tensor
    latents: torch.Tensor
    control: torch.Tensor | None = None


class Translator:
    """encode -> condition -> sample -> decode with a teacher (`FCDiffusion`) or the student.

    `Translator(model)(images, prompts, modes, seeds)` returns {mode: Translation}. A teacher serves its own mode
    only and samples with guided DDIM (or DPM-Solver++(2M), `sampler="dpmpp_2m"`); the student serves every mode
    it learned, in a few guidance-free steps (a guidance-conditioned student at the `guidance_scale` asked for).
    `tiny_vae` (`fcdiffusion.core.tiny_vae`) encodes, decodes or both in place of the model's VAE.
    """

    def __init__(self, model: Translatable, tiny_vae: TinyVAE | None = None):
        if tiny_vae is not None:
            tiny_vae.check(model)
        self.model, self.tiny_vae = model, tiny_vae
        self._cut_prompts: set[str] = set()

    @property
    def modes(self) -> tuple[str, ...]:
        return self.model.modes

    def dropped_tokens(self, prompts: Sequence[str]) -> list[int]:
        """Per prompt, how many tokens the model's text encoder cuts off past its context length (0 for an encoder
        that does not say)."""
        count = getattr(getattr(self.model, "cond_stage_model", None), "dropped_tokens", None)
        return list(count(prompts)) if count is not None else [0] * len(prompts)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] and their prompts -> (latents, the posterior mean; text context).

        A prompt longer than the text encoder's context is cut to it: said once per prompt (a warning naming how
        many tokens were dropped), never silently."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        for prompt, dropped in zip(prompts, self.dropped_tokens(prompts)):
            if dropped and prompt not in self._cut_prompts:
                self._cut_prompts.add(prompt)
                shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                log.warning("the prompt %r is %d token(s) longer than the text encoder reads (its context of %s, "
                            "with the start and end tokens): its end is cut off", shown, dropped,
                            getattr(self.model.cond_stage_model, "max_length", "?"))
        return self.encode_images(images), self.model.get_learned_conditioning(prompts)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents, float32: the tiny VAE's, else the posterior mean."""
        if self.tiny_vae is not None and self.tiny_vae.encodes:
            return self.tiny_vae.encode(images)
        return encode_images(self.model, images)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in about [-1, 1], float32, by the tiny VAE if it decodes, else the model's."""
        if self.tiny_vae is not None and self.tiny_vae.decodes:
            return self.tiny_vae.decode(latents)
        return self.model.decode_first_stage(latents).float()

    @torch.no_grad()
    def translate_latents(self, z: torch.Tensor, context: torch.Tensor, modes: Sequence[str] | None = None,
                          seed: int | Sequence[int] = 0, control_seed: int = 0, steps: int | None = None,
                          guidance_scale: float | None = None, decode_control: bool = True,
                          sampler: str | None = None, spacing: str | None = None,
                          callback: StepCallback | None = None) -> dict[str, Translation]:
        """Steps 2-4 of `__call__` for already encoded sources; `callback(index, steps, x0)` sees every sampling
        step's predicted clean latents (a live preview)."""
        modes = list(self.modes if modes is None else modes)
        for mode in modes:
            self.model.check_mode(mode)
        seeds = [seed + i for i in range(z.shape[0])] if isinstance(seed, int) else list(seed)
        if len(seeds) != z.shape[0]:
            raise ValueError(f"{z.shape[0]} images but {len(seeds)} seeds")
        # 2. The initial noise: one seed per image, the same in every mode, so results differ only by mode.
        x_T = seeded_noise(z.shape[1:], seeds, z.device, z.dtype)
        results = {}
        for mode in modes:
            # 3. Condition on the prompt and the source latent's DCT band (mini_pass shuffles with `control_seed`).
            cond = self.model.condition(z, context, mode, generator=torch.Generator().manual_seed(control_seed))
            # 4. Sample, and decode the result (and the control signal, to show it).
            latents = self.model.sample(cond, x_T, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                                        spacing=spacing, callback=callback)
            control = self.decode(cond["c_concat"][0]) if decode_control else None
            results[mode] = Translation(image=self.decode(latents), latents=latents, control=control)
        return results

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], modes: Sequence[str] | None = None,
                 seed: int | Sequence[int] = 0, control_seed: int = 0, steps: int | None = None,
                 guidance_scale: float | None = None, decode_control: bool = True, sampler: str | None = None,
                 spacing: str | None = None) -> dict[str, Translation]:
        """Translate images (B, 3, H, W) in [-1, 1] with their prompts in each of `modes` (default: all served).

        `seed`: an int s gives image i the noise seed s + i, a sequence gives each image's seed. `steps`,
        `guidance_scale`, `sampler` (`ddim`, `dpmpp_2m`) and `spacing` (`uniform`, `trailing`) default to the
        model's own (a teacher's `ddim_steps` and scale with DDIM on SD's uniform spacing, the student's
        `student_steps` with DDIM on the trailing one; only a guidance-conditioned student takes another guidance
        scale). `decode_control=False` skips decoding the control signal, a picture for people (one VAE decode per
        image and mode that the translation itself does not need).
        """
        # 1. Encode the sources (posterior mean) and the prompts.
        z, context = self.encode(images, prompts)
        return self.translate_latents(z, context, modes, seed, control_seed, steps, guidance_scale, decode_control,
                                      sampler, spacing)
