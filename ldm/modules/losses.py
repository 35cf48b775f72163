"""The autoencoder's training objective.

SD's `LPIPSWithDiscriminator` adds a perceptual (LPIPS) and an adversarial term to a pixel reconstruction loss
and a KL penalty. Both extra terms need networks this project cannot download or afford on a CPU, so
`ReconstructionKLLoss` keeps the other two, with SD's weighting: per image, the reconstruction error summed over
pixels plus `kl_weight` times KL(posterior || N(0, I)) summed over latent entries (SD's kl_weight is 1e-6). The
sum is divided by the number of pixel values, which rescales the loss (and so the learning rate that suits it),
not the balance of its terms. An L2 reconstruction error maximises PSNR; SD uses L1.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB, of images (B, C, H, W) in [-1, 1] (clipped) against references.

    The standard definition, 10 log10(MAX^2 / MSE) with MAX = 1 on the [0, 1] scale (as in skimage's
    `peak_signal_noise_ratio` with data_range=1), the MSE taken over all values of an image.
    """
    a = (images.detach().float().clamp(-1, 1) + 1) / 2
    b = (references.detach().float().clamp(-1, 1) + 1) / 2
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


class ReconstructionKLLoss(nn.Module):
    """Pixel reconstruction (`pixel_loss`: "l1" or "l2") + `kl_weight` * KL, normalised per pixel value.

    Holds no parameters, so a model's state dict (and SD's checkpoint layout) is the same with or without it.
    """

    def __init__(self, kl_weight: float = 1e-6, pixel_loss: str = "l1"):
        super().__init__()
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' or 'l2', got '{pixel_loss}'")
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        self.kl_weight, self.pixel_loss = kl_weight, pixel_loss

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                posterior: DiagonalGaussianDistribution) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, logs) for images (B, C, H, W) and their reconstructions through `posterior`."""
        error = (reconstructions.float() - inputs.float())
        error = error.abs() if self.pixel_loss == "l1" else error.pow(2)
        per_image = error.flatten(1).sum(1)
        kl = posterior.kl()
        loss = (per_image + self.kl_weight * kl).mean() / inputs[0].numel()
        logs = {"train/loss": loss.detach(), "train/rec_loss": error.mean().detach(), "train/kl": kl.mean().detach(),
                "train/psnr": psnr(reconstructions, inputs).mean()}
        return loss, logs
