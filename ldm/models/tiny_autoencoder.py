"""TAESD's tiny autoencoder (madebyollin/taesd): a convolution-only stand-in for SD's VAE, for fast inference.

Architecture (one `width` throughout, ReLU activations, no normalisation): the encoder is a 3x3 convolution and
`encoder_blocks[0]` residual blocks, then per stage a stride-2 convolution and `encoder_blocks[i]` blocks, then a
convolution to the latent channels; the decoder mirrors it with nearest 2x upsampling. There are as many stages
as the VAE it stands in for downsamples by 2 (SD's 8x: 3, TAESD's own layout; the quickstart's 4x: 2).

Latents: `TinyAutoencoder.encode` returns the diffusion model's latents, i.e. SD's *scaled* latents
(`scale_factor * posterior mean`), and `decode` takes them. The networks work on raw latents; the two are related
as diffusers' pipelines relate them, by the `scaling_factor` and `shift_factor` of an `AutoencoderTiny` config:
latents = (raw - shift_factor) * scaling_factor. TAESD's raw latents already are SD's scaled latents (its
config: 1.0 and 0.0), as are those of the tiny autoencoders `distill_tiny_vae.py` makes. (`latent_magnitude` and
`latent_shift` only pack raw latents into uint8 images, which inference never does.)

Weight formats (`load_tiny_autoencoder`), both loaded strictly:
- the original pair `taesd_encoder.pth` + `taesd_decoder.pth` (or `.safetensors`): state dicts of TAESD's
  `nn.Sequential`s, so the encoder's `N.*` is our `encoder.layers.N.*` and the decoder's `N.*` our
  `decoder.layers.{N-1}.*` (its first module is the parameter-free latent clamp, which our decoder applies in
  `forward`); the architecture is read off the keys;
- a diffusers `AutoencoderTiny` folder: `config.json` + `diffusion_pytorch_model.safetensors` (`.bin` also
  read), keys `encoder.layers.*` / `decoder.layers.*`, our own layout. `save_diffusers_folder` writes one.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ldm.checkpoint import CheckpointMismatchError, check_state_dict, load_state_dict, save_state_dict
from ldm.util import atomic_write_text

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PAIR_SUFFIXES = (".pth", ".safetensors")
DEFAULT_TAESD_DIR = Path("models") / "taesd"
TAESD_HELP = (
    "TAESD's weights (for SD 2.1-base's 8x VAE): taesd_encoder.pth and taesd_decoder.pth from "
    "github.com/madebyollin/taesd, or the diffusers folder huggingface.co/madebyollin/taesd (config.json + "
    f"diffusion_pytorch_model.safetensors) -> {DEFAULT_TAESD_DIR}/; for another VAE, distil one with "
    "distill_tiny_vae.py")


def _conv(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, stride=stride, bias=bias)


class TinyBlock(nn.Module):
    """ReLU(conv-ReLU-conv-ReLU-conv(x) + x): TAESD's residual block (diffusers' `AutoencoderTinyBlock`)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(width, width), nn.ReLU(), _conv(width, width), nn.ReLU(), _conv(width, width))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


@dataclass(frozen=True)
class TinyAutoencoderConfig:
    """The architecture and latent scaling of a tiny autoencoder. `encoder_blocks[0]` blocks come before the first
    downsampling, `decoder_blocks[-1]` after the last upsampling; both have one entry per stage plus one."""

    latent_channels: int = 4
    width: int = 64
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_blocks", tuple(int(n) for n in self.encoder_blocks))
        object.__setattr__(self, "decoder_blocks", tuple(int(n) for n in self.decoder_blocks))
        if len(self.encoder_blocks) != len(self.decoder_blocks) or len(self.encoder_blocks) < 1:
            raise ValueError(f"encoder_blocks {self.encoder_blocks} and decoder_blocks {self.decoder_blocks} need "
                             "one entry per stage plus one, as many for both")
        if min(self.latent_channels, self.width) < 1 or min(self.encoder_blocks + self.decoder_blocks) < 0:
            raise ValueError(f"invalid tiny autoencoder config {self}")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")

    @property
    def stages(self) -> int:
        """How many times the encoder halves the image (the decoder doubles it)."""
        return len(self.encoder_blocks) - 1

    @classmethod
    def for_stages(cls, stages: int, width: int = 64, latent_channels: int = 4) -> TinyAutoencoderConfig:
        """TAESD's layout with `stages` downsamplings: 1 block first, 3 per stage (the decoder mirrored)."""
        return cls(latent_channels, width, (1, *[3] * stages), (*[3] * stages, 1))

    def to_diffusers(self) -> dict[str, Any]:
        """The `config.json` of diffusers' `AutoencoderTiny` with this architecture and scaling."""
        n = self.stages + 1
        return {"_class_name": "AutoencoderTiny", "in_channels": 3, "out_channels": 3,
                "encoder_block_out_channels": [self.width] * n, "decoder_block_out_channels": [self.width] * n,
                "act_fn": "relu", "upsample_fn": "nearest", "latent_channels": self.latent_channels,
                "upsampling_scaling_factor": 2, "num_encoder_blocks": list(self.encoder_blocks),
                "num_decoder_blocks": list(self.decoder_blocks), "latent_magnitude": 3, "latent_shift": 0.5,
                "force_upcast": False, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], source: str = "config.json") -> TinyAutoencoderConfig:
        """The config of an `AutoencoderTiny` `config.json`; a ValueError naming any setting TAESD's layout lacks."""
        if config.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
            raise ValueError(f"{source} describes a diffusers {config['_class_name']}, not an AutoencoderTiny")
        widths = [*config.get("encoder_block_out_channels", [64] * 4), *config.get("decoder_block_out_channels",
                                                                                   [64] * 4)]
        expected = {"in_channels": 3, "out_channels": 3, "act_fn": "relu", "upsample_fn": "nearest",
                    "upsampling_scaling_factor": 2}
        unsupported = [f"{k}={config[k]!r}" for k, v in expected.items() if k in config and config[k] != v]
        if len(set(widths)) != 1:
            unsupported.append(f"block widths {widths} (one width throughout is supported)")
        if unsupported:
            raise ValueError(f"{source}: unsupported AutoencoderTiny settings: {', '.join(unsupported)}")
        return cls(int(config.get("latent_channels", 4)), widths[0],
                   tuple(config.get("num_encoder_blocks", (1, 3, 3, 3))),
                   tuple(config.get("num_decoder_blocks", (3, 3, 3, 1))),
                   float(config.get("scaling_factor", 1.0)), float(config.get("shift_factor") or 0.0))


