"""A translation's final latents saved beside its PNG, with the settings that made them.

`test_distillation.py --save_latents` writes one file per image and mode; the benchmark's fidelity figures
(`--references`) then take a teacher's saved result as the reference instead of solving it again: the quickstart
runs each teacher's 50-step guided solve once, not twice. A file is used only where everything that decides its
latents is what the reader would sample with (`translation_settings`); otherwise reading it raises.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ldm.checkpoint import save_state_dict


def model_identity(path: str | os.PathLike) -> dict[str, Any]:
    """The weights file as it is now: its resolved path, size and modification time (a file retrained in place
    is another model)."""
    stat = os.stat(path)
    return {"file": os.path.realpath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def translation_settings(model: str | os.PathLike, prompt: str, resolution: int, seed: int, control_seed: int,
                         steps: int | None, guidance_scale: float | None = None, sampler: str | None = None,
                         spacing: str | None = None, precision: str = "fp32", vae: Any = "full") -> dict[str, Any]:
    """Everything that decides a translation's latents, as passed to `Translator` (None: the model's own), with the
    model file's identity: equal settings give equal latents (up to the float rounding of another batch size)."""
    return {"model": model_identity(model), "prompt": prompt, "resolution": resolution, "seed": seed,
            "control_seed": control_seed, "steps": steps, "guidance_scale": guidance_scale, "sampler": sampler,
            "spacing": spacing, "precision": precision, "vae": vae}


def latents_path(folder: str | os.PathLike, name: str, mode: str) -> Path:
    """Where test_distillation.py saves the latents of `<name>_<mode>.png`."""
    return Path(folder) / f"{name}_{mode}_latents.safetensors"


def save_latents(path: str | os.PathLike, latents: torch.Tensor, settings: Mapping[str, Any]) -> None:
    """Write one image's latents (C, H, W) and their settings, atomically."""
    save_state_dict({"latents": latents}, path, {"fcdiffusion.translation": json.dumps(settings, sort_keys=True)})


def load_latents(path: str | os.PathLike, expected: Mapping[str, Any]) -> torch.Tensor:
    """The latents saved at `path`; a ValueError naming every setting that differs from `expected`."""
    with safe_open(os.fspath(path), framework="pt") as f:
        saved = json.loads((f.metadata() or {}).get("fcdiffusion.translation", "{}"))
        latents = f.get_tensor("latents")
    differ = sorted(key for key in {*saved, *expected} if saved.get(key) != expected.get(key))
    if differ:
        detail = "; ".join(f"{key}: saved {saved.get(key)!r}, wanted {expected.get(key)!r}" for key in differ)
        raise ValueError(f"{os.fspath(path)} was made with other settings ({detail}): delete it or point to the "
                         "matching results")
    return latents
