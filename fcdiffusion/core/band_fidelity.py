"""Frequency-band fidelity: how well a translation keeps the source's controlled DCT band, and how free the rest is.

FCDiffusion's claim (Gao et al. 2024) is that each control mode fixes one band of the source latent's 2-D DCT
spectrum and leaves the others to the prompt. For a source x and its translation y in control mode m, with S and
Y their orthonormal 2-D DCT spectra (per channel, over the last two dims) and B_m the mode's band of i + j:

    band_error(m)   = sum_B (Y - S)^2 / sum_B S^2          (0: the controlled band kept exactly)
    band_freedom(m) = sum_notB (Y - S)^2 / sum_notB S^2    (0: nothing outside the band changed)

summed over channels and the band's coefficients, per image. mini_pass shuffles coefficients within each
anti-diagonal i + j = n, so for it the comparison is of the energies per anti-diagonal, which the shuffle keeps:
the numerator of band_error becomes sum_{n in B} (sqrt(E_Y(n)) - sqrt(E_S(n)))^2 with E(n) = sum_{i+j=n} X^2.

Band retrieval (a set-level figure): among N sources and their N translations in one mode, translation i is
retrieved when its band is more similar to its own source's band than to any other source's; the accuracy is the
fraction retrieved (1/N by chance). Similarity is the cosine of the band's coefficients (all channels; for
mini_pass, of the amplitude profiles sqrt(E(n)) over the band's anti-diagonals, which its shuffle keeps):

    sim(y, s) = <B(Y), B(S)> / (|B(Y)| |B(S)|)

It asks whether a translation keeps *its own* source's band, not just some band of the right energy: a model that
ignores its control signal scores near chance. The cosine is scale-free in both arguments, so no source wins by the
energy of its band. (Retrieval by smallest band_error did not have that property: band_error divides by the
candidate's band energy, |Y|^2 / |S_j|^2 - 2 <Y, S_j> / |S_j|^2 + 1, so a high-energy candidate draws every
result and a source with a weak band is missed even when its result carries that band; the tests construct such
a case.)

Two spaces: `latent` (the model's VAE latents, the model's own thresholds: the space the control net sees) and
`pixel` (the images themselves, the thresholds scaled by pixel size / latent size, so a band keeps the same share
of the spectrum).
"""
from __future__ import annotations

import torch

from fcdiffusion.core.frequency import band_limits, band_mask, dct_2d, index_sum, scale_thresholds
from fcdiffusion.core.inference import encode_images


def _level_energies(spectrum: torch.Tensor) -> torch.Tensor:
    """(N, H + W - 1): the energy of each anti-diagonal i + j = n, summed over channels."""
    h, w = spectrum.shape[-2:]
    levels = index_sum(h, w, spectrum.device).flatten()
    energy = spectrum.pow(2).sum(1).flatten(1)
    return torch.zeros(energy.shape[0], h + w - 1, dtype=energy.dtype, device=energy.device).index_add_(
        1, levels, energy)


def band_scores(source: torch.Tensor, output: torch.Tensor, mode: str,
                **thresholds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(band_error, band_freedom), each (N,), of outputs against sources (N, C, H, W) in control mode `mode`."""
    if source.shape != output.shape:
        raise ValueError(f"source {tuple(source.shape)} and output {tuple(output.shape)} differ in shape")
    s, y = dct_2d(source.double()), dct_2d(output.double())
    h, w = s.shape[-2:]
    low, high = band_limits(mode, **thresholds)
    inside = band_mask(h, w, low, high, s.device)
    diff = (y - s).pow(2)
    tiny = torch.finfo(torch.float64).tiny
    if mode == "mini_pass":
        top = min(h + w - 2, high if high is not None else h + w - 2)
        e_s, e_y = _level_energies(s)[:, low:top + 1], _level_energies(y)[:, low:top + 1]
        error = (e_y.sqrt() - e_s.sqrt()).pow(2).sum(1) / e_s.sum(1).clamp(min=tiny)
    else:
        error = (diff * inside).sum((1, 2, 3)) / (s.pow(2) * inside).sum((1, 2, 3)).clamp(min=tiny)
    outside = ~inside
    freedom = (diff * outside).sum((1, 2, 3)) / (s.pow(2) * outside).sum((1, 2, 3)).clamp(min=tiny)
    return error.float(), freedom.float()


def pixel_thresholds(latent_thresholds: dict[str, int] | None, image_size: int, latent_size: int) -> dict[str, int]:
    """The model's band edges (for a `latent_size` latent) scaled to `image_size` pixels."""
    return scale_thresholds(latent_thresholds, image_size, latent_size)


@torch.no_grad()
def latent_band_scores(model: torch.nn.Module, sources: torch.Tensor, outputs: torch.Tensor,
                       mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`band_scores` in the space the control net sees: images (N, 3, H, W) in [-1, 1] encoded by the model's VAE
    (posterior mean, scaled), with the model's own band edges."""
    return band_scores(encode_images(model, sources), encode_images(model, outputs), mode,
                       **model.frequency_thresholds)


def _band_vectors(x: torch.Tensor, mode: str, **thresholds: int) -> torch.Tensor:
    """(N, K) float64: what band retrieval compares of each of x's (N, C, H, W) kept band."""
    spectrum = dct_2d(x.double())
    h, w = spectrum.shape[-2:]
    low, high = band_limits(mode, **thresholds)
    if mode == "mini_pass":
        top = min(h + w - 2, high if high is not None else h + w - 2)
        return _level_energies(spectrum)[:, low:top + 1].sqrt()
    return spectrum[..., band_mask(h, w, low, high, spectrum.device)].flatten(1)


def band_similarity(sources: torch.Tensor, outputs: torch.Tensor, mode: str, **thresholds: int) -> torch.Tensor:
    """(N_outputs, N_sources): cosine similarity of each output's kept band with each source's (see the module
    docstring); sources and outputs (N, C, H, W) of one shape per image."""
    if sources.shape[1:] != outputs.shape[1:]:
        raise ValueError(f"sources {tuple(sources.shape)} and outputs {tuple(outputs.shape)} differ in shape")
    s = torch.nn.functional.normalize(_band_vectors(sources, mode, **thresholds), dim=1)
    y = torch.nn.functional.normalize(_band_vectors(outputs, mode, **thresholds), dim=1)
    return y @ s.T


def band_retrieval(sources: torch.Tensor, outputs: torch.Tensor, mode: str, **thresholds: int) -> torch.Tensor:
    """(N,) bool: whether output i's band is most similar (`band_similarity`) to source i's among all N sources."""
    if sources.shape != outputs.shape:
        raise ValueError(f"sources {tuple(sources.shape)} and outputs {tuple(outputs.shape)} differ in shape")
    similarity = band_similarity(sources, outputs, mode, **thresholds)
    return similarity.argmax(1) == torch.arange(len(sources), device=similarity.device)