class TinyEncoder(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> raw latents (B, latent_channels, H / 2^stages, W / 2^stages)."""

    def __init__(self, config: TinyAutoencoderConfig):
        super().__init__()
        w = config.width
        layers: list[nn.Module] = []
        for stage, blocks in enumerate(config.encoder_blocks):
            layers.append(_conv(3, w) if stage == 0 else _conv(w, w, stride=2, bias=False))
            layers += [TinyBlock(w) for _ in range(blocks)]
        layers.append(_conv(w, config.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images.add(1).div(2))  # TAESD works on [0, 1] images


class TinyDecoder(nn.Module):
    """Raw latents -> images in about [-1, 1]; the latents are first soft-clamped to (-3, 3) (tanh)."""

    def __init__(self, config: TinyAutoencoderConfig):
        super().__init__()
        w = config.width
        layers: list[nn.Module] = [_conv(config.latent_channels, w), nn.ReLU()]
        for stage, blocks in enumerate(config.decoder_blocks):
            layers += [TinyBlock(w) for _ in range(blocks)]
            if stage < config.stages:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(w, w, bias=False)]
        layers.append(_conv(w, 3))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.tanh(latents / 3) * 3).mul(2).sub(1)


class TinyAutoencoder(nn.Module):
    """Images <-> diffusion latents (SD's scaled latents, see the module docstring). Keys: `encoder.layers.*`,
    `decoder.layers.*` (diffusers' layout)."""

    def __init__(self, config: TinyAutoencoderConfig | None = None):
        super().__init__()
        self.config = config or TinyAutoencoderConfig()
        self.encoder = TinyEncoder(self.config)
        self.decoder = TinyDecoder(self.config)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** self.config.stages

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents in the diffusion model's space."""
        return (self.encoder(images) - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in the diffusion model's space -> images in about [-1, 1]."""
        return self.decoder(latents / self.config.scaling_factor + self.config.shift_factor)


# ---- weight files ------------------------------------------------------------------------------------------------
def _pair_key(key: str) -> tuple[str, str]:
    """(`encoder` or `decoder`, the key in TAESD's file of that part) of one of our keys."""
    part, _, rest = key.partition(".layers.")
    index, _, name = rest.partition(".")
    return part, f"{int(index) + (part == 'decoder')}.{name}"


def pair_state_dicts(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Our state dict as TAESD's two files hold it: {"encoder": {...}, "decoder": {...}}."""
    parts: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "decoder": {}}
    for key, value in state_dict.items():
        part, original = _pair_key(key)
        parts[part][original] = value
    return parts


def _layer_kinds(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Per parametrised layer of a TAESD file, in order: 'c' (a convolution) or 'b' (a residual block)."""
    kinds: dict[int, str] = {}
    for key in state_dict:
        match = re.fullmatch(r"(\d+)\.(conv\.)?.+", key)
        if match:
            kinds[int(match.group(1))] = "b" if match.group(2) else "c"
    return [kinds[i] for i in sorted(kinds)]


def _blocks_between_convs(kinds: Sequence[str]) -> tuple[int, ...]:
    """The block counts between successive convolutions ('cbcbbbc' -> (1, 3))."""
    return tuple(len(run) for run in "".join(kinds).split("c")[1:-1])


def config_from_pair(encoder: Mapping[str, torch.Tensor], decoder: Mapping[str, torch.Tensor],
                     source: str) -> TinyAutoencoderConfig:
    """The architecture TAESD's two state dicts have (read off their keys and shapes). A decoder whose layers do not
    fit the encoder's stages is taken as the encoder's mirror, so that the strict key check says what differs."""
    try:
        first, last = encoder["0.weight"], encoder[f"{max(int(k.split('.')[0]) for k in encoder)}.weight"]
        encoder_blocks = _blocks_between_convs(_layer_kinds(encoder))
        decoder_blocks = _blocks_between_convs(_layer_kinds(decoder))
        if len(decoder_blocks) != len(encoder_blocks):
            decoder_blocks = encoder_blocks[::-1]
        return TinyAutoencoderConfig(latent_channels=last.shape[0], width=first.shape[0],
                                     encoder_blocks=encoder_blocks, decoder_blocks=decoder_blocks)
    except (KeyError, ValueError, IndexError) as error:
        raise CheckpointMismatchError(f"{source} is not a TAESD encoder/decoder pair ({error})") from None


def _pair_files(path: Path) -> tuple[Path, Path] | None:
    """(encoder, decoder) of a TAESD pair named by `path`: one of the two files, or a folder holding one pair."""
    if path.is_file():
        match = re.fullmatch(r"(.*)_(encoder|decoder)(\.[a-z]+)", path.name)
        if not match:
            return None
        stem, ext = match.group(1), match.group(3)
        return path.with_name(f"{stem}_encoder{ext}"), path.with_name(f"{stem}_decoder{ext}")
    encoders = sorted(p for p in path.glob("*_encoder*") if p.suffix in PAIR_SUFFIXES)
    preferred = [p for p in encoders if p.stem == "taesd_encoder"] or encoders
    if not preferred:
        return None
    if len(preferred) > 1 and len({p.stem for p in preferred}) > 1:
        raise ValueError(f"{path} holds several encoder files ({', '.join(p.name for p in preferred)}): name one")
    encoder = preferred[0]
    return encoder, encoder.with_name(encoder.name.replace("_encoder", "_decoder"))


def load_tiny_autoencoder(path: str | os.PathLike) -> TinyAutoencoder:
    """The tiny autoencoder at `path`, loaded strictly: a diffusers `AutoencoderTiny` folder, TAESD's pair of files
    (either file, or their folder), in eval mode. A missing or wrong file raises with what to get and where."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tiny autoencoder not found: {path}\n{TAESD_HELP}")
    if path.is_dir() and (path / DIFFUSERS_CONFIG).is_file():
        return _load_diffusers(path).eval()
    pair = _pair_files(path)
    if pair is None:
        raise FileNotFoundError(f"{path} is neither a diffusers AutoencoderTiny folder ({DIFFUSERS_CONFIG} + "
                                f"{DIFFUSERS_WEIGHTS[0]}) nor a TAESD <name>_encoder.pth/<name>_decoder.pth pair "
                                f"(a file of it, or its folder)\n{TAESD_HELP}")
    return _load_pair(*pair).eval()


def _load_diffusers(folder: Path) -> TinyAutoencoder:
    config_path = folder / DIFFUSERS_CONFIG
    try:
        config = TinyAutoencoderConfig.from_diffusers(json.loads(config_path.read_text()), os.fspath(config_path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON ({error})") from None
    weights = next((folder / name for name in DIFFUSERS_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} has {DIFFUSERS_CONFIG} but no {' or '.join(DIFFUSERS_WEIGHTS)}\n"
                                f"{TAESD_HELP}")
    model = TinyAutoencoder(config)
    state_dict = load_state_dict(weights, hint=TAESD_HELP)
    check_state_dict(model.state_dict(), state_dict, os.fspath(weights))
    model.load_state_dict(state_dict)
    return model


def _load_pair(encoder_path: Path, decoder_path: Path) -> TinyAutoencoder:
    encoder, decoder = (load_state_dict(p, hint=TAESD_HELP) for p in (encoder_path, decoder_path))
    model = TinyAutoencoder(config_from_pair(encoder, decoder, f"{encoder_path} + {decoder_path}"))
    expected = pair_state_dicts(model.state_dict())
    check_state_dict(expected["encoder"], encoder, os.fspath(encoder_path))
    check_state_dict(expected["decoder"], decoder, os.fspath(decoder_path))
    model.load_state_dict({f"{part}.layers.{_pair_index(part, k)}": v
                           for part, sd in (("encoder", encoder), ("decoder", decoder)) for k, v in sd.items()})
    return model


def _pair_index(part: str, key: str) -> str:
    """TAESD's key of `part` -> the rest of ours after `<part>.layers.` (the inverse of `_pair_key`)."""
    index, _, name = key.partition(".")
    return f"{int(index) - (part == 'decoder')}.{name}"


def save_diffusers_folder(model: TinyAutoencoder, folder: str | os.PathLike,
                          metadata: Mapping[str, str] | None = None) -> Path:
    """Write `model` as a diffusers `AutoencoderTiny` folder (`config.json` + `diffusion_pytorch_model.safetensors`,
    each atomically; `metadata` goes into the safetensors header); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(model.state_dict(), folder / DIFFUSERS_WEIGHTS[0], {"format": "pt", **(metadata or {})})
    atomic_write_text(folder / DIFFUSERS_CONFIG, json.dumps(model.config.to_diffusers(), indent=2) + "\n")
    return folder
