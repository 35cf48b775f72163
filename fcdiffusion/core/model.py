"""FCDiffusion (Gao et al. 2024): SD 2.1-base steered by a control net that sees a DCT band of the source latent.

Training reconstructs an image from its caption and a frequency-filtered copy of its own latent; at inference
the filtered source latent plus a new prompt translate the image. Which band is kept (the control mode) decides
the task: `mini_pass` style-guided content creation, `low_pass` semantic manipulation, `mid_pass` scene
translation, `high_pass` style translation.

`FrequencyControlledLDM` is what the teacher (`FCDiffusion`, one mode) and the distilled student
(`fcdiffusion.core.student.FCDiffusionStudent`, every mode) share, including the interface every caller uses:
`condition(z, context, mode, generator)` builds the conditioning for a mode and `sample(cond, steps,
guidance_scale, x_T)` turns it into latents, each model in its own way. `fcdiffusion.core.inference.Translator`
wraps them into encode -> condition -> sample -> decode.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from fcdiffusion.core.control_net import ControlPair
from fcdiffusion.core.frequency import CONTROL_MODES, ControlMode, check_band, frequency_control
from fcdiffusion.core.inference import Translator, batch_images, seeded_noise
from fcdiffusion.core.memory import make_optimizer
from ldm.models.diffusion.ddpm import LatentDiffusion, freeze
from ldm.models.diffusion.sampling import StepCallback, sample
from ldm.models.diffusion.scheduler import Scheduler
from ldm.util import instantiate_from_config, without_text_encoder_file

# {"c_crossattn": [context], "c_concat": [control signal]}, for the student also "y" (mode labels) and, when
# guidance-conditioned, "guidance_scale" (per sample) and, when step-conditioned, "step_size" (per sample)
Cond = dict[str, Any]


def validation_timesteps(num_timesteps: int, count: int = 5) -> list[int]:
    """`count` timesteps spread evenly over the schedule, each in the middle of its share (100, 300, ..., 900):
    where a teacher's validation loss is measured, the same at every validation so successive values compare."""
    return [int((i + 0.5) * num_timesteps / count) for i in range(count)]


class FrequencyControlledLDM(LatentDiffusion):
    """A frozen SD UNet (`ControlledUnetModel`) modulated by a `FreqControlNet` (`control_model`).

    Subclasses say which modes they serve (`modes`), how they sample (`sample`) and what they train.
    `build_params` keeps the constructor arguments, so a weights file can carry the config that rebuilds it.
    """

    kind = "model"  # what `weights_metadata` calls this model: "teacher" or "student"
    lr_schedule: Any = None  # the run's `LRSchedule`, set by `fcdiffusion.train.training.fit`; None: constant
    optimizer_name = "adamw"  # `fcdiffusion.core.memory.OPTIMIZERS`, set by `fit` from `--optimizer`

    def __init__(
        self,
        control_stage_config: Mapping[str, Any],
        frequency_thresholds: Mapping[str, int] | None = None,
        control_scales: float | Sequence[float] = 1.0,
        sd_locked: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.build_params: dict[str, Any] = {
            "control_stage_config": control_stage_config, "frequency_thresholds": frequency_thresholds,
            "control_scales": control_scales, "sd_locked": sd_locked, **kwargs}
        self.frequency_thresholds = dict(frequency_thresholds or {})
        self.control_model = instantiate_from_config(control_stage_config)
        n_pairs = len(self.model.diffusion_model.input_blocks) + 1
        scales = [float(control_scales)] * n_pairs if isinstance(control_scales, (int, float)) else list(control_scales)
        if len(scales) != n_pairs:
            raise ValueError(f"control_scales needs {n_pairs} values (input blocks + middle block), got {len(scales)}")
        self.control_scales = scales
        self.sd_locked = sd_locked
        freeze(self.model)
        for p in self.unlocked_unet_parameters():
            p.requires_grad_(True)
        # Validate the thresholds now rather than at the first training step: every mode's band (the thresholds
        # are one setting for all teachers and the student) must keep part of this model's latent.
        for mode in CONTROL_MODES:
            check_band(mode, self.image_size, self.image_size, **self.frequency_thresholds)

    # ---- what trains ----------------------------------------------------------------------------------------
    def unlocked_unet_parameters(self) -> list[nn.Parameter]:
        """The UNet decoder (output blocks and output head), trained alongside the control net unless sd_locked."""
        if self.sd_locked:
            return []
        unet = self.model.diffusion_model
        return [*unet.output_blocks.parameters(), *unet.out.parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.control_model.parameters(), *self.unlocked_unet_parameters()]

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (or `optimizer_name`'s optimizer) on the trained parameters, its learning rate following
        `lr_schedule` step by step."""
        optimizer = make_optimizer(self.trainable_parameters(), self.learning_rate, self.optimizer_name)
        return {"optimizer": optimizer} if self.lr_schedule is None else self.lr_schedule.attach(optimizer)

    def train(self, mode: bool = True) -> FrequencyControlledLDM:
        """Keep the frozen UNet encoder in eval while training (its dropout off, like the rest of SD)."""
        super().train(mode)
        if self.sd_locked:
            self.model.eval()
        return self

    # ---- the interface shared by teacher and student -------------------------------------------------------
    @property
    def modes(self) -> tuple[str, ...]:
        """The control modes this model serves."""
        raise NotImplementedError

    def check_mode(self, mode: str) -> ControlMode:
        """`mode` as a `ControlMode`, if this model serves it; else a ValueError naming the mode asked for and those
        served."""
        mode = ControlMode(mode)
        if mode not in self.modes:
            raise ValueError(f"this {self.kind} serves control mode(s) {', '.join(self.modes)}, not '{mode}'")
        return mode

    def condition(self, z: torch.Tensor, context: torch.Tensor, mode: str,
                  generator: torch.Generator | None = None) -> Cond:
        """Conditioning for `mode`: the prompt context and the source latent `z` filtered to the mode's DCT band.

        `generator` drives the mini_pass shuffle (one permutation per call, shared over the batch).
        """
        control = frequency_control(z, self.check_mode(mode), generator=generator, **self.frequency_thresholds)
        return {"c_crossattn": [context], "c_concat": [control]}

    def sample(self, cond: Cond, x_T: torch.Tensor, steps: int | None = None,
               guidance_scale: float | None = None, verbose: bool = False, sampler: str | None = None,
               spacing: str | None = None, callback: StepCallback | None = None) -> torch.Tensor:
        """Latents for `cond` from the initial noise `x_T`; `steps`/`guidance_scale` and the sampler (`ddim`,
        `dpmpp_2m`) and its timestep `spacing` (`uniform`, `trailing`) default to the model's own; `callback` sees
        each step's predicted x0 (`ldm.models.diffusion.sampling.sample`)."""
        raise NotImplementedError

    def unconditional_conditioning(self, cond: Cond) -> Cond:
        """Classifier-free guidance's negative branch: the empty prompt, the same control signal."""
        context = cond["c_crossattn"][0]
        empty = self.empty_context().to(context).expand_as(context)
        return {**cond, "c_crossattn": [empty]}

    def empty_context(self) -> torch.Tensor:
        """The empty prompt's text context (1, 77, width), encoded once per device and dtype of the text encoder.

        Guidance needs it at every sampled image and distillation step; it depends only on the frozen text
        encoder's weights (where they live, their dtype, their storage), which form the cache key. Encoded outside
        autocast and inference mode, so one cached tensor serves training and inference alike.
        """
        weight = next(self.cond_stage_model.parameters())
        key = (weight.device, weight.dtype, weight.data_ptr())
        cache = self.__dict__.setdefault("_empty_context", {})
        if key not in cache:
            cache.clear()
            with torch.inference_mode(False), torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
                cache[key] = self.get_learned_conditioning([""])
        return cache[key]

    # ---- the network ----------------------------------------------------------------------------------------
    def control(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Cond) -> list[ControlPair]:
        """The control net's scaled (add, mul) pairs."""
        pairs = self.control_model(x=x_noisy, hint=torch.cat(cond["c_concat"], 1), timesteps=t,
                                   context=torch.cat(cond["c_crossattn"], 1), y=cond.get("y"),
                                   guidance_scale=cond.get("guidance_scale"), step_size=cond.get("step_size"))
        return [(add * s, mul * s) for (add, mul), s in zip(pairs, self.control_scales)]

    def eps_and_control(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, list]:
        """eps and the scaled control pairs of one forward pass (the distiller's control loss uses both)."""
        if not isinstance(cond, Mapping):
            raise TypeError(f"{type(self).__name__} expects the conditioning of condition(), got {type(cond).__name__}")
        pairs = self.control(x_noisy, t, cond)
        context = torch.cat(cond["c_crossattn"], 1)
        eps = self.model.diffusion_model(x=x_noisy, timesteps=t, context=context, control=pairs)
        return eps.to(x_noisy.dtype), pairs  # a low-precision network's eps in the sampler's (float32) dtype

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.eps_and_control(x_noisy, t, cond)[0]

    # ---- self-describing weights ----------------------------------------------------------------------------
    def model_config(self) -> dict[str, Any]:
        """The `{target, params}` that rebuilds this model; the text encoder's tensors come from the weights file."""
        params = OmegaConf.to_container(OmegaConf.create(copy.deepcopy(self.build_params)), resolve=True)
        return without_text_encoder_file({"target": f"{type(self).__module__}.{type(self).__qualname__}",
                                          "params": params})

    def weights_metadata(self) -> dict[str, str]:
        """What a weights file of this model records beside its tensors (safetensors metadata: str -> str)."""
        return {"fcdiffusion.kind": self.kind, "fcdiffusion.modes": json.dumps(list(self.modes)),
                "fcdiffusion.config": json.dumps(self.model_config())}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning checkpoints carry the metadata too, so a `last.ckpt` describes itself."""
        checkpoint["metadata"] = self.weights_metadata()


class FCDiffusion(FrequencyControlledLDM):
    """The FCDiffusion teacher: one control mode, trained with the diffusion loss, sampled with guided DDIM."""

    kind = "teacher"

    def __init__(self, control_mode: str, guidance_scale: float = 9.0, ddim_steps: int = 50, **kwargs: Any):
        super().__init__(**kwargs)
        self.control_mode = ControlMode(control_mode)
        self.guidance_scale, self.ddim_steps = guidance_scale, ddim_steps
        self.build_params.update(control_mode=control_mode, guidance_scale=guidance_scale, ddim_steps=ddim_steps)

    @property
    def modes(self) -> tuple[str, ...]:
        return (self.control_mode,)

    def check_mode(self, mode: str) -> ControlMode:
        mode = ControlMode(mode)
        if mode != self.control_mode:
            raise ValueError(f"this teacher was trained for control mode '{self.control_mode}', not '{mode}'; "
                             f"use the {mode} teacher or the distilled student")
        return mode

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: str | None = None, bs: int | None = None,
                  sample_posterior: bool = True) -> tuple[torch.Tensor, Cond]:
        """(z, conditioning of this teacher's mode): what the diffusion loss trains on."""
        z, context = super().get_input(batch, k, bs, sample_posterior)
        return z, self.condition(z, context, self.control_mode)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """`val/loss`: the diffusion loss at fixed timesteps (`val/loss_tNNN` each, `validation_timesteps`) on the
        sources' posterior means, with noise and mini_pass shuffles seeded by the batch's position."""
        z, context = super().get_input(batch, sample_posterior=False)
        cond = self.condition(z, context, self.control_mode, generator=torch.Generator().manual_seed(batch_idx))
        n = z.shape[0]
        noise = seeded_noise(z.shape[1:], range(batch_idx * n, (batch_idx + 1) * n), z.device, z.dtype)
        logs = {}
        for t in validation_timesteps(self.num_timesteps):
            loss, _ = self.p_losses(z, cond, torch.full((n,), t, device=z.device, dtype=torch.long), noise)
            logs[f"val/loss_t{t:03d}"] = loss
        logs["val/loss"] = torch.stack(list(logs.values())).mean()
        self.log_dict(logs, batch_size=n, sync_dist=True)

    @torch.no_grad()
    def sample(self, cond: Cond, x_T: torch.Tensor, steps: int | None = None,
               guidance_scale: float | None = None, verbose: bool = False, sampler: str | None = None,
               spacing: str | None = None, callback: StepCallback | None = None) -> torch.Tensor:
        """Guided sampling, by default DDIM on SD's uniform timesteps (`ddim_steps`, `guidance_scale` by default);
        `sampler="dpmpp_2m"` is DPM-Solver++(2M), `spacing="trailing"` starts at t = T-1."""
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        uncond = self.unconditional_conditioning(cond) if guidance_scale != 1.0 else None
        scheduler = Scheduler(self.alphas_cumprod, spacing or "uniform")
        scheduler.set_timesteps(self.ddim_steps if steps is None else steps)
        return sample(self.apply_model, x_T, scheduler.steps(x_T.device), cond, uncond, guidance_scale,
                      sampler=sampler or "ddim", verbose=verbose, callback=callback)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
        """Images in [-1, 1] (B, 3, H, W) for grids: source, reconstruction, decoded control signal, samples."""
        images, prompts = batch_images(batch, self.first_stage_key, self.cond_stage_key, N)
        translator = Translator(self)
        z, context = translator.encode(images, prompts)
        result = translator.translate_latents(z, context, [self.control_mode], seed=seed)[self.control_mode]
        return {"source": images, "reconstruction": self.decode_first_stage(z), "control": result.control,
                "samples": result.image}
